"""Optional dependencies load on first use: a training run that does not need them never pays for them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slimtune.core.optional import OptionalModule

HEAVY = ("datasets", "pyarrow", "pandas", "matplotlib", "tensorboard", "wandb", "torch.utils.tensorboard")


def test_importing_the_training_engine_loads_none_of_the_heavy_extras():
    code = (f"import json, sys, slimtune.train.runner, slimtune.cli; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded == []


def test_an_optional_module_imports_on_first_use_and_is_falsy_when_missing():
    present = OptionalModule("json", "pip install json")
    assert present and "json" in repr(present) and "not imported" in repr(present)
    assert present.dumps([1]) == "[1]"
    assert "imported" in repr(present) and present.load() is json
    missing = OptionalModule("slimtune_no_such_module", "pip install slimtune-no-such-module")
    assert not missing
    with pytest.raises(ImportError, match="pip install slimtune-no-such-module"):
        missing.load()
    assert not OptionalModule("json", "", needs="slimtune_no_such_module")  # the package that decides is absent
