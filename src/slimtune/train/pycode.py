"""The built-in ``pycode`` dataset: instruction → code pairs mined from the local Python stdlib.

Every pure-Python standard library module under ``sysconfig.get_paths()["stdlib"]`` is read and
parsed with :mod:`ast` (never imported, so nothing runs). Each documented public top-level function,
and each documented public method of a public top-level class, becomes one example:

- ``prompt``: "Write a Python function `quote(s)` for the `shlex` module. It should do the
  following: <first paragraph of the docstring>" (methods name their class).
- ``response``: the function's source code, decorators included, **without its docstring** — the
  docstring's summary is already in the prompt, and leaving it out keeps the loss on code rather
  than on prose the model could copy from its input. Methods are dedented to column 0.

Filters keep examples useful and small: summary of 4-120 words, 2-60 lines of code, a body that
does something (not just ``pass`` / ``...`` / ``raise NotImplementedError``), code that re-parses,
no duplicate responses. The module list is the sorted walk of the stdlib folder minus tests,
private (``_x``) modules, GUI/demo packages and ``site-packages``; examples are sorted by id
(``module.qualname``) and split train/validation by a SHA-256 hash of the id, so the dataset is the
same on every run on a given Python version (≈ 4,000 examples on CPython 3.11, 5 % validation).

``pycode-alpaca`` is the same examples in Alpaca's fields (those of flytech/python-codes-25k):
``instruction`` = the task sentence, ``input`` = the docstring summary, ``output`` = the code
(:func:`alpaca_row`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tokenize
from pathlib import Path

from slimtune.core.files import atomic_file, cache_root

VALIDATION_FRACTION = 0.05
MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_WORDS = 120
MIN_CODE_LINES = 2
MAX_CODE_LINES = 60
SPLITS = ("train", "validation", "all")
TASK_SEPARATOR = " It should do the following: "  # between the prompt's task sentence and the docstring summary
logger = logging.getLogger("slimtune")

# Folders that hold tests, GUI/demo code, vendored wheels or third-party packages rather than
# the library API a code model should learn from.
_SKIP_DIRS = frozenset(
    {
        "site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
        "lib2to3", "ensurepip", "turtledemo", "idlelib", "pydoc_data",
    }
)
_SKIP_FILES = frozenset({"__main__.py", "this.py", "antigravity.py"})


def stdlib_module_files(root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Return ``(module_name, file)`` for the pure-Python stdlib modules, sorted by module name.

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]`` of the running interpreter.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(
            f"Python standard library folder {str(base)!r} does not exist; the pycode dataset is "
            f"built from it. Use a CPython install that ships its .py sources, or pass your own data."
        )
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        # Pruning in place stops os.walk from descending; sorting keeps the walk order stable.
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(("_", ".", "config-"))
        )
        rel = Path(dirpath).relative_to(base)
        for filename in sorted(filenames):
            private = filename.startswith("_") and filename != "__init__.py"
            if not filename.endswith(".py") or filename in _SKIP_FILES or private:
                continue
            parts = list(rel.parts) + [filename[:-3]]
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                found.append((".".join(parts), Path(dirpath) / filename))
    return sorted(found)


def _summary(docstring: str) -> str:
    """First paragraph of a cleaned docstring, on one line; skips a leading C-style signature."""
    paragraphs = [" ".join(p.split()) for p in docstring.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if len(paragraphs) > 1 and "(" in paragraphs[0].split(" ")[0]:
        # e.g. "f(x, y) -> int" as the first line: the description is the next paragraph.
        paragraphs = paragraphs[1:]
    return paragraphs[0] if paragraphs else ""


def _is_trivial(body: list[ast.stmt]) -> bool:
    """True when a body (after its docstring) is only ``pass`` / ``...`` / ``raise NotImplementedError``."""
    if not body:
        return True
    for stmt in body:
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if isinstance(stmt, ast.Raise) and stmt.exc is not None:
            exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


def _code_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """Source of ``node`` (decorators included) with its docstring lines cut, dedented; or None.

    None when the docstring shares a line with other code, which line-based cutting would break.
    """
    doc = node.body[0]
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    assert doc.end_lineno is not None and doc.end_col_offset is not None and node.end_lineno is not None
    if lines[doc.lineno - 1][: doc.col_offset].strip() or lines[doc.end_lineno - 1][doc.end_col_offset:].strip():
        return None
    if len(node.body) > 1 and node.body[1].lineno <= doc.end_lineno:
        return None
    head = lines[start - 1 : doc.lineno - 1]
    rest = lines[doc.end_lineno : node.end_lineno]
    while rest and not rest[0].strip():  # the blank line that usually follows a docstring
        rest.pop(0)
    indent = lines[node.lineno - 1][: node.col_offset]
    # Strip exactly the def's indentation: textwrap.dedent would stop at less-indented lines
    # inside multi-line strings and leave the whole method indented.
    code = [line[len(indent):] if line.startswith(indent) else line for line in head + rest]
    return "\n".join(code).rstrip() + "\n"


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{node.name}({ast.unparse(node.args)}){returns}"


def _example(module: str, node: ast.AST, lines: list[str], cls: str | None) -> dict[str, str] | None:
    """One prompt/response pair for a function or method node, or None if it fails a filter."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
        return None
    docstring = ast.get_docstring(node, clean=True)
    if not docstring:
        return None
    summary = _summary(docstring)
    if not MIN_SUMMARY_WORDS <= len(summary.split()) <= MAX_SUMMARY_WORDS or _is_trivial(node.body[1:]):
        return None
    code = _code_without_docstring(node, lines)
    if code is None or not MIN_CODE_LINES <= code.count("\n") <= MAX_CODE_LINES:
        return None
    try:
        ast.parse(code)
    except SyntaxError:
        return None
    kind = "async " if isinstance(node, ast.AsyncFunctionDef) else ""
    if cls is None:
        what = f"a Python {kind}function `{_signature(node)}` for the `{module}` module"
    else:
        what = f"the {kind}method `{_signature(node)}` of the class `{cls}` in the `{module}` module"
    qualname = node.name if cls is None else f"{cls}.{node.name}"
    return {
        "prompt": f"Write {what}.{TASK_SEPARATOR}{summary}",
        "response": code,
        "id": f"{module}.{qualname}",
    }


