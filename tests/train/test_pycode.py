"""The built-in pycode dataset: determinism, split, format, filters and the disk cache."""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap

import pytest

from slimtune.train import pycode
from slimtune.train.data import load_examples
from slimtune.train.pycode import build_pycode, pycode_examples


@pytest.fixture(scope="module")
def everything():
    return build_pycode("all")  # built fresh: conftest points SLIMTUNE_CACHE at an empty folder


def test_build_is_identical_across_processes(everything, pycode_child):
    out, _ = pycode_child.communicate(timeout=300)  # conftest started it at the beginning of the session
    assert pycode_child.returncode == 0
    assert hashlib.sha256(json.dumps(everything).encode()).hexdigest() == out.strip()
    assert 2000 <= len(everything) <= 8000, "a few thousand examples"
    assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)


def test_splits_are_disjoint_and_cover_everything(everything):
    train, val = build_pycode("train"), build_pycode("validation")
    train_ids, val_ids = {e["id"] for e in train}, {e["id"] for e in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {e["id"] for e in everything}
    assert 0.03 < len(val) / len(everything) < 0.07  # 5 % by hash
    assert len({e["response"] for e in everything}) == len(everything)  # no duplicate responses
    assert len({e["id"] for e in everything}) == len(everything)


def test_examples_are_well_formed(everything):
    for ex in everything:
        assert ex["prompt"].startswith("Write ") and "It should do the following: " in ex["prompt"]
        tree = ast.parse(ex["response"])
        func = tree.body[0]
        assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and not func.name.startswith("_")
        assert ast.get_docstring(func) is None, f"{ex['id']}: the docstring stays out of the response"
        assert 2 <= ex["response"].count("\n") <= pycode.MAX_CODE_LINES
    quote = next(e for e in everything if e["id"] == "shlex.quote")
    assert quote["prompt"].startswith("Write a Python function `quote(s)` for the `shlex` module.")
    assert "shell-escaped" in quote["prompt"] and quote["response"].startswith("def quote(s):\n")


def test_alpaca_fields_say_what_the_prompt_says(everything):
    """pycode-alpaca: flytech/python-codes-25k's fields (instruction / input / output), same examples and split."""
    for ex in everything:
        row = pycode.alpaca_row(ex)
        assert row["instruction"].startswith("Write ") and row["instruction"].endswith(".") and row["input"]
        assert row["instruction"] + " It should do the following: " + row["input"] == ex["prompt"]
        assert (row["output"], row["id"]) == (ex["response"], ex["id"])
    quote = pycode.alpaca_row(next(e for e in everything if e["id"] == "shlex.quote"))
    assert quote["instruction"] == "Write a Python function `quote(s)` for the `shlex` module."
    val = load_examples("pycode-alpaca", split="validation")
    assert [e["response"] for e in val] == [e["response"] for e in build_pycode("validation")]
    assert val[0]["prompt"] == "\n\n".join(pycode.alpaca_row(build_pycode("validation")[0])[k] for k in ("instruction",
                                                                                                         "input"))


def test_max_examples_and_bad_arguments():
    assert build_pycode("train", max_examples=5) == build_pycode("train")[:5]
    with pytest.raises(ValueError, match="split 'test' is unknown"):
        build_pycode("test")
    with pytest.raises(ValueError, match="max_examples=0"):
        build_pycode(max_examples=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_pycode(stdlib_root="/nonexistent/stdlib")


FAKE_MODULE = '''\
"""A fake stdlib module."""


def documented(a, b=2, *args, key: int = 0) -> int:
    """Add two numbers together and return them.

    More text that is not part of the summary.
    """

    total = a + b
    return total + key


def undocumented(x):
    return x


def _private(x):
    """Return x, but this function is private."""
    return x


def stub(x):
    """This function only has a stub body."""
    raise NotImplementedError


def terse(x):
    """Too short."""
    return x


@staticmethod
def decorated(x):
    """Return the value doubled for testing decorators."""
    return x * 2


async def fetch(url):
    """Fetch the given url asynchronously and return it."""
    return await url


def long_one(x):
    """This function body is far too long to keep."""
''' + "".join(f"    x += {i}\n" for i in range(61)) + '''    return x


class Public:
    """A class."""

    def method(self, text):
        """Return the text with a fixed prefix added."""
        return """prefix
""" + text

    @property
    def size(self):
        """Return the size of the thing in bytes."""
        return self._size

    @size.setter
    def size(self, value):
        """Set the size of the thing in bytes."""
        self._size = value

    def _hidden(self):
        """Return something private from the class."""
        return 1
'''


@pytest.fixture()
def fake_stdlib(tmp_path):
    root = tmp_path / "stdlib"
    for rel in ("fakemod.py", "_private_mod.py", "test/test_fakemod.py", "pkg/__init__.py", "site-packages/x.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(FAKE_MODULE)
    return root


def test_filters_on_a_fake_stdlib(fake_stdlib):
    assert [name for name, _ in pycode.stdlib_module_files(fake_stdlib)] == ["fakemod", "pkg"]
    examples = pycode_examples(fake_stdlib, cache=False)
    # pkg is an identical copy of fakemod: its responses are duplicates and are dropped.
    assert [e["id"] for e in examples] == [
        "fakemod.Public.method", "fakemod.Public.size", "fakemod.Public.size#2",
        "fakemod.decorated", "fakemod.documented", "fakemod.fetch",
    ]
    by_id = {e["id"]: e for e in examples}
    documented = by_id["fakemod.documented"]
    assert documented["prompt"] == (
        "Write a Python function `documented(a, b=2, *args, key: int=0) -> int` for the `fakemod` module. "
        "It should do the following: Add two numbers together and return them."
    )
    assert documented["response"] == textwrap.dedent('''\
        def documented(a, b=2, *args, key: int = 0) -> int:
            total = a + b
            return total + key
        ''')
    assert by_id["fakemod.decorated"]["response"].startswith("@staticmethod\ndef decorated(x):\n")
    assert "async function `fetch(url)`" in by_id["fakemod.fetch"]["prompt"]
    method = by_id["fakemod.Public.method"]
    assert "the method `method(self, text)` of the class `Public`" in method["prompt"]
    # Dedented by the def's own indentation, even across a less-indented multi-line string.
    assert method["response"] == 'def method(self, text):\n    return """prefix\n""" + text\n'


def test_disk_cache_is_used_and_keyed_by_the_sources(fake_stdlib, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    first = pycode_examples(fake_stdlib)
    (cached,) = (tmp_path / "cache" / "datasets").glob("pycode-*.json")
    assert first == pycode_examples(fake_stdlib, cache=False)
    # The cache file is what a second call reads: a (valid) edit to it shows through ...
    rows = json.loads(cached.read_text())
    cached.write_text(json.dumps(rows[:1]))
    assert pycode_examples(fake_stdlib) == first[:1]
    # ... a damaged one is rebuilt ...
    cached.write_text("{not json")
    assert pycode_examples(fake_stdlib) == first
    # ... and editing a source file changes the key, so a stale cache is never read.
    (fake_stdlib / "fakemod.py").write_text(FAKE_MODULE.replace("Add two numbers", "Sum two numbers"))
    changed = pycode_examples(fake_stdlib)
    assert any("Sum two numbers" in e["prompt"] for e in changed)
    assert len(list((tmp_path / "cache" / "datasets").glob("pycode-*.json"))) == 2
    assert not list((tmp_path / "cache" / "datasets").glob("*.tmp"))
    # A cache folder that cannot be created costs the cache, not the data.
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "not-a-dir"))
    assert pycode_examples(fake_stdlib) == changed
