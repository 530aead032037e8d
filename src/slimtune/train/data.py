"""Training data: read user datasets (or the built-in ``pycode``) into normalized examples.

A normalized example is a dict with ``prompt`` (str) and ``response`` (str), and optionally
``system`` (str) and ``history`` (earlier turns, ``[{"role": "user"|"assistant", "content": str}]``).
The loss is put on ``response`` only (see :mod:`slimtune.train.tokenization`). A plain-text example is
``{"text": str}``: no template, the loss on every token (continued pre-training on documents).

Accepted rows (JSONL / JSON / CSV / TSV files, in-memory lists, HF ``datasets``):

- ``{"prompt": ..., "response": ...}`` (``completion`` or ``output`` also name the response);
- Alpaca style ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` is appended to the
  instruction after a blank line when non-empty), and Databricks Dolly's ``{"instruction", "context",
  "response"}`` (``context`` likewise);
- chat ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` ending with an
  assistant turn: the last assistant turn is the response, the user turn before it the prompt,
  earlier turns the history, a leading system turn the system prompt; only the last assistant turn
  is trained (a ``content`` may also be a list of ``{"type": "text", "text": ...}`` parts); TRL's
  conversational ``{"prompt": [messages], "completion": [messages]}`` is read as the joined messages;
- ShareGPT ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}`` (``role`` /
  ``content`` and ``user`` / ``assistant`` are read too): normalized like chat, plus
  ``"train_all_turns": True``, so that *every* assistant turn carries the loss (see
  :func:`slimtune.train.templates.encode_conversation`); turns after the last assistant turn are dropped;
- an optional ``system`` field on the non-chat forms (and on ShareGPT rows);
- plain text ``{"text": ...}`` (the field TRL, torchtune's text-completion datasets and HF's ``text``
  loader use), when a row has none of the fields above; a ``.txt`` file is one such example per
  non-blank line, as ``datasets.load_dataset("text", ...)`` reads it.

Files: JSONL / JSON / CSV / TSV / TXT, and, with ``datasets`` installed (it brings ``pyarrow``), Parquet
(``.parquet``), Arrow (``.arrow``, stream or file format) and ``save_to_disk`` folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.core.optional import OptionalModule
from slimtune.errors import DataError
from slimtune.train.examples import TEXT_KEY, normalize_example
from slimtune.train.pycode import VALIDATION_FRACTION, alpaca_row, build_pycode

# optional: Hugging Face datasets (save_to_disk folders, hub ids)
datasets: OptionalModule | Any = OptionalModule("datasets", "pip install datasets")

# Optional and heavy (pyarrow + pandas: ~100 MB resident): imported only when a run reads such data.
pyarrow_parquet: OptionalModule | None = OptionalModule("pyarrow.parquet", "pip install datasets (or pyarrow)")
pyarrow_ipc: OptionalModule | None = OptionalModule("pyarrow.ipc", "pip install datasets (or pyarrow)")

BUILTIN_DATASETS = ("pycode", "pycode-alpaca")
SPLITS = ("train", "validation", "all")
# A source's held-out split, by the names datasets use for it, in order of preference (TRL evaluates on "test").
HELD_OUT_SPLITS = ("validation", "valid", "val", "dev", "eval", "test")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".txt": "txt",
           ".parquet": "parquet", ".arrow": "arrow"}
def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a leading BOM dropped); bytes that are not UTF-8 are a :class:`DataError` naming
    the line."""
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty; it needs rows (one example each).")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}: line {line}: byte 0x{data[error.start]:02x} (at offset {error.start}) is not "
                        "valid UTF-8; save the file as UTF-8.") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}: line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid JSON ({error.msg} at column "
                            f"{error.colno}).") from None
        except RecursionError:
            raise DataError(f"{path}: line {number}: JSON nested too deeply to read.") from None


