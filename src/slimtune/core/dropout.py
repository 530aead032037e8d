"""Seeded inverted dropout: the mask is regenerated from a seed in backward instead of being stored."""

from __future__ import annotations

import torch


def draw_seed() -> int:
    """A mask seed from the global RNG, so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(1 << 62, ()))


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted-dropout multiplier ``bernoulli(1 - p) / (1 - p)`` shaped like ``like``, from ``seed``."""
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1 - p, generator=generator).div_(1 - p)
