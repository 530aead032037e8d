"""`slimtune train RECIPE --nproc-per-node N`: start ``torchrun`` with N ranks of `slimtune train RECIPE`.

The same as typing ``torchrun --standalone --nproc-per-node N -m slimtune train RECIPE ...`` (one node, a
free local port). For several nodes, run torchrun yourself on each with ``--nnodes`` and ``--rdzv-*``.
"""

from __future__ import annotations

import subprocess
import sys

__all__ = ["torchrun_command", "launch"]


def torchrun_command(nproc_per_node: int, train_args: list[str]) -> list[str]:
    """The command line: this Python's torchrun, then `slimtune train` with ``train_args``."""
    if nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node {nproc_per_node}: give a positive number of processes.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "slimtune", "train", *train_args]


def launch(nproc_per_node: int, train_args: list[str]) -> int:
    """Run torchrun and wait; on failure say which way out there is. Returns its exit status."""
    status = subprocess.call(torchrun_command(nproc_per_node, train_args))
    if status != 0:
        print(f"error: the distributed run failed (torchrun exit status {status}: a rank ended with an error or "
              "was killed; torchrun's report above names it). Its latest checkpoint is kept: continue with "
              "`slimtune train ... --resume`, with any number of processes.", file=sys.stderr)
    return status
