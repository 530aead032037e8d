"""The process group of a run: who this process is (rank, world size, device) and the few collectives the
training loop needs.

``torchrun`` (or ``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`process_group` reads them and starts the group: NCCL when the
ranks train on GPUs (one per local rank), gloo on CPU. A recipe with a ``distributed`` section started
without torchrun runs as a group of one (the same code path, so its checkpoints resume at any world size).

Every collective has the recipe's ``distributed.timeout_s``: a rank that dies or stalls ends the run with
an error after at most that long instead of a hang (torchrun itself stops the other ranks as soon as one
exits, which is usually much sooner).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistContext", "launched_by_torchrun", "process_group", "free_port"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (its environment variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def free_port() -> int:
    """A TCP port that was free a moment ago on this host (for a group of one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class DistContext:
    """This rank in its group, and the collectives the trainer uses (all of them cheap: a few numbers)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder (adapter, metrics, summary)."""
        return self.rank == 0

    def _reduce(self, value: float, op: dist.ReduceOp.RedOpType, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(t, op=op)
        return t

    def sum_int(self, value: int) -> int:
        """``value`` summed over the ranks (e.g. the label tokens of one optimizer step)."""
        return int(self._reduce(value, dist.ReduceOp.SUM, torch.int64).item())

    def sum_float(self, value: float) -> float:
        return float(self._reduce(value, dist.ReduceOp.SUM, torch.float64).item())

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one (a stop request must stop all ranks at the same step)."""
        return bool(self._reduce(float(flag), dist.ReduceOp.MAX, torch.float32).item())

    def barrier(self) -> None:
        dist.barrier()

    def gather_rows(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """The ranks' ``local`` tensors stacked along dim 0 in rank order, into a tensor of ``rows`` rows.

        Each rank's part may be shorter than the first's (FSDP2's dim-0 shards: ``ceil(rows / world_size)``
        rows each, the last ones fewer or none); the parts are padded to that size for the all-gather.
        """
        chunk = -(-rows // self.world_size)
        padded = local.new_zeros((chunk, *local.shape[1:]), device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:rows].to(local.device)  # rank r's rows start at r · chunk here as in the layer

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (small Python objects: paths, settings)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _device(requested: str, local_rank: int) -> torch.device:
    """One GPU per local rank when the recipe asks for cuda (or auto and there is one), else the CPU."""
    wants_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"model.device={requested!r}, but this machine has no CUDA GPU; use cpu (gloo).")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start "
                         "at most that many processes per node (--nproc-per-node).")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 600.0) -> Iterator[DistContext]:
    """Start (and at the end destroy) the default process group; yield this rank's :class:`DistContext`.

    Under torchrun the group is the launcher's; otherwise a group of one on a free local port. A group
    that already exists (a caller started it) is used as it is and left running.
    """
    if dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = _device(device, local)
        yield DistContext(dist.get_rank(), dist.get_world_size(), local, dev, str(dist.get_backend()))
        return
    alone = not launched_by_torchrun()
    callers = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    try:
        local = int(os.environ["LOCAL_RANK"])
        dev = _device(device, local)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
        try:
            yield DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend)
        finally:
            dist.destroy_process_group()
    finally:
        if alone:  # the caller's variables back (the next run in this process is again a group of one)
            for name, value in callers.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
