"""Distributed suites: gloo process groups of 2 ranks on CPU, launched with torchrun, on the tiny offline setup
of tests/train (run_helpers), so that folder is importable here too."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    old = os.environ.get("SLIMTUNE_CACHE")
    os.environ["SLIMTUNE_CACHE"] = str(tmp_path_factory.mktemp("slimtune-cache"))
    yield
    if old is None:
        del os.environ["SLIMTUNE_CACHE"]
    else:
        os.environ["SLIMTUNE_CACHE"] = old
