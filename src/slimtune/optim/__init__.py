"""Optimizer-side features: optimizers by name, and parameter groups (LoRA+, layer-wise learning rates).

Optimizers for adapter training, selected by name (recipes' ``training.optim``):

=====================  ==================================================  ==========================
name                   what                                                state bytes per weight
=====================  ==================================================  ==========================
``adamw``              ``torch.optim.AdamW``                               8 (fp32 params)
``adamw_8bit``         :class:`AdamW8bit` — block-wise 8-bit moments       2.03
``paged_adamw``        :class:`PagedAdamW` — fp32 moments in pinned CPU    8, none on the GPU
``paged_adamw_8bit``   :class:`AdamW8bit` with ``paged=True``              2.03, none on the GPU
=====================  ==================================================  ==========================

transformers' ``TrainingArguments.optim`` spellings are accepted too (``adamw_torch``, ``adamw_torch_fused``,
``adamw_bnb_8bit``, ``paged_adamw_32bit``). All follow AdamW's decoupled weight decay with torch's defaults.
``adamw`` runs torch's fused kernel (one kernel per tensor, as transformers' default ``adamw_torch_fused``)
when every parameter is a plain floating-point tensor on a CPU or CUDA device and neither ``foreach`` nor
``fused`` is given; otherwise torch's own choice.

Parameter groups (recipes' ``training.loraplus_lr_ratio`` / ``training.layerwise_lr_decay``):
:func:`training_param_groups`, built on :mod:`.loraplus` and :mod:`.layerwise`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimtune.optim.adamw_8bit import AdamW8bit
from slimtune.optim.layerwise import layerwise_lr_groups
from slimtune.optim.loraplus import create_loraplus_optimizer, loraplus_param_groups
from slimtune.optim.paged_adamw import PagedAdamW, PagedStateOptimizer

__all__ = ["OPTIMIZER_ALIASES", "OPTIMIZER_NAMES", "make_optimizer", "AdamW8bit", "PagedAdamW", "PagedStateOptimizer",
           "state_bytes", "training_param_groups", "layerwise_lr_groups", "loraplus_param_groups",
           "create_loraplus_optimizer"]

OPTIMIZER_NAMES = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_bnb_8bit": "adamw_8bit",
                     "paged_adamw_32bit": "paged_adamw"}
_OPTIONS = {  # extra keyword arguments each optimizer takes
    "adamw": ("foreach", "fused", "maximize", "capturable", "differentiable", "amsgrad"),
    "adamw_8bit": ("min_8bit_size", "full_precision"),
    "paged_adamw": ("min_paged_size",),
    "paged_adamw_8bit": ("min_8bit_size", "min_paged_size", "full_precision"),
}


def make_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                   **options: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see the module docstring) over ``params`` (tensors or param-group dicts,
    as for any torch optimizer). ``options``: ``min_8bit_size`` (8-bit kinds, default 4096), ``full_precision``
    (8-bit kinds: parameters whose moments stay fp32, as bitsandbytes' ``optim_bits=32`` override),
    ``min_paged_size`` (paged kinds, default 100,000), torch.optim.AdamW's own flags for ``adamw``.
    """
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = OPTIMIZER_ALIASES.get(name.lower(), name.lower())
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZER_NAMES)} "
                         f"(or transformers' spellings {list(OPTIMIZER_ALIASES)})")
    unknown = sorted(set(options) - set(_OPTIONS[key]))
    if unknown:
        raise ValueError(f"optimizer {key!r} takes no option(s) {unknown}; it accepts {list(_OPTIONS[key])}")
    common: dict[str, Any] = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if key == "adamw":
        if not isinstance(params, torch.Tensor):  # (a bare tensor: torch's own error)
            params = [_listed(item) for item in params]  # generators are read once
            if not {"foreach", "fused", "differentiable"} & set(options) and _fusable(params):
                options["fused"] = True
        return torch.optim.AdamW(params, **common, **options)
    if key == "paged_adamw":
        return PagedAdamW(params, **common, paged=True, **options)
    return AdamW8bit(params, **common, paged=key == "paged_adamw_8bit", **options)


def _listed(item: Any) -> Any:
    """A param-group dict with its ``params`` as a list (a tensor, a list or a generator there); tensors as they are."""
    if not isinstance(item, dict):
        return item
    group = item["params"]
    return {**item, "params": [group] if isinstance(group, torch.Tensor) else list(group)}


def _fusable(params: list) -> bool:
    """Whether torch's fused AdamW kernel takes every tensor of ``params`` (tensors or param-group dicts):
    plain (not DTensor or other subclass) floating-point tensors on CPU or CUDA."""
    tensors = [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    return bool(tensors) and all(type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()
                                 and t.device.type in ("cpu", "cuda") for t in tensors)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors (step counters excluded), for any torch optimizer."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
               if isinstance(t, torch.Tensor) and k != "step")


def training_param_groups(model: nn.Module, lr: float, method_groups: list[dict[str, Any]] | None = None,
                          loraplus_lr_ratio: float | None = None, loraplus_lr_embedding: float = 1e-6,
                          layerwise_lr_decay: float | None = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups over the trainable parameters of ``model``.

    The method's own groups (``method_groups``, e.g. a LORA_PLUS adapter's), else LoRA+ groups, else
    layer-wise decayed learning rates, else (at most) two groups: weight decay on matrices, none on biases and
    norms (1-D tensors). Every trainable parameter is in exactly one group.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; check the method's target_modules.")
    chosen = [what for what, on in (("the method's own groups", method_groups is not None),
                                    ("loraplus_lr_ratio", loraplus_lr_ratio is not None),
                                    ("layerwise_lr_decay", layerwise_lr_decay is not None)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} each define the optimizer's parameter groups; keep one.")
    if method_groups is not None:
        groups = method_groups
    elif loraplus_lr_ratio is not None:
        groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding)
    elif layerwise_lr_decay is not None:
        groups = layerwise_lr_groups(model, lr, layerwise_lr_decay)
    else:
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        # no empty group: torch's distributed optimizer-state loader drops an empty group's options (lr...)
        groups = [group for group in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if group["params"]]
    grouped = [p for g in groups for p in g["params"]]
    if len(grouped) != len(trainable) or {id(p) for p in grouped} != {id(p) for p in trainable}:
        raise ValueError("the parameter groups must list every trainable parameter exactly once.")
    return groups
