"""Load a model straight into quantized form, one tensor at a time.

The model is built without allocating its parameters (``init_empty_weights``: parameters on the
meta device, buffers such as rotary tables real), then each tensor is read from safetensors with
plain reads (:class:`slimtune.core.tensor_files.SafetensorsReader`, no memory map) and placed:
linear weights are quantized as they arrive (full-precision checkpoint + ``QuantConfig``) or loaded
as stored (checkpoints written by slimtune or transformers+bitsandbytes, detected per layer from
their keys). The full-precision model never exists in memory: one layer's weight at a time does.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from slimtune.compat import checkpoint_key_mapper
from slimtune.core.dtypes import default_compute_dtype
from slimtune.core.modules import (
    checkpoint_class_parts,
    held_parts,
    is_conv1d,
    is_dense_linear,
    linear_dims,
    new_part,
    replace_module,
    weight_of,
)
from slimtune.core.tensor_files import SafetensorsReader
from slimtune.quant.config import QuantConfig
from slimtune.quant.linear import QuantizedLinear
from slimtune.quant.model import keep_in_fp32_patterns, layer_from_state, make_quantized_layer, skipped_linear_names
from slimtune.quant.state import is_4bit_prefix, is_8bit_prefix

__all__ = ["CheckpointNeedsMerging", "init_empty_weights", "load_quantized", "load_in_4bit",
           "load_quantized_from_state_dict", "init_random_quantized", "TensorSource", "checkpoint_source",
           "random_source", "safetensors_files"]

logger = logging.getLogger(__name__)

ModelSource = nn.Module | Callable[[], nn.Module]


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init cost).

    Unlike ``with torch.device("meta")`` buffers stay real, so tables computed in ``__init__``
    (rotary ``inv_freq``, ...) survive. Uses torch's public parameter-registration hook.
    """

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None):
        if param is None or param.is_meta or type(param) is not nn.Parameter:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


class CheckpointNeedsMerging(ValueError):
    """The checkpoint stores tensors that transformers merges while loading: load the model whole instead."""


