"""`slimtune train RECIPE --nproc-per-node N`: start ``torchrun`` with N ranks of `slimtune train RECIPE`.

The same as typing ``torchrun --standalone --nproc-per-node N -m slimtune train RECIPE ...`` (one node, a
free local port). For several nodes, run torchrun yourself on each with ``--nnodes`` and ``--rdzv-*``.

Signals reach the ranks once, through torchrun: Ctrl-C and SIGTERM sent to this launcher are passed on (torchrun
runs in a session of its own, so a terminal's Ctrl-C is not delivered twice), and the ranks stop at the next step
boundary with a checkpoint. If the launcher itself dies (``kill -9``), torchrun gets SIGTERM (Linux) and stops
its ranks the same way instead of training on unsupervised.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable

__all__ = ["torchrun_command", "launch"]

_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies


def torchrun_command(nproc_per_node: int, train_args: list[str]) -> list[str]:
    """The command line: this Python's torchrun, then `slimtune train` with ``train_args``."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {nproc_per_node}: give a positive number of processes.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "slimtune", "train", *train_args]


def _terminate_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when this process dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda: libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def launch(nproc_per_node: int, train_args: list[str], command: list[str] | None = None) -> int:
    """Run torchrun (or ``command``), pass Ctrl-C and SIGTERM on to it, and wait; say which way out there is.
    Returns its exit status; after a stop, 130 as one process's `slimtune train` (torchrun reports the ranks'
    130 as a failure, 1)."""
    process = subprocess.Popen(command or torchrun_command(nproc_per_node, train_args), start_new_session=True,
                               preexec_fn=_terminate_with_parent())
    stopped: list[str] = []

    def pass_on(signum: int, frame: object) -> None:
        stopped.append(signal.Signals(signum).name)
        if process.poll() is None:
            process.send_signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped and status != 0:
        print(f"stopped by {stopped[0]}: the ranks stop at a step boundary and keep a checkpoint; continue with "
              "`slimtune train ... --resume`.", file=sys.stderr)
        return 130
    elif status != 0:
        print(f"error: the distributed run failed (torchrun exit status {status}: a rank ended with an error or "
              "was killed; torchrun's report above names it). A checkpoint it saved is kept: `slimtune train ... "
              "--resume` continues from it.", file=sys.stderr)
    return status
