"""The crash harness: `slimtune train` in a child process, killed with SIGKILL at a seeded instant, resumed.

Each attempt forks a child of the test process (torch, transformers and slimtune already imported, so an
attempt costs the training, not the imports) that runs the command line's own entry point,
``slimtune.cli.main(["train", recipe, ...])``, with its output in a file. Two kinds of kill:

- ``time``: the parent sends SIGKILL after a seeded delay, anywhere in the run (loading, training steps,
  evaluation, saves);
- ``io``: the child counts its file-system calls (``os.write``, ``fsync``, ``replace``, ``rename``, ``link``,
  ``mkdir``, ``unlink``, ``rmdir``, ``ftruncate``, ``pwrite``: every step of writing a checkpoint, the adapter,
  the lock, the recipe and the summary, and of deleting old checkpoints) and SIGKILLs itself just before the
  seeded n-th one, after noting which save was under way.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.cli import main

IO_CALLS = ("write", "fsync", "replace", "rename", "link", "mkdir", "unlink", "rmdir", "ftruncate", "pwrite")
# Which save a call belongs to, by the innermost matching function on the stack.
PHASES = {"save_checkpoint": "checkpoint write", "remove_folder": "checkpoint pruning",
          "save_adapter": "final adapter save", "acquire": "lock", "release": "lock",
          "truncate_after": "metrics rewrite", "atomic_write": "recipe/summary write",
          "recover_folder": "leftover repair"}
FORK = multiprocessing.get_context("fork")


def _phase() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in PHASES:
            return PHASES[frame.f_code.co_name]
        frame = frame.f_back
    return "other"


def _count_io(kill_at: int | None, info: Path) -> list[int]:
    """Wrap the os calls that write; SIGKILL this process before call ``kill_at`` (1-based)."""
    count = [0]
    for name in IO_CALLS:
        original = getattr(os, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            count[0] += 1
            if kill_at is not None and count[0] == kill_at:
                fd = os.open(info, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                _original_write(fd, f"{_phase()}\t{_name}\n".encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(*args, **kwargs)

        setattr(os, name, wrapped)
    return count


_original_write = os.write


def _child(argv: list[str], out: str, kill_at: int | None, info: str) -> None:
    code = 99
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
        count = _count_io(kill_at, Path(info))
        code = main(argv)
        sys.stdout.flush()
        _original_write(1, f"\n#io-calls {count[0]}\n".encode())
    except BaseException:  # noqa: BLE001 - the parent reads the traceback from the output file
        traceback.print_exc()
        sys.stdout.flush()
    finally:
        os._exit(code)


@dataclass
class Attempt:
    exitcode: int | None
    killed: bool
    output: str
    phase: str | None = None  # what an io kill interrupted
    io_calls: int | None = None  # counted in a run that finished

    @property
    def error(self) -> str:
        lines = [line for line in self.output.splitlines() if line.startswith("error:")]
        return lines[-1] if lines else ""


def attempt(argv: list[str], folder: Path, kill_after: float | None = None, kill_at: int | None = None) -> Attempt:
    """Run ``slimtune`` with ``argv`` in a forked child; SIGKILL it after ``kill_after`` seconds, or let it
    kill itself before its ``kill_at``-th write call."""
    out, info = folder / "child.out", folder / "child.kill"
    info.unlink(missing_ok=True)
    child = FORK.Process(target=_child, args=(argv, str(out), kill_at, str(info)))
    child.start()
    if kill_after is not None:
        child.join(kill_after)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
    child.join(120)
    if child.is_alive():  # never expected: a hung child fails the test rather than the suite
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        raise AssertionError(f"slimtune {' '.join(argv)} hung:\n{out.read_text()}")
    text = out.read_text(errors="replace")
    killed = child.exitcode == -signal.SIGKILL
    phase = info.read_text().split("\t")[0] if killed and info.exists() else ("at a random time" if killed else None)
    calls = [int(line.split()[1]) for line in text.splitlines() if line.startswith("#io-calls ")]
    return Attempt(child.exitcode, killed, text, phase, calls[-1] if calls else None)


@dataclass
class Tally:
    """What the harness saw, for the README's table."""

    kills: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    runs_compared: int = 0
    identical: int = 0
    attempts: int = 0
    seconds: float = 0.0

    def kill(self, phase: str) -> None:
        self.kills += 1
        self.phases[phase] = self.phases.get(phase, 0) + 1

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1


def timed(tally: Tally, *args, **kwargs) -> Attempt:
    start = time.perf_counter()
    result = attempt(*args, **kwargs)
    tally.seconds += time.perf_counter() - start
    tally.attempts += 1
    return result


def report(summary: dict) -> None:
    """Append ``summary`` as a JSON line to ``$SLIMTUNE_RELIABILITY_REPORT`` (the README's figures), if set."""
    target = os.environ.get("SLIMTUNE_RELIABILITY_REPORT")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps(summary) + "\n")