class _Source:
    """Tensors by name from a state dict or from safetensors files, read one at a time (no memory map, so
    only the tensor being placed is resident), whole or as a range of rows (a rank's shard).
    ``rows_read[key]``: the rows of ``key`` read so far (what a sharded load is tested on)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None, files: list[Path] | None = None,
                 stack: contextlib.ExitStack | None = None):
        self._dict = tensors
        self._where: dict[str, SafetensorsReader] = {}
        if files:
            assert stack is not None  # files stay open in the caller's ExitStack
            for path in files:
                handle = stack.enter_context(SafetensorsReader(path))
                again = [k for k in handle.keys() if k in self._where]
                if again:  # which one is the model's? (transformers would read only the files its index names)
                    raise ValueError(f"{again[0]!r} (and {len(again) - 1} more) is stored in both "
                                     f"{self._where[again[0]].path} and {path}; keep one checkpoint per folder")
                self._where.update(dict.fromkeys(handle.keys(), handle))
        self.keys = set(tensors) if tensors is not None else set(self._where)
        self._stored: dict[str, str] = {}  # the model's name → the key stored in the file, where they differ
        self.used: set[str] = set()
        self.rows_read: dict[str, int] = {}

    def follow_renames(self, model: nn.Module) -> None:
        """Name the tensors as ``model`` does where transformers renames checkpoint keys while loading (see
        :func:`slimtune.compat.checkpoint_key_mapper`). Raises :class:`CheckpointNeedsMerging` for tensors
        transformers merges (a mixture of experts' per-expert matrices): they are not read one by one."""
        mapper = checkpoint_key_mapper(model)
        renamed: dict[str, str] = {}
        merged = []
        for key in sorted(self.keys):
            name, merges = mapper(key)
            if merges:
                merged.append(f"{key} → {name}")
            elif name != key:
                renamed[name] = key
        if merged:
            raise CheckpointNeedsMerging(
                f"{len(merged)} checkpoint tensors are merged into other parameters as transformers loads them, "
                f"e.g. {merged[0]}; the layer-by-layer quantized loader reads tensors one by one. Load the model "
                "with transformers' from_pretrained, which merges them, then quantize(model, config): layers stored "
                "quantized by bitsandbytes (which from_pretrained then needs) are kept as stored.")
        self.keys = (self.keys - set(renamed.values())) | set(renamed)
        self._stored.update(renamed)

    def _count(self, key: str, rows: int) -> None:
        self.used.add(key)
        self.rows_read[key] = self.rows_read.get(key, 0) + rows

    def get(self, key: str) -> torch.Tensor:
        stored = self._stored.get(key, key)
        value = self._dict[stored] if self._dict is not None else self._where[stored].get_tensor(stored)
        self._count(key, value.shape[0] if value.dim() else 1)
        return value

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of ``key``; from files, only those rows are read."""
        self._count(key, stop - start)
        stored = self._stored.get(key, key)
        if self._dict is not None:
            return self._dict[stored][start:stop]
        return self._where[stored].get_rows(stored, start, stop)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys if k.startswith(prefix)}

    def resolve(self, name: str, base_prefix: str) -> str | None:
        """The checkpoint key of model tensor ``name`` (tolerating a missing or extra base prefix)."""
        candidates = [name]
        if base_prefix:
            candidates += [f"{base_prefix}.{name}", name.removeprefix(base_prefix + ".")]
        return next((c for c in candidates if c in self.keys), None)

    def resolve_prefix(self, name: str, base_prefix: str) -> str | None:
        for cand in [name] + ([f"{base_prefix}.{name}", name.removeprefix(base_prefix + ".")] if base_prefix else []):
            if cand + ".weight" in self.keys:
                return cand + "."
        return None


class _RandomSource(_Source):
    """Random tensors in place of a checkpoint, made one at a time on ``device`` as a file's would be read:
    matrices N(0, std²), the weights of normalisation layers one, other vectors zero. For timing a model's
    shapes without its weights (``model.init: random``).

    A matrix is made in chunks of rows (about 2**20 values each), each from its own generator seeded by
    (seed, tensor name, chunk): the values do not depend on the order tensors are asked for, and a range of
    rows (a rank's shard) is made without the rest of the matrix.
    """

    def __init__(self, model: nn.Module, std: float, seed: int, device: torch.device):
        super().__init__(tensors={})
        norms = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
        # one name per tensor: a tied weight (lm_head of tie_word_embeddings) is tied, not drawn twice
        self._shapes = {n: (tuple(p.shape), n.rpartition(".")[0] in norms and n.endswith("weight"))
                        for n, p in model.named_parameters()}
        self.keys = set(self._shapes)
        self._std, self._device, self._seed = std, device, seed

    def get(self, key: str) -> torch.Tensor:
        shape, _ = self._shapes[key]
        return self.get_rows(key, 0, shape[0] if shape else 1)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        self._count(key, stop - start)
        shape, is_norm = self._shapes[key]
        if len(shape) < 2:
            vector = (torch.ones if is_norm else torch.zeros)(shape, device=self._device)
            return vector[start:stop] if shape else vector
        row = shape[1:]
        per = max(1, _RANDOM_CHUNK // max(1, _numel(row)))
        out = torch.empty((stop - start, *row), device=self._device)
        for first in range(start - start % per, stop, per):
            seed = zlib.crc32(f"{self._seed}:{key}:{first // per}".encode())
            generator = torch.Generator(device=self._device).manual_seed(seed)
            chunk = torch.randn((min(first + per, shape[0]) - first, *row), generator=generator, device=self._device)
            lo, hi = max(start, first), min(stop, first + per)
            out[lo - start: hi - start] = chunk[lo - first: hi - first]
        return out.mul_(self._std)


_RANDOM_CHUNK = 2**20  # values per generator of _RandomSource


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


TensorSource = _Source


def checkpoint_source(paths: str | os.PathLike | list, stack: contextlib.ExitStack) -> TensorSource:
    """The tensors of safetensors file(s) or folder ``paths``, open until ``stack`` closes."""
    return _Source(files=safetensors_files(paths), stack=stack)


def random_source(model: nn.Module, std: float, seed: int, device: torch.device | str) -> TensorSource:
    """Random tensors in ``model``'s shapes (see :class:`_RandomSource`), built model as for :func:`_load`."""
    return _RandomSource(model, std, seed, torch.device(device))


SAFE_INDEX, SAFE_SINGLE, ADAPTER_FILE = "model.safetensors.index.json", "model.safetensors", "adapter_model.safetensors"


def folder_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, as transformers picks them: the shards its index names (files
    beside them that it does not name, such as an older revision's shards, are not read), else
    ``model.safetensors``, else every ``*.safetensors`` file but an adapter's."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index} is not a safetensors index ({type(error).__name__}: {error}); restore it "
                             "from the model's source") from None
        pickles = [name for name in names if not name.endswith(".safetensors")]
        if pickles:
            raise ValueError(f"{index} names shards that are not safetensors files, e.g. {pickles[0]!r} (pickle "
                             "weights can run code when loaded); convert them to safetensors, or load the model in "
                             "full precision with allow_pickle (model.allow_pickle: true) if you trust them")
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {missing[:5]}; download the "
                                    "whole checkpoint again")
        return [folder / name for name in names]
    if (folder / SAFE_SINGLE).is_file():
        return [folder / SAFE_SINGLE]
    found = sorted(f for f in folder.glob("*.safetensors") if f.name != ADAPTER_FILE)
    if not found:
        raise FileNotFoundError(f"no *.safetensors file of a model in {folder}")
    return found


def safetensors_files(paths: str | os.PathLike | list) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            files += folder_weight_files(item)
        elif item.suffix in (".bin", ".pt", ".pth"):
            raise ValueError(f"{item}: pickle checkpoints can run arbitrary code when loaded; convert it to "
                             "safetensors (safetensors.torch.save_file) and load that")
        elif not item.is_file():
            raise FileNotFoundError(f"checkpoint file {item} does not exist")
        else:
            files.append(item)
    return files


def _build(model: ModelSource) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if not callable(model):
        raise ValueError(f"model must be an nn.Module or a function that builds one, got {type(model).__name__}")
    with init_empty_weights():
        return model()


def _keeps_fp32(model: nn.Module) -> Callable[[str, torch.dtype], bool]:
    """Whether tensor ``name`` of a model built in ``dtype`` is loaded in float32 instead, as ``from_pretrained``
    does: ``_keep_in_fp32_modules`` when ``dtype`` is float16, ``_keep_in_fp32_modules_strict`` for float16 and
    bfloat16 (patterns searched in the tensor's name, ``*`` as any text)."""
    def compile_(patterns: list[str]) -> re.Pattern | None:
        return re.compile("|".join(p.replace("*", ".*") for p in patterns)) if patterns else None

    keep, strict = compile_(keep_in_fp32_patterns(model)), compile_(keep_in_fp32_patterns(model, strict=True))
    return lambda name, dtype: bool(dtype == torch.float16 and keep and keep.search(name)) or bool(
        dtype in (torch.float16, torch.bfloat16) and strict and strict.search(name))


def _replace(module: nn.Module, name: str, value: torch.Tensor, device, fp32: bool = False) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"checkpoint tensor for {name!r} has shape {tuple(value.shape)}, the model expects "
                         f"{tuple(old.shape)}")
    value = value.to(device=device, dtype=torch.float32 if fp32 else old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, value, persistent=attr not in owner._non_persistent_buffers_set)


