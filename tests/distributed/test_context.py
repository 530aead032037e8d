"""The process group of a run that torchrun did not start: a group of one that leaves the caller's environment as it
found it."""

from __future__ import annotations

import os

from slimtune.distributed.context import TORCHRUN_VARIABLES, process_group


def test_a_group_of_one_gives_the_callers_variables_back(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # the caller's own, set for something else
    monkeypatch.setenv("MASTER_PORT", "29555")
    with process_group("cpu") as ctx:
        assert ctx.world_size == 1 and os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", "29555")
    others = [name for name in TORCHRUN_VARIABLES if name not in ("MASTER_ADDR", "MASTER_PORT")]
    assert not [name for name in others if name in os.environ]