def _module_examples(module: str, path: Path) -> list[dict[str, str]]:
    try:
        with tokenize.open(path) as fh:  # honours PEP 263 encoding cookies
            source = fh.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []  # a file this interpreter cannot parse is simply not part of the dataset
    lines = source.splitlines()
    out: list[dict[str, str] | None] = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            out.extend(_example(module, sub, lines, node.name) for sub in node.body)
        else:
            out.append(_example(module, node, lines, None))
    examples = [e for e in out if e is not None]
    seen: dict[str, int] = {}
    for ex in examples:  # a property and its setter share a name: keep ids unique ("x", "x#2")
        seen[ex["id"]] = seen.get(ex["id"], 0) + 1
        if seen[ex["id"]] > 1:
            ex["id"] += f"#{seen[ex['id']]}"
    return examples


def is_validation(example_id: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Deterministic split: SHA-256 of the id, not ``hash()`` (salted per process) nor a RNG."""
    digest = int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big")
    return digest % 1_000_000 < fraction * 1_000_000


def _scan(files: list[tuple[str, Path]]) -> list[dict[str, str]]:
    seen: set[str] = set()
    examples = []
    for module, path in files:
        for ex in _module_examples(module, path):
            if ex["response"] not in seen:  # identical copies (e.g. compat shims) count once
                seen.add(ex["response"])
                examples.append(ex)
    examples.sort(key=lambda e: e["id"])
    return examples


def _own_source_digest() -> str:
    # Any edit to this module's filters or format invalidates caches written by the old code.
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _cache_file(root: Path, files: list[tuple[str, Path]]) -> Path:
    """Cache file whose name hashes everything the result depends on (so stale files are never read)."""
    stats = [(name, p.stat().st_size, p.stat().st_mtime_ns) for name, p in files]
    key = json.dumps([sys.version, str(root), stats, _own_source_digest()])
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    return cache_root() / "datasets" / f"pycode-{digest}.json"


def pycode_examples(stdlib_root: str | os.PathLike | None = None, cache: bool = True) -> list[dict[str, str]]:
    """Every pycode example (both splits), sorted by id, as ``{"prompt", "response", "id"}`` dicts.

    With ``cache=True`` the result is stored as JSON under ``<cache root>/datasets/`` (see
    :func:`slimtune.core.files.cache_root`), keyed by the interpreter version and the size and
    mtime of every source file: parsing the stdlib takes several seconds on a small CPU, reading
    the cache a fraction of one. The file is written atomically (temp file, then rename).
    """
    root = Path(stdlib_root if stdlib_root is not None else sysconfig.get_paths()["stdlib"])
    files = stdlib_module_files(root)
    if not cache:
        return _scan(files)
    path = _cache_file(root, files)
    try:
        with open(path, encoding="utf-8") as fh:
            return [{"prompt": prompt, "response": response, "id": id_} for id_, prompt, response in json.load(fh)]
    except (OSError, ValueError):
        pass  # missing or unreadable (e.g. truncated by a crash elsewhere): rebuild it
    examples = _scan(files)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps([[e["id"], e["prompt"], e["response"]] for e in examples]), encoding="utf-8")
    except OSError as error:  # e.g. a read-only home: the data is still good, just not cached
        logger.warning("Could not cache the pycode dataset in %s (%s); it will be rebuilt next time.", path, error)
    return examples


@functools.lru_cache(maxsize=4)
def _memo(root: str | None) -> tuple[tuple[tuple[str, str], ...], ...]:
    # Frozen as tuples so the value shared by later calls cannot be mutated by a caller.
    return tuple(tuple(e.items()) for e in pycode_examples(root))


def build_pycode(
    split: str = "train",
    max_examples: int | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    stdlib_root: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Build the pycode dataset: a list of ``{"prompt", "response", "id"}`` dicts sorted by id.

    Args:
        split: ``"train"``, ``"validation"`` (``validation_fraction`` of the ids, by hash) or ``"all"``.
        max_examples: keep only the first N examples of the split (deterministic, in id order).
        validation_fraction: share of examples in the validation split, in [0, 1).
        stdlib_root: stdlib folder to read instead of the running interpreter's (mainly for tests).

    The first build parses ~520 files (~8 s on a 2-core CPU); it is then cached on disk (see
    :func:`pycode_examples`) and in memory.
    """
    if split not in SPLITS:
        raise ValueError(f"pycode split {split!r} is unknown; use one of {list(SPLITS)}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be in [0, 1).")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples!r} must be a positive integer or None.")
    rows = [dict(items) for items in _memo(None if stdlib_root is None else str(stdlib_root))]
    if split != "all":
        want_val = split == "validation"
        rows = [r for r in rows if is_validation(r["id"], validation_fraction) == want_val]
    return rows[:max_examples] if max_examples is not None else rows


def alpaca_row(example: dict[str, str]) -> dict[str, str]:
    """A pycode example in Alpaca's fields: ``{"instruction", "input", "output", "id"}``.

    ``instruction`` is the prompt's first sentence ("Write a Python function `quote(s)` for the `shlex`
    module."), ``input`` the docstring summary, ``output`` the code, so Alpaca's usual rendering
    ``instruction + "\\n\\n" + input`` says what the pycode prompt says.
    """
    instruction, _, summary = example["prompt"].partition(TASK_SEPARATOR)
    return {"instruction": instruction, "input": summary, "output": example["response"], "id": example["id"]}
