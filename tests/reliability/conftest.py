"""Reliability suites: the crash harness, disk-full and read-only saves, the run lock, fuzzing.

They train the tiny offline setup of tests/train (run_helpers, train_helpers), so that folder is importable
here too, and slimtune's cache points at a fresh folder for the session.
"""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "train"))



# Fuzzing profiles (tests/reliability/test_fuzz.py): `make test` runs a fixed, derandomized set of examples per
# input kind; SLIMTUNE_FUZZ=long runs many more, randomized (SLIMTUNE_FUZZ_EXAMPLES sets how many per kind).
settings.register_profile("slimtune-default", derandomize=True, max_examples=60, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("slimtune-long", max_examples=int(os.environ.get("SLIMTUNE_FUZZ_EXAMPLES", "2000")),
                          deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

from train_helpers import isolated_cache  # noqa: E402, F401 - the session fixture, for this folder