def _read_json(path: Path, split: str) -> tuple[Iterator[tuple[str, Any]], bool]:
    """Rows of a JSON file; the flag says whether the file itself named the split (no hash split then)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}).") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read.") from None
    named_split = False
    if isinstance(data, Mapping):
        lists = sorted(k for k, v in data.items() if isinstance(v, list))
        if isinstance(data.get("data"), list) and "train" not in lists:
            data = data["data"]
        elif {"train", *HELD_OUT_SPLITS} & set(lists) or (split == "all" and data and len(lists) == len(data)):
            names, named_split = pick_splits(lists, split, str(path))
            data = [row for name in names for row in data[name]]
        else:
            raise DataError(
                f"{path}: expected a JSON list of rows, or an object with named lists of rows ('train', and "
                f"'validation' or 'test') or a 'data' list; found an object with keys {sorted(data)[:20]}."
            )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}.")
    return ((f"{path}: item {i}", row) for i, row in enumerate(data, start=1)), named_split


CSV_FIELD_LIMIT = 1 << 30  # characters per cell (the csv module's default, 131072, refuses long examples)


def _read_txt(path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if line.strip():
            yield f"{path}: line {number}", {TEXT_KEY: line.rstrip("\n")}


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV/TSV file, each named by its first line, read strictly: a quote left open is an error, not a
    field running on over every later line (a lenient reader turns the rest of the file into one example), and
    so is a stray quote inside a field (write it doubled, ``""``, inside a quoted field)."""
    text = _read_text(path)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, CSV_FIELD_LIMIT))
    try:
        return iter(_csv_rows(text, path, delimiter))
    except csv.Error as error:
        kind = "CSV" if delimiter == "," else "TSV"
        why = "opens a quote that never closes (it would swallow every later line); close it" \
            if "end of data" in str(error.args[0]) else \
            f"is not readable as {kind} ({error.args[0]}): a quote inside a field must be doubled (\"\") and the " \
            "field quoted"
        raise DataError(f"{path}: line {error.args[1]}: the row starting here {why}.") from None
    finally:
        csv.field_size_limit(limit)


def _csv_rows(text: str, path: Path, delimiter: str) -> list[tuple[str, Any]]:
    """The rows, read strictly, or a ``csv.Error(message, line where the bad row starts)``."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = list(reader.fieldnames or [])
    except csv.Error as error:
        raise csv.Error(str(error), 1) from None
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:  # DictReader would keep the last column of each name without a word
        raise DataError(f"{path}: line 1: the header names {twice} more than once; give each column its own name.")
    rows: list[tuple[str, Any]] = []
    start = 2  # line of the first record, after the header
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as error:
            raise csv.Error(str(error), start) from None
        # Keep only named columns: a ragged row puts its extra cells under the key None.
        rows.append((f"{path}: line {start}", {k: v for k, v in row.items() if k is not None}))
        start = reader.line_num + 1


def _read_arrow_table(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet or Arrow file (pyarrow, installed with ``datasets``)."""
    if not pyarrow_parquet or not pyarrow_ipc:
        raise DataError(f"{path}: reading .{fmt} files needs pyarrow: `pip install datasets` (or pyarrow).")
    try:
        if fmt == "parquet":
            table = pyarrow_parquet.read_table(path)
        else:
            try:  # the Arrow IPC file format (Feather v2) ...
                table = pyarrow_ipc.open_file(path).read_all()
            except Exception:  # noqa: BLE001 - ... or the stream format datasets' save_to_disk writes
                table = pyarrow_ipc.open_stream(path).read_all()
    except Exception as error:  # noqa: BLE001 - pyarrow raises its own error types
        raise DataError(f"{path}: not a readable {fmt} file ({type(error).__name__}: {error}).") from None
    return ((f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist(), start=1))


