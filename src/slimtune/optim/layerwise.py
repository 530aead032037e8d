"""Layer-wise learning-rate decay: lower layers learn more slowly than upper ones.

Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification" (discriminative
fine-tuning), arXiv:1801.06146; Clark et al., "ELECTRA", arXiv:2003.10555 (layer-wise LR decay).

``lr(depth) = base_lr · decay^(L + 1 − depth)`` with ``L`` transformer blocks: the embeddings sit at
depth 0, block ``i`` (0-based, counted across the encoder then the decoder) at depth ``i + 1``, and
everything else (final norm, heads, prompt encoders) at depth ``L + 1``, i.e. block ``i`` gets
``base_lr · decay^(L − i)``. Works with any method: only trainable parameters are grouped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from slimtune.core.modules import block_list, block_lists

EMBEDDING_NAMES = ("embed_tokens", "embed_positions", "wte", "wpe", "embeddings", "shared", "word_embeddings")


def parameter_depths(model: nn.Module, layers_pattern: str | Sequence[str] | None = None) -> tuple[dict[str, int], int]:
    """Depth of every parameter (see the module docstring) and the number of blocks ``L``."""
    lists = block_lists(model, layers_pattern)
    offsets, total = {}, 0
    for name in lists:
        offsets[name] = total
        total += len(block_list(model, name))
    depths = {}
    for name, _ in model.named_parameters():
        depth = total + 1
        for list_name, offset in offsets.items():
            match = re.match(rf"{re.escape(list_name)}\.(\d+)\.", name)
            if match:
                depth = offset + int(match[1]) + 1
                break
        else:
            if any(part in EMBEDDING_NAMES for part in name.split(".")):
                depth = 0
        depths[name] = depth
    return depths, total


def layerwise_lr_groups(model: nn.Module, base_lr: float, decay: float,
                        layers_pattern: str | Sequence[str] | None = None) -> list[dict]:
    """Optimizer parameter groups with ``lr = base_lr · decay^(L + 1 − depth)``, one group per depth.

    Pass the result to any ``torch.optim`` optimizer, e.g. ``AdamW(layerwise_lr_groups(model, 1e-4, 0.8))``.
    Each group also carries ``depth`` and ``names`` (the parameter names) for logging. Biases and norm weights
    (1-D tensors) are in groups of their own with no weight decay, as in the default grouping.
    """
    if not isinstance(base_lr, (int, float)) or base_lr <= 0:
        raise ValueError(f"base_lr={base_lr!r} must be a positive number.")
    if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ValueError(f"decay={decay!r} must be in (0, 1]: each layer down multiplies the learning rate by it "
                         "(1 = no decay, 0.8 is common).")
    depths, total = parameter_depths(model, layers_pattern)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth, flat = depths[name], param.ndim < 2
        group = groups.setdefault((depth, flat), {"params": [], "names": [], "depth": depth,
                                                  "lr": base_lr * decay ** (total + 1 - depth),
                                                  **({"weight_decay": 0.0} if flat else {})})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters; inject a method (or unfreeze parameters) first.")
    return [groups[key] for key in sorted(groups)]