def _load_layer(model: nn.Module, name: str, source: _Source, key_prefix: str, config: QuantConfig | None,
                device, quantize_it: bool) -> None:
    """Put a quantized layer at ``name``: loaded as stored, or quantized from its full-precision weight."""
    old = model.get_submodule(name)
    in_f, out_f = linear_dims(old)
    has_bias = old.bias is not None
    dtype: torch.dtype = old.dtype if isinstance(old, QuantizedLinear) else weight_of(old).dtype  # as asked for
    stored = source.prefixed(key_prefix) if is_4bit_prefix(source.keys, key_prefix) or \
        is_8bit_prefix(source.keys, key_prefix) else None
    layer: QuantizedLinear
    if stored is not None:
        compute = config.resolved_compute_dtype(device) if config else default_compute_dtype(device)
        layer = layer_from_state(stored, key_prefix, in_f, out_f, has_bias, compute, dtype).to(device)
    elif quantize_it:
        assert config is not None  # the caller quantizes only with a config
        raw = source.get(key_prefix + "weight")
        if not raw.is_floating_point():
            raise ValueError(f"{key_prefix}weight is stored as {raw.dtype} (quantized codes?) without a quantization "
                             "state this loader knows (bitsandbytes' weight.quant_state.bitsandbytes__nf4/fp4 for "
                             "4-bit, SCB for 8-bit); is the checkpoint complete?")
        w = raw.to(device=device, dtype=dtype)  # as from_pretrained(dtype=) casts it
        if is_conv1d(old):
            w = w.t()  # Conv1D stores (in, out)
        layer = make_quantized_layer(in_f, out_f, has_bias, config, device, dtype)
        try:
            layer.quantize_(w)
        except ValueError as error:
            if raw.dtype != dtype and bool(torch.isfinite(raw).all()) and bool(
                    raw.abs().max() > torch.finfo(dtype).max):  # finite as stored: the cast overflowed
                raise ValueError(f"{key_prefix}weight: its {raw.dtype} values overflow {dtype} (largest |value| "
                                 f"{float(raw.abs().max()):.3g}); load the model in a wider dtype, e.g. bfloat16 or "
                                 "float32.") from None
            raise ValueError(f"{key_prefix}weight: {error}") from None
        del w
        if has_bias:
            layer.bias = nn.Parameter(source.get(key_prefix + "bias").to(device=device, dtype=dtype),
                                      requires_grad=False)
    else:
        return
    layer.conv1d = is_conv1d(old) or bool(getattr(old, "conv1d", False))
    replace_module(model, name, layer)


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a checkpoint may set: not the non-persistent ones (rotary tables, GPT-Neo's attention masks),
    which the model computes itself and transformers never reads from a file."""
    return [(name, t) for name, t in model.named_buffers()
            if name.rpartition(".")[2] not in model.get_submodule(name.rpartition(".")[0])._non_persistent_buffers_set]


@torch.no_grad()
def _load(model: ModelSource, source: _Source, config: QuantConfig | None, device, stored_only: bool = False
          ) -> nn.Module:
    model = _build(model)
    device = torch.device(device)
    base = getattr(model, "base_model_prefix", "") or ""
    skipped = set(skipped_linear_names(model, config)) if config is not None else set()
    layer_names = [n for n, m in model.named_modules() if is_dense_linear(m) or isinstance(m, QuantizedLinear)]
    for name in layer_names:
        key_prefix = source.resolve_prefix(name, base)
        if key_prefix is None:
            continue  # tied or absent: reported below if it stays empty
        stored = is_4bit_prefix(source.keys, key_prefix) or is_8bit_prefix(source.keys, key_prefix)
        _load_layer(model, name, source, key_prefix, config, device,
                    quantize_it=not stored and not stored_only and config is not None and name not in skipped)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    keeps_fp32 = _keeps_fp32(model)
    loaded: set[str] = set()  # model tensors that the checkpoint holds
    for name, t in list(model.named_parameters(remove_duplicate=False)) + persistent_buffers(model):
        key = None if name.rpartition(".")[0] in quantized else source.resolve(name, base)
        if key is not None:
            _replace(model, name, source.get(key), device, t.is_floating_point() and keeps_fp32(name, t.dtype))
        if key is not None or name.rpartition(".")[0] in quantized:
            loaded.add(name)
    _tie_weights(model, loaded)
    _init_new_parts(model, device, loaded)
    empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if empty:
        raise ValueError(f"the checkpoint has no tensor for {len(empty)} model entries, e.g. {empty[:5]}; "
                         "is it the checkpoint of this architecture?")
    unused = sorted(source.keys - source.used)
    if unused:
        logger.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:5])
    return model.to(device)


def _init_new_parts(model: nn.Module, device: torch.device, loaded: set[str]) -> None:
    """A part the checkpoint does not hold at all (a classifier on a language model's checkpoint, the usual start of
    a SEQ_CLS / TOKEN_CLS fine-tune; a masked LM's pooler) is initialized as ``from_pretrained`` does it, with its
    warning; a missing LM head, or a tensor missing beside stored ones, stays an error (:func:`new_part`)."""
    init = getattr(model, "_init_weights", None)
    if not callable(init):
        return
    empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    held, parts = (held_parts(loaded), checkpoint_class_parts(model)) if empty else (set(), set())
    new = sorted({part for name in empty if (part := new_part(model, name, held, parts)) is not None})
    for name in new:
        module = model.get_submodule(name)
        module.to_empty(device=device)
        module.apply(init)
    if new:
        logger.warning("%s not in the checkpoint: newly initialized (as transformers does for a new task head); train "
                       "it (modules_to_save, the default for SEQ_CLS/TOKEN_CLS)", ", ".join(new))


def _tie_weights(model: nn.Module, loaded: set[str]) -> None:
    """Tie the weights the config ties, as ``from_pretrained`` does: a tied weight the checkpoint stores with
    different values (a config that says tie_word_embeddings but a checkpoint with its own head) is kept."""
    tie = getattr(model, "tie_weights", None)
    if not callable(tie):
        return
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    if "missing_keys" in inspect.signature(tie).parameters and hasattr(model, "all_tied_weights_keys"):
        tie(missing_keys=names - loaded, recompute_mapping=False)  # transformers 5: checks every tied pair
        return
    heads = [getattr(model, f"get_{side}_embeddings", lambda: None)() for side in ("output", "input")]
    where = {id(m): n for n, m in model.named_modules()}
    head, embedding = [f"{where[id(m)]}.weight" if m is not None and id(m) in where else "" for m in heads]
    if {head, embedding} <= loaded and not torch.equal(model.get_parameter(head), model.get_parameter(embedding)):
        logger.warning("the config ties %s to %s but the checkpoint stores both, with different values: they are "
                       "kept apart (as transformers does)", head, embedding)
        return
    tie()


def load_quantized(model: ModelSource, paths: str | os.PathLike | list, config: QuantConfig | None = None,
                   device: torch.device | str = "cpu", stored_only: bool = False) -> nn.Module:
    """Build ``model`` (an empty module or a function that builds one) from safetensors file(s)/folder.

    Full-precision linear weights are quantized with ``config`` as they are read (layers named in
    ``config.skip_modules`` and the output head stay full precision); layers stored quantized
    (slimtune or transformers+bitsandbytes checkpoints) are loaded as they are, ``config`` optional (its compute
    dtype). ``stored_only``: a quantized checkpoint's full-precision layers stay so, as its producer kept them.
    """
    with contextlib.ExitStack() as stack:
        source = _Source(files=safetensors_files(paths), stack=stack)
        built = _build(model)
        source.follow_renames(built)
        if stored_only and not any(is_4bit_prefix(source.keys, p) or is_8bit_prefix(source.keys, p)
                                   for p in {k.rpartition("weight")[0] for k in source.keys if k.endswith("weight")}):
            raise ValueError(f"{paths}: config.json says bitsandbytes quantized this checkpoint "
                             "(quantization_config), but no layer in its weights is stored quantized; remove "
                             "quantization_config from config.json, or restore the checkpoint's quantized weights")
        return _load(built, source, config, device, stored_only)


def load_in_4bit(model: ModelSource, paths: str | os.PathLike | list, config: QuantConfig | None = None,
                 device: torch.device | str = "cpu") -> nn.Module:
    """:func:`load_quantized` with a 4-bit ``config`` (default: NF4 + double quant, blocksize 64)."""
    config = config or QuantConfig()
    if config.bits != 4:
        raise ValueError(f"load_in_4bit needs a 4-bit config, got bits={config.bits}; use load_quantized")
    return load_quantized(model, paths, config, device)


def load_quantized_from_state_dict(model: ModelSource, state_dict: Mapping[str, torch.Tensor],
                                   config: QuantConfig | None = None,
                                   device: torch.device | str = "cpu") -> nn.Module:
    """:func:`load_quantized` from an in-memory state dict (full precision or quantized)."""
    source, built = _Source(tensors=state_dict), _build(model)
    source.follow_renames(built)
    return _load(built, source, config, device)


def init_random_quantized(model: ModelSource, config: QuantConfig | None, device: torch.device | str = "cpu",
                          std: float = 0.02, seed: int = 0) -> nn.Module:
    """Fill ``model`` (an empty module or a function that builds one) with random weights, layer by layer,
    quantizing linear weights with ``config`` as they are made: a model of any size that fits in its
    quantized form can be built without its weights on disk (benchmarks). See :class:`_RandomSource`."""
    built = _build(model)
    device = torch.device(device)
    return _load(built, _RandomSource(built, std, seed, device), config, device)
