"""Training on several processes with ``torchrun``: DDP or FSDP2 (``fully_shard``), checkpoints with DCP.

- :mod:`~slimtune.distributed.context`: the process group (gloo on CPU, NCCL on GPUs, timeouts) and the
  few collectives the trainer needs;
- :mod:`~slimtune.distributed.data`: rows sharded by rank, resumable at any world size;
- :mod:`~slimtune.distributed.wrap`: DDP or FSDP2, gradient sync per micro-batch, whole adapter tensors;
- :mod:`~slimtune.distributed.checkpoint`: training state with ``torch.distributed.checkpoint``;
- :mod:`~slimtune.distributed.run`: `slimtune train` as one rank of the group;
- :mod:`~slimtune.distributed.launch`: `slimtune train --nproc-per-node N` starts torchrun.
"""

from slimtune.distributed.context import DistContext, launched_by_torchrun, process_group
from slimtune.distributed.data import ShardedBatches, accumulation_for

__all__ = ["DistContext", "launched_by_torchrun", "process_group", "ShardedBatches", "accumulation_for"]
