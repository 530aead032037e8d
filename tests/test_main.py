"""``python -m slimtune``: a torchrun rank ends without the interpreter's teardown, its output and status whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from slimtune.distributed.context import TORCHRUN_VARIABLES

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(tmp_path: Path, *args: str, torchrun: bool) -> subprocess.CompletedProcess:
    """``python -m slimtune ARGS`` whose exit hooks and interpreter teardown say when they run, as a torchrun rank
    or not."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, sys, threading, time\natexit.register(print, 'exit hooks ran')\n"
        "class Teardown:\n    def __del__(self):\n"
        "        sys.stdout.write('teardown ran\\n')\n        sys.stdout.flush()\n"
        "marker = Teardown()\n"
        "def work():  # a thread (not a daemon) still working when the main thread is done\n"
        "    while threading.main_thread().is_alive():\n        time.sleep(0.01)\n"
        "    print('thread finished')\n"
        "threading.Thread(target=work).start()\n")
    env = {k: v for k, v in os.environ.items() if k not in (*TORCHRUN_VARIABLES, "PYTHONUNBUFFERED")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(SRC)])
    if torchrun:
        env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
        assert set(TORCHRUN_VARIABLES) <= set(env)
    return subprocess.run([sys.executable, "-m", "slimtune", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_torchrun_rank_skips_the_teardown_and_keeps_its_output(tmp_path):
    plain = _run(tmp_path, "recipes", torchrun=False)
    assert plain.returncode == 0  # the markers work: threads joined, then the exit hooks, then the teardown
    assert plain.stdout.endswith("thread finished\nexit hooks ran\nteardown ran\n")
    rank = _run(tmp_path, "recipes", torchrun=True)
    assert rank.returncode == 0, rank.stderr
    assert rank.stdout.endswith("thread finished\nexit hooks ran\n")  # (a W&B run finishes in one)
    # no teardown, and a pipe's buffered output is flushed before the exit
    assert len(rank.stdout) > 100 and rank.stdout == plain.stdout.removesuffix("teardown ran\n")
