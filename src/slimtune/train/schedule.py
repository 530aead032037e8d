"""Learning-rate schedules: linear warmup, then cosine / linear decay or a constant rate."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_multiplier(kind: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based, before the update).

    Warmup rises linearly from ``1/(warmup+1)`` so the first update is not wasted at lr 0; the decay
    then goes from 1 to ``min_ratio`` over the remaining steps, reaching it at the last step.
    """
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"lr_scheduler={kind!r} is unknown; use 'cosine', 'linear' or 'constant'.")
    decay_steps = max(1, total_steps - warmup_steps - 1)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` scaling every parameter group's own learning rate (so LoRA+ ratios survive)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, total_steps, warmup_steps, min_ratio))
