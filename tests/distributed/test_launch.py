"""`slimtune train --nproc-per-node N`'s launcher passes Ctrl-C and SIGTERM on to torchrun exactly once, and its
death (kill -9) stops torchrun instead of leaving the ranks to train on unsupervised. A stand-in child records
the signals it gets (torchrun passes them on to the ranks, which stop at a step boundary with a checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop_at = [time.monotonic() + 30]
def note(signum, frame):  # record every signal, stop half a second after the first (duplicates are seen)
    with out.open("a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    stop_at[0] = min(stop_at[0], time.monotonic() + 0.5)
signal.signal(signal.SIGTERM, note)
signal.signal(signal.SIGINT, note)
Path(sys.argv[2]).write_text("ready")
while time.monotonic() < stop_at[0]:
    time.sleep(0.02)
sys.exit(int(sys.argv[3]))  # torchrun's status once its ranks stopped: 1 (they return 130, a "failure")
"""


def _start(tmp_path: Path, status: int = 1) -> tuple[subprocess.Popen, Path, Path]:
    child, out, ready = tmp_path / "child.py", tmp_path / "signals.txt", tmp_path / "ready"
    child.write_text(CHILD)
    out.write_text("")
    code = ("import sys; from slimtune.distributed.launch import launch; "
            f"sys.exit(launch(1, [], command=[sys.executable, {str(child)!r}, {str(out)!r}, {str(ready)!r}, "
            f"'{status}']))")
    # in a session of its own, as a shell's foreground job: a terminal's Ctrl-C goes to its whole process group
    launcher = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    _wait_for(lambda: ready.exists())
    return launcher, out, ready


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_reaches_torchrun_once(tmp_path, signum):
    launcher, out, _ = _start(tmp_path)
    launcher.send_signal(signum)  # `kill PID`
    _, err = launcher.communicate(timeout=30)
    assert out.read_text().split() == [signal.Signals(signum).name]
    assert f"stopped by {signal.Signals(signum).name}" in err and "--resume" in err
    assert launcher.returncode == 130  # stopped, resumable: as one process's `slimtune train`


def test_a_run_that_finished_before_the_stop_took_effect_exits_0(tmp_path):
    launcher, _, _ = _start(tmp_path, status=0)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 0 and "stopped by" not in err


def test_a_terminals_ctrl_c_reaches_torchrun_once(tmp_path):
    launcher, out, _ = _start(tmp_path)
    os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C: the foreground process group
    launcher.communicate(timeout=30)
    assert out.read_text().split() == ["SIGINT"]  # not once from the terminal and once passed on


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_launcher_stops_torchrun_instead_of_orphaning_it(tmp_path):
    launcher, out, _ = _start(tmp_path)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    _wait_for(lambda: "SIGTERM" in out.read_text())


def test_a_resume_on_another_number_of_ranks_says_what_changes(tmp_path):
    from slimtune.distributed.checkpoint import world_size_note

    (tmp_path / "step-000004" / "rng").mkdir(parents=True)
    for rank in range(2):
        (tmp_path / "step-000004" / "rng" / f"rank-{rank:05d}.json").write_text("{}")
    assert world_size_note(tmp_path / "step-000004", 2) is None
    note = world_size_note(tmp_path / "step-000004", 1)
    assert note is not None and "saved by 2 ranks and resumes on 1" in note and "dropout" in note
