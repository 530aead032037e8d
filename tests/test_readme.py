"""The README's Python names exist: every `slimtune.<name>(` it calls and every `from slimtune… import …` it shows
(a quick-start that fails on its first line is worse than none)."""

import importlib
import re
from pathlib import Path

import slimtune

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_top_level_call_in_the_readme_exists():
    called = set(re.findall(r"\bslimtune\.([A-Za-z_]\w*)\(", README))
    assert {"add_adapter", "enable_fast_path", "load_adapter"} <= called  # the pattern finds the quick-start's calls
    assert sorted(name for name in called if not hasattr(slimtune, name)) == []


def test_every_import_in_the_readme_imports():
    imports = re.findall(r"^from (slimtune[\w.]*) import ([\w, ]+)$", README, flags=re.MULTILINE)
    assert len(imports) >= 3
    missing = [f"{module}.{name.strip()}" for module, names in imports for name in names.split(",")
               if not hasattr(importlib.import_module(module), name.strip())]
    assert missing == []