def _example_key(example: Mapping[str, Any]) -> str:
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def split_examples(
    examples: Sequence[dict[str, Any]], split: str, validation_fraction: float = VALIDATION_FRACTION
) -> list[dict[str, Any]]:
    """Deterministic train/validation split by a SHA-256 hash of each example's content.

    Duplicated rows land in the same split, so validation never contains a training example.
    """
    if split == "all":
        return list(examples)
    threshold = validation_fraction * 1_000_000

    def is_val(ex: Mapping[str, Any]) -> bool:
        digest = hashlib.sha256(_example_key(ex).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") % 1_000_000 < threshold

    return [ex for ex in examples if is_val(ex) == (split == "validation")]


def pick_splits(names: Sequence[str], split: str, source: str) -> tuple[list[str], bool]:
    """Which of a source's named splits ``split`` reads, and whether they ARE that split (False: the source
    names no held-out split, so its ``train`` rows are split by content hash like a file's).

    ``train`` reads ``train``; ``validation`` the first of :data:`HELD_OUT_SPLITS` the source has; ``all``
    every split, in name order.
    """
    if split == "all":
        return sorted(names), True
    held_out = next((n for n in HELD_OUT_SPLITS if n in names), None)
    if split == "validation" and held_out is not None:
        return [held_out], True
    if "train" in names:
        return ["train"], held_out is not None
    raise DataError(f"Dataset {source!r} has no {split!r} split: it has {sorted(names)}. Name its splits 'train' "
                    f"and 'validation' (or 'test'), or read it whole: give it as data.eval_dataset, or pass "
                    f"--split all to `slimtune eval`.")


def _load_hf(source: str, split: str) -> tuple[Iterable[tuple[str, Any]], bool]:
    """Rows of a Hugging Face dataset (a ``save_to_disk`` folder or a hub id; needs ``datasets``), and whether
    the dataset named the split (see :func:`pick_splits`)."""
    if not datasets:
        raise FileNotFoundError(
            f"Dataset {source!r} is not a file, and it is not the built-in {list(BUILTIN_DATASETS)}. Pass a "
            f"{'/'.join(sorted(FORMATS))} file, or `pip install datasets` to load Hugging Face datasets."
        )
    try:
        if Path(source).is_dir():
            data = datasets.load_from_disk(source)
        else:
            data = datasets.load_dataset(source)
    except Exception as error:  # offline hub, unknown id, missing split: all need the same advice
        raise FileNotFoundError(
            f"Could not load dataset {source!r} with `datasets` ({type(error).__name__}: {error}). Pass a local "
            f"{'/'.join(sorted(FORMATS))} file, a `save_to_disk` folder, or {list(BUILTIN_DATASETS)}."
        ) from error
    named = False
    if isinstance(data, Mapping):  # DatasetDict: the named split(s)
        names, named = pick_splits(list(data), split, source)
        parts = [(name, data[name]) for name in names]
    else:  # one Dataset: a single set of rows
        parts = [("rows", data)]
    return ((f"{source} [{name}] row {i}", row) for name, part in parts for i, row in enumerate(part)), named


@dataclass(frozen=True)
class DatasetView:
    """Rows of ``source`` with the prompt rendered from their columns: a dataset string that is a JSON object
    ``{"source": ..., "prompt": "<template>", "response": "<column>", "system": "<template>"}`` (what a Ludwig
    config's ``prompt.template`` and output feature become, and a way to train on any column names).

    Templates are Python format strings over the row's columns (``{instruction}``; ``{{`` for a literal
    brace); ``response`` names the column holding the answer (default ``"response"``).
    """

    source: str
    prompt: str
    response: str = "response"
    system: str | None = None

    @classmethod
    def parse(cls, text: str) -> DatasetView:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"dataset {text[:80]!r}: not a valid JSON view object ({error.msg}).") from None
        fields = {"source", "prompt", "response", "system"}
        if not isinstance(spec, dict) or not {"source", "prompt"} <= set(spec) or set(spec) - fields or not all(
                isinstance(v, str) for v in spec.values()):
            raise DataError(f"dataset view {text[:80]!r} must be a JSON object with string fields 'source' and "
                             f"'prompt' (and optionally 'response', 'system'); got {spec!r:.120}.")
        return cls(**spec)

    def apply(self, row: Any, where: str) -> dict[str, Any]:
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with columns, got {type(row).__name__}.")
        values = {k: "" if v is None else v for k, v in row.items()}
        try:
            needed = [f for t in (self.prompt, self.system or "") for _, f, _, _ in string.Formatter().parse(t) if f]
        except ValueError as error:
            raise DataError(f"{where}: the dataset view's template is not a format string ({error}).") from None
        missing = sorted({f for f in needed if f not in values} | ({self.response} - set(values)))
        if missing:
            raise DataError(f"{where}: the dataset view needs columns {missing}; the row has {sorted(values)}.")
        try:
            out = {"prompt": self.prompt.format_map(values), "response": values[self.response]}
            return out if self.system is None else {**out, "system": self.system.format_map(values)}
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as error:
            raise DataError(f"{where}: the dataset view's template {self.prompt!r:.80} cannot be filled from the "
                            f"row ({type(error).__name__}: {error}); use plain {{column}} fields.") from None


def _builtin(name: str, split: str, validation_fraction: float) -> Iterable[tuple[str, Any]]:
    """Rows of a built-in dataset, split by pycode's example ids."""
    rows = build_pycode(split, validation_fraction=validation_fraction)
    return ((f"{name} {ex['id']}", ex if name == "pycode" else alpaca_row(ex)) for ex in rows)


def _rows(source: str | os.PathLike | Sequence[Mapping[str, Any]], split: str,
          validation_fraction: float) -> tuple[str, Iterable[tuple[str, Any]], bool]:
    """``(name, (where, row) pairs, whether the source named the split itself)``."""
    if not isinstance(source, (str, os.PathLike)):
        return "in-memory examples", ((f"example {i}", row) for i, row in enumerate(source)), False
    name = os.fspath(source)
    if name in BUILTIN_DATASETS:
        return name, _builtin(name, split, validation_fraction), True
    path = Path(name).expanduser()
    if path.is_file():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"Dataset file {name!r} has an unknown format {path.suffix!r}; use one of "
                f"{sorted(FORMATS)} with prompt/response, messages or text fields."
            )
        if fmt == "json":
            return (name, *_read_json(path, split))
        if fmt == "jsonl":
            return name, _read_jsonl(path), False
        if fmt == "txt":
            return name, _read_txt(path), False
        if fmt in ("parquet", "arrow"):
            return name, _read_arrow_table(path, fmt), False
        return name, _read_csv(path, "," if fmt == "csv" else "\t"), False
    if path.is_dir() or ("/" in name and not name.startswith((".", "/", "~")) and path.suffix.lower() not in FORMATS):
        return (name, *_load_hf(name, split))  # a save_to_disk folder or an "owner/name" hub id
    raise FileNotFoundError(
        f"Dataset {name!r} does not exist. Pass an existing {'/'.join(sorted(FORMATS))} file, "
        f"or the built-in {list(BUILTIN_DATASETS)}."
    )


