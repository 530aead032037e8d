"""Reading ``.safetensors`` files tensor by tensor with plain reads, validated, without a memory map.

The safetensors library maps the whole file into memory; every page a load touches then counts in
the process's resident memory until the file is closed. Streaming a checkpoint into a 4-bit model
layer by layer needs the opposite: one tensor in memory at a time. The format is simple (an 8-byte
little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw
bytes), so this reader parses it and checks every field against the file before reading anything, as
the safetensors library does (tensors packed back to back, covering the data exactly): a truncated or
tampered file is an :class:`~slimtune.errors.InvalidFileError` naming the file and the tensor, never
garbage. Every reader of untrusted tensors (adapters, checkpoints, base models) goes through it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from slimtune.errors import InvalidFileError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit

Entry = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, start, end (in the data section)


class SafetensorsReader:
    """``keys()``, ``metadata``, ``shape(name)`` and ``get_tensor(name)`` of one file; use as a context manager.

    The header is checked when the file is opened; nothing else is read until a tensor is asked for."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # closed by close() or the context manager
        except OSError as error:
            raise InvalidFileError(self.path, f"cannot be read ({error.strerror or error}).") from None
        try:
            self._entries, self.metadata = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, what: str, key: str | None = None) -> InvalidFileError:
        return InvalidFileError(self.path, f"{what}; the file is not a valid safetensors file (truncated or altered?).",
                                key)

    def _read_header(self) -> tuple[dict[str, Entry], dict[str, str]]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise self._bad(f"header length {length} exceeds the file ({size} bytes) or {MAX_HEADER} bytes")
        try:
            header = json.loads(self._file.read(length), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise self._bad(f"the header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise self._bad("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._bad("__metadata__ is not a mapping of strings to strings", "__metadata__")
        data_size = size - 8 - length
        entries = {name: self._entry(name, info, data_size) for name, info in header.items()}
        end = 0  # tensors lie back to back from offset 0 and cover the data section exactly
        for name, (_, _, start, stop) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
            if start != end:
                raise self._bad(f"tensor {name!r} starts at byte {start}, not at {end} where the previous one ended "
                                "(overlapping or gapped data)", name)
            end = stop
        if end != data_size:
            raise self._bad(f"the tensors hold {end} bytes but the data section has {data_size}")
        self._data_start = 8 + length
        return entries, metadata

    def _entry(self, name: str, info: Any, data_size: int) -> Entry:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise self._bad(f"tensor {name!r} has no dtype/shape/data_offsets", name)
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise self._bad(f"tensor {name!r} has dtype {info['dtype']!r}, not one of {sorted(DTYPES)}", name)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._bad(f"tensor {name!r} has shape {shape!r}", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise self._bad(f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size} data bytes", name)
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * torch.empty((), dtype=dtype).element_size():
            raise self._bad(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold {info['dtype']} {shape}",
                            name)
        return dtype, tuple(shape), offsets[0], offsets[1]

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def numel(self) -> int:
        """Values in the whole file (from the header alone)."""
        total = 0
        for _, shape, _, _ in self._entries.values():
            count = 1
            for d in shape:
                count *= d
            total += count
        return total

    def get_tensor(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor holding ``name`` (read with one ``pread``, nothing else kept)."""
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        dtype, shape, start, end = self._entries[name]
        raw = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            got = os.preadv(self._file.fileno(), [raw.numpy().data], self._data_start + start)
            if got != end - start:
                raise self._bad(f"tensor {name!r}: read {got} of {end - start} bytes", name)
        return raw.view(dtype).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` along dim 0 (a contiguous byte range: one ``pread`` of those rows
        alone), e.g. the shard of a weight that one rank of a sharded run holds."""
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        dtype, shape, begin, end = self._entries[name]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{stop} are outside tensor {name!r} of shape {shape}")
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        raw = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        if raw.numel():
            offset = self._data_start + begin + start * row_bytes
            got = os.preadv(self._file.fileno(), [raw.numpy().data], offset)
            if got != raw.numel():
                raise self._bad(f"tensor {name!r}: read {got} of {raw.numel()} bytes", name)
        return raw.view(dtype).reshape((stop - start, *shape[1:]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file, by name."""
        return {name: self.get_tensor(name) for name in self._entries}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, validated (see :class:`SafetensorsReader`)."""
    with SafetensorsReader(path) as reader:
        return reader.tensors()


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights holding inf or NaN (a damaged file, or a run that diverged): loaded, they would turn every
    output into NaN without a word."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            continue
        finite = torch.isfinite(value.float() if value.element_size() == 1 else value)  # float8: no isfinite kernel
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InvalidFileError(Path(path), f"{key!r} holds {bad:,} inf/NaN values of {value.numel():,}: the file "
                                               "is damaged, or was saved from a run that diverged. Use another copy "
                                               "of the adapter (or an earlier checkpoint's adapter/ folder).", key)


def read_pickled_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pickle file of named tensors (PEFT's ``adapter_model.bin``, AdapterHub's ``pytorch_adapter.bin``), read by
    torch's weights-only unpickler, which runs no code; anything else in it, or a damaged file, is an
    :class:`InvalidFileError` naming the file (never the advice to unpickle it unrestricted)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler raises many types for a hostile or damaged file
        # torch's own message advises weights_only=False for a file it refused: the unsafe route, not repeated here
        raise InvalidFileError(Path(path), f"refused by torch's weights-only loader ({type(error).__name__}): the "
                                           "file is damaged, or holds more than named tensors. Re-save the adapter as "
                                           "safetensors from a source you trust.") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise InvalidFileError(Path(path), "does not hold a mapping of tensor names to tensors.")
    return tensors

