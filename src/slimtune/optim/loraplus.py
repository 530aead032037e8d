"""LoRA+ learning rates: B learns ``loraplus_lr_ratio`` times faster than A.

Hayou et al., "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354. A group is a
plain ``torch.optim`` parameter-group dict (``params``, ``lr``, ``weight_decay``) with a ``name`` for
logs; pass the list to any torch optimizer, or set ``training.loraplus_lr_ratio`` in a recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtune.core.state import find_state


def check_ratio(loraplus_lr_ratio: Any) -> None:
    if isinstance(loraplus_lr_ratio, bool) or not isinstance(loraplus_lr_ratio, (int, float)) or loraplus_lr_ratio < 1:
        raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio!r} must be a number ≥ 1 (the paper suggests 16): "
                         "it is lr_B / lr_A.")


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns ``loraplus_lr_ratio`` times faster than A.

    Groups of the trainable parameters, as PEFT's ``create_loraplus_optimizer`` forms them:
    ``lora_B`` and every 1-D parameter (biases, DoRA magnitudes) at ``lr × ratio``; embedding LoRA
    factors at ``loraplus_lr_embedding``; everything else (``lora_A``, head copies) at ``lr``.
    1-D parameters get no weight decay; ``weight_decay=None`` leaves the others at the optimizer's default.
    """
    check_ratio(loraplus_lr_ratio)
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "lora_B_no_decay": [], "embedding": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".lora_embedding_" in name:
            groups["embedding"].append(param)
        elif ".lora_B." in name or param.ndim == 1:
            groups["lora_B" if param.ndim > 1 else "lora_B_no_decay"].append(param)
        else:
            groups["lora_A"].append(param)
    if not any(groups.values()):
        raise ValueError("the model has no trainable parameters; add an adapter first (slimtune.add_adapter).")
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    settings = {
        "lora_A": {"lr": lr, **decay},
        "lora_B": {"lr": lr * loraplus_lr_ratio, **decay},
        "lora_B_no_decay": {"lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
        "embedding": {"lr": loraplus_lr_embedding, **decay},
    }
    return [{"name": key, "params": params, **settings[key]} for key, params in groups.items() if params]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,  # a class taking (params, lr=, …)
    lr: float = 2e-4,
    loraplus_lr_ratio: float | None = None,
    loraplus_lr_embedding: float | None = None,
    loraplus_weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over :func:`loraplus_param_groups`, as PEFT's ``create_loraplus_optimizer`` makes it: every group
    has ``loraplus_weight_decay`` (0 by default; 1-D parameters always 0), which a ``weight_decay`` among
    ``optimizer_kwargs`` (passed to ``optimizer_cls``) does not change. The ratio and the embeddings' rate left
    unset are the active LoRA+ adapter's (``LoraPlusConfig``), else 16 and 1e-6."""
    configs = [vars(state.configs[a]) for a in state.active] if (state := find_state(model)) is not None else []
    own = next((fields for fields in configs if "loraplus_lr_ratio" in fields), {})
    if loraplus_lr_ratio is None:
        loraplus_lr_ratio = float(own.get("loraplus_lr_ratio", 16.0))
    if loraplus_lr_embedding is None:
        loraplus_lr_embedding = float(own.get("loraplus_lr_embedding", 1e-6))
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, loraplus_weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