def check_source(source: str) -> tuple[str, bool]:
    """``(what the dataset is, whether it is on this machine)``, checked without reading rows or downloading:
    what `slimtune train --dry-run` reports. Raises like :func:`load_examples` for a missing file."""
    if source in BUILTIN_DATASETS:
        return f"{source} (built-in, made from this Python's standard library)", True
    if source.lstrip().startswith("{"):
        view = DatasetView.parse(source)
        what, local = check_source(view.source)
        return f"{what}, the prompt rendered from its columns, the answer from {view.response!r}", local
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise DataError(f"Dataset file {source!r} has an unknown format {path.suffix!r}; use one of "
                             f"{sorted(FORMATS)}.")
        return f"{path} ({path.stat().st_size:,} bytes)", True
    if path.is_dir():
        return f"{path} (a datasets save_to_disk folder)", True
    if "/" in source and not source.startswith((".", "/", "~")) and path.suffix.lower() not in FORMATS:
        if not datasets:
            raise FileNotFoundError(f"Dataset {source!r} is a hub id: `pip install datasets` to load it.")
        return f"{source} (Hugging Face hub: downloaded when training starts, not checked offline)", False
    raise FileNotFoundError(f"Dataset {source!r} does not exist. Pass an existing {'/'.join(sorted(FORMATS))} file, "
                            f"or the built-in {list(BUILTIN_DATASETS)}.")


def load_examples(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    split: str = "all",
    validation_fraction: float = VALIDATION_FRACTION,
    max_examples: int | None = None,
    hash_split: bool = True,
) -> list[dict[str, Any]]:
    """Load normalized examples from ``source``.

    Args:
        source: ``"pycode"`` or ``"pycode-alpaca"`` (built-in), a ``.jsonl``/``.ndjson``/``.json``/``.csv``/
            ``.tsv``/``.txt`` file, an in-memory list of rows, with ``datasets`` installed a ``.parquet``/``.arrow``
            file, a ``save_to_disk`` folder or a hub dataset id, or a JSON :class:`DatasetView` of any of these.
        split: ``"all"``, ``"train"`` or ``"validation"``. A file or list holds one set of rows: its
            train/validation split is by content hash (``validation_fraction`` of the rows). A JSON
            object of named lists (``{"train": [...], "validation": [...]}``) and HF datasets name
            their own splits (the held-out one may also be called ``test``, ``dev``, ...; ``"all"`` joins
            them; one that names only ``train`` has its train rows split by hash); the built-ins split by
            pycode's example ids.
        validation_fraction: share of rows in the hash-based validation split.
        max_examples: keep the first N examples (in file order) after splitting.
        hash_split: False when the other split comes from elsewhere (a recipe's ``data.eval_dataset``): a
            source that names no splits is then read whole, one that names them still gives ``split``.

    Raises:
        FileNotFoundError: the file does not exist (and is not a loadable dataset name).
        ValueError: unknown format, empty dataset or split, or a row without the needed fields
            (the message gives the file, the line or item number, and the fields it has).
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is unknown; use one of {list(SPLITS)}.")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples={max_examples!r} must be a positive integer or None.")
    if isinstance(source, str) and source == "pycode":
        return build_pycode(split, max_examples=max_examples, validation_fraction=validation_fraction)
    view = DatasetView.parse(source) if isinstance(source, str) and source.lstrip().startswith("{") else None
    name, rows, named_split = _rows(view.source if view else source, split, validation_fraction)
    if view is not None:
        rows = ((where, view.apply(row, where)) for where, row in rows)
    examples = [normalize_example(row, where) for where, row in rows]
    if not examples:
        of = f"Split {split!r} of dataset {name!r}" if named_split and split != "all" else f"Dataset {name!r}"
        raise DataError(f"{of} is empty: it has no rows.")
    if not named_split and hash_split:
        examples = split_examples(examples, split, validation_fraction)
        if not examples:
            change = "raise" if split == "validation" else "lower"
            raise DataError(
                f"Split {split!r} of dataset {name!r} is empty (validation_fraction={validation_fraction}): in a "
                f"recipe, {change} data.validation_fraction or give data.eval_dataset; with `slimtune eval`, pass "
                f"--split all to read every row."
            )
    return examples[:max_examples] if max_examples is not None else examples
