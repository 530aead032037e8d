"""Optimizers for adapter training, selected by name (recipes' ``optim``):

=====================  ==================================================  ==========================
name                   what                                                state bytes per weight
=====================  ==================================================  ==========================
``adamw``              ``torch.optim.AdamW``                               8 (fp32 params)
``adamw_8bit``         :class:`AdamW8bit` — block-wise 8-bit moments       2.03
``paged_adamw``        :class:`PagedAdamW` — fp32 moments in pinned CPU    8, none on the GPU
``paged_adamw_8bit``   :class:`AdamW8bit` with ``paged=True``              2.03, none on the GPU
=====================  ==================================================  ==========================

transformers' ``TrainingArguments.optim`` spellings are accepted too (``adamw_torch``, ``adamw_bnb_8bit``,
``paged_adamw_32bit``). All follow AdamW's decoupled weight decay with torch's defaults.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from slimtune.optimizers.adamw_8bit import AdamW8bit
from slimtune.optimizers.paged_adamw import PagedAdamW, PagedStateOptimizer

__all__ = ["OPTIMIZER_NAMES", "make_optimizer", "AdamW8bit", "PagedAdamW", "PagedStateOptimizer", "state_bytes"]

OPTIMIZER_NAMES = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
_ALIASES = {"adamw_torch": "adamw", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_32bit": "paged_adamw"}
_OPTIONS = {  # extra keyword arguments each optimizer takes
    "adamw": ("foreach", "fused", "maximize", "capturable", "differentiable", "amsgrad"),
    "adamw_8bit": ("min_8bit_size",),
    "paged_adamw": ("min_paged_size",),
    "paged_adamw_8bit": ("min_8bit_size", "min_paged_size"),
}


def make_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                   **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see the module docstring) over ``params`` (tensors or param-group dicts,
    as for any torch optimizer). ``options``: ``min_8bit_size`` (8-bit kinds, default 4096),
    ``min_paged_size`` (paged kinds, default 100,000), torch.optim.AdamW's own flags for ``adamw``.
    """
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZER_NAMES)} "
                         f"(or transformers' spellings {list(_ALIASES)})")
    unknown = sorted(set(options) - set(_OPTIONS[key]))
    if unknown:
        raise ValueError(f"optimizer {key!r} takes no option(s) {unknown}; it accepts {list(_OPTIONS[key])}")
    common = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, **common, **options)
    if key == "paged_adamw":
        return PagedAdamW(params, **common, paged=True, **options)
    return AdamW8bit(params, **common, paged=key == "paged_adamw_8bit", **options)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors (step counters excluded), for any torch optimizer."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
               if isinstance(t, torch.Tensor) and k != "step")
