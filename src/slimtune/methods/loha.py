"""LoHa: low-rank Hadamard product adaptation, PEFT's ``LOHA``.

Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", arXiv:2108.06098 (as used by LyCORIS and HF PEFT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import MethodConfig
from slimtune.core.modules import is_conv1d, linear_dims
from slimtune.methods.contract import LayerMethod
from slimtune.methods.default_targets import LOW_RANK_TARGETS
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lycoris import LycorisConfig, rank_dropout_keep
from slimtune.methods.targets import pattern_value, wrap_linear


@dataclass
class LohaConfig(LycorisConfig):
    """LoHa with PEFT's field names: ``ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)``.

    ``rank_dropout`` drops output rows of ΔW while training (rescaled by the kept fraction, as PEFT);
    ``module_dropout`` skips the whole adapter for a forward call with that probability.
    """

    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = True


class _HadamardDelta(torch.autograd.Function):
    """``s · (W1a W1b) ⊙ (W2a W2b)`` keeping only the four factors for backward (each product is rebuilt
    there instead of being stored: two ``(out, in)`` tensors less per layer)."""

    @staticmethod
    def forward(ctx: Any, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # dL/d(W1a W1b)
        g2 = grad * (w1a @ w1b)  # dL/d(W2a W2b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


class LohaLinear(TunerLayer):
    """LoHa on a linear layer: ``h = W x + b + ΔW x`` with ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)``.

    W1a, W2a: (out, r); W1b, W2b: (r, in); ``s = alpha / r``. W1a, W1b, W2a start Kaiming-uniform (a=√5)
    and W2b at zero, so a new adapter is a no-op. ΔW has rank up to r² with 2r(in + out) parameters.
    Mergeable: ``W += ΔW`` (transposed for Conv1D).
    """

    adapter_attrs = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    adapter_values = ("scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.hada_w1_a, self.hada_w1_b = nn.ParameterDict(), nn.ParameterDict()
        self.hada_w2_a, self.hada_w2_b = nn.ParameterDict(), nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    def add_adapter(self, adapter_name: str, config: Any, module_name: str) -> None:
        assert isinstance(config, LohaConfig)
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        device, out_f, in_f = self.adapter_device(), self.out_features, self.in_features
        shapes = {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}
        for attr, shape in shapes.items():
            weight = torch.empty(shape, device=device)
            if attr != "hada_w2_b" or not config.init_weights:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(weight)
            getattr(self, attr)[adapter_name] = nn.Parameter(weight)
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.active_adapters.append(adapter_name)

    def hadamard_delta(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` (out, in)."""
        factors = [getattr(self, attr)[adapter_name] for attr in self.adapter_attrs]
        return _HadamardDelta.apply(*factors, self.scaling[adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.hadamard_delta(adapter_name).detach()
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if self.training and torch.rand(1).item() < self.module_dropout[name]:
                continue  # the whole adapter skipped for this call
            delta = self.hadamard_delta(name)  # (out, in)
            if self.training and self.rank_dropout[name]:
                delta = delta * rank_dropout_keep(delta.shape[0], self.rank_dropout[name], delta)[:, None]
            result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        ranks = {n: w.shape[1] for n, w in self.hada_w1_a.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}"


class LohaMethod(LayerMethod):
    peft_type: ClassVar[str] = "LOHA"
    config_class: ClassVar[type[MethodConfig]] = LohaConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (LohaLinear,)
    default_targets: ClassVar[Mapping[str, list[str] | str]] = LOW_RANK_TARGETS

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        return wrap_linear(base, LohaLinear, "LoHa")
