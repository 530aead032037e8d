"""What LoHa and LoKr (the LyCORIS family) share: PEFT's ``LycorisConfig`` fields and the rank dropout."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimtune.config import (
    MethodConfig,
    check_layer_targets,
    check_positive_int,
    check_positive_number,
    check_probability,
)


@dataclass
class LycorisConfig(MethodConfig):
    """PEFT's fields common to LoHa and LoKr. ``ΔW`` is scaled by ``alpha / r``; ``rank_dropout`` drops output
    rows of ``ΔW`` while training, ``module_dropout`` skips the whole adapter for a forward call with that
    probability. ``use_effective_conv2d`` concerns convolutions only (slimtune wraps linear layers)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r, hint=" (the rank of the adapter's factors, e.g. 8)")
        check_positive_number("alpha", self.alpha, hint=" (scaling is alpha / r)")
        check_probability("rank_dropout", self.rank_dropout)
        check_probability("module_dropout", self.module_dropout)
        check_layer_targets(self)


def rank_dropout_keep(rows: int, p: float, reference: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """LyCORIS' rank dropout: a ``(rows,)`` mask keeping each output row with probability ``1 - p``, divided by the
    share kept when ``rescale`` (so the update keeps its size), in ``reference``'s device and dtype."""
    keep = (torch.rand(rows, device=reference.device) > p).to(reference.dtype)
    return keep / keep.mean().clamp_min(1e-12) if rescale else keep
