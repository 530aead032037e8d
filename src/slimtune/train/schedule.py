"""Learning-rate schedules: linear warmup, then cosine / linear decay or a constant rate, as transformers'
``get_scheduler`` computes them (a recipe's ``lr_scheduler`` names mean what they mean in a HF Trainer)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def lr_multiplier(kind: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based, before the update).

    transformers' schedules: warmup rises linearly from 0 over ``warmup_steps``; ``cosine`` and ``linear`` then
    decay over the ``total_steps - warmup_steps`` steps left towards ``min_ratio`` (cosine with a minimum is
    ``cosine_with_min_lr``'s), which the step after the last would reach; ``constant`` has no warmup,
    ``constant_with_warmup`` has.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler={kind!r} is unknown; use one of {list(SCHEDULES)}.")
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / decay_steps
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return max(0.0, min_ratio + (1.0 - min_ratio) * shape)

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` scaling every parameter group's own learning rate (so LoRA+ ratios survive)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(kind, total_steps, warmup_steps, min_ratio))
