"""LoRA-FA: LoRA with the down-projection A frozen after its random init; only B trains.

Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
arXiv:2308.03303.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import LoraConfig, MethodConfig
from slimtune.core.dropout import draw_seed, dropout_mask
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora import LoraMethod
from slimtune.methods.lora_layers import LoraLinear
from slimtune.methods.targets import is_adaptable_linear


@dataclass
class LoraFAConfig(LoraConfig):
    """LoRA-FA: ``h = W x + s · B A dropout(x)`` with A frozen (Kaiming init) and only B trainable.

    Saved as a plain PEFT LoRA adapter (``peft_type: "LORA"``): at inference it is one.
    """

    peft_type: ClassVar[str] = "LORA_FA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_parameters:
            raise ValueError(f"target_parameters={self.target_parameters}: LoRA-FA adapts linear layers only; use "
                             "LoraConfig for parameters (and target_modules here).")
        if self.use_dora:
            raise ValueError("LoraFAConfig(use_dora=True) contradicts itself: DoRA trains the direction through "
                             "A and B; use LoraConfig(use_dora=True), or LoRA-FA with use_dora=False.")


class _FrozenProjection(torch.autograd.Function):
    """``dropout(x) Aᵀ`` for a frozen A that keeps nothing of size (batch, seq, in) for backward:
    the dropout mask is regenerated from its seed instead of stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = draw_seed(), p
        ctx.save_for_backward(weight)  # A itself: a parameter, no extra memory
        return F.linear(x * dropout_mask(x, p, ctx.seed), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype)
        return grad_x * dropout_mask(grad_x, ctx.p, ctx.seed), None, None


class LoraFALinear(LoraLinear):
    """LoRA-FA on a linear layer: ``h = W x + b + s · B (A x̃)``, ``x̃ = dropout(x)``, A frozen.

    With A frozen, A's gradient needs no stored input, so the LoRA branch keeps only ``A x̃``
    (batch × seq × r) for B's gradient instead of x (batch × seq × in): activation memory per layer
    drops from ~2bsd + 2bsr to ~2bsr (paper §3). Autograd already skips saving x when A has no
    gradient; with dropout the mask is regenerated in backward instead of stored.
    Plain LoRA adapters can share this layer (their A trains).
    """

    fusable = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.frozen_A: set[str] = set()

    def add_adapter(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        super().add_adapter(adapter_name, config, module_name)
        if isinstance(config, LoraFAConfig):
            self.frozen_A.add(adapter_name)
            self.lora_A[adapter_name].weight.requires_grad_(False)

    def set_active(self, adapter_names: list[str]) -> None:
        super().set_active(adapter_names)
        for name in self.frozen_A:
            self.lora_A[name].weight.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.frozen_A.discard(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            (A, B), dropout = self.lora_modules(name), self.lora_dropout[name]
            x_a = x.to(A.weight.dtype)
            p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
            if name in self.frozen_A and p > 0 and torch.is_grad_enabled():
                ax = _FrozenProjection.apply(x_a, A.weight, p)  # A x̃, mask not stored
            else:
                ax = A(dropout(x_a))
            result = result + (B(ax) * self.scaling[name]).to(result.dtype)
        return result


class LoraFAMethod(LoraMethod):
    """Saved as a plain PEFT LoRA adapter (``peft_type: "LORA"``): at inference it is one."""

    peft_type: ClassVar[str] = "LORA_FA"
    config_class: ClassVar[type[MethodConfig]] = LoraFAConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (LoraFALinear,)

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        if not is_adaptable_linear(base):
            raise TypeError(f"LoRA-FA wraps linear layers only, not a {type(base).__name__}; pick linear "
                            "target_modules (an embedding has no input activation to save: use LoraConfig there).")
        return LoraFALinear(base)

    def saved_config(self, config: MethodConfig) -> dict[str, Any]:
        return {**config.to_dict(), "peft_type": "LORA"}
