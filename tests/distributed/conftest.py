"""Distributed suites: gloo process groups of 2 ranks on CPU, launched with torchrun, on the tiny offline setup
of tests/train (run_helpers), so that folder is importable here too."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))
sys.path.insert(0, os.path.dirname(__file__))

from train_helpers import isolated_cache  # noqa: E402, F401 - the session fixture, for this folder
