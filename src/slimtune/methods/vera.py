"""VeRA: vector-based random matrix adaptation.

Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv:2310.11454.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.config import MethodConfig, check_layer_targets, check_probability
from slimtune.core.modules import is_conv1d, linear_dims
from slimtune.core.state import AdapterState
from slimtune.methods.contract import LayerMethod, tuner_layers
from slimtune.methods.default_targets import VERA_TARGETS
from slimtune.methods.layers import TunerLayer
from slimtune.methods.targets import is_adaptable_linear

HOLDER = "slimtune_vera"  # the model attribute holding every VeRA adapter's shared projections
VERA_BIAS_MODES = ("none", "all", "vera_only")


@dataclass
class VeraConfig(MethodConfig):
    """VeRA with PEFT's field names: ``h = W x + b + λ_b ⊙ B (λ_d ⊙ A dropout(x))``.

    One frozen random pair A ``(r, max_in)`` / B ``(max_out, r)`` (Kaiming-uniform from
    ``projection_prng_key``, exactly PEFT's draw) is shared by every adapted layer, each taking the
    slice it needs. Trainable per layer: ``λ_b`` (out, init 0) and ``λ_d`` (r, init ``d_initial``).
    With ``save_projection`` the pair is saved as ``base_model.vera_A`` / ``base_model.vera_B``;
    otherwise it is regenerated from the seed on load.
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer (VeRA's shared rank, e.g. 256).")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ValueError(f"projection_prng_key={self.projection_prng_key!r} must be an integer seed.")
        check_probability("vera_dropout", self.vera_dropout)
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool) \
                or not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial={self.d_initial!r} must be a number (the initial λ_d, e.g. 0.1).")
        if self.bias not in VERA_BIAS_MODES:
            raise ValueError(f"bias={self.bias!r} is not a VeRA bias mode; use one of {VERA_BIAS_MODES}.")
        check_layer_targets(self)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain √2, fan_in = shape[1]) drawn from ``generator``, with PEFT's arithmetic."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """The frozen random pair one VeRA adapter shares across layers (buffers, not in the model's state dict)."""

    vera_A: torch.Tensor  # (r, max_in)
    vera_B: torch.Tensor  # (max_out, r)

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, device=None) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        a = kaiming_uniform((r, max_in), generator)  # drawn first, as PEFT does
        b = kaiming_uniform((max_out, r), generator)
        self.register_buffer("vera_A", a.to(device), persistent=False)
        self.register_buffer("vera_B", b.to(device), persistent=False)


class VeraLinear(TunerLayer):
    """VeRA on a linear layer: ``h = W x + b + λ_b ⊙ B (λ_d ⊙ A dropout(x))``.

    A ``(r, in)`` and B ``(out, r)`` are slices of the adapter's shared frozen projections; ``λ_b``
    (out) starts at 0, so a new adapter is a no-op, and ``λ_d`` (r) at ``d_initial``. Trainable
    parameters per layer: out + r. Merging adds ``(λ_b ⊙ B)(λ_d ⊙ A)`` to W.
    """

    adapter_attrs = ("vera_lambda_b", "vera_lambda_d")
    adapter_values = ("vera_dropout", "vera_projection")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.vera_projection: dict[str, VeraProjection] = {}  # set by VeraMethod.add; not submodules

    def add_adapter(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        device = self.adapter_device()
        if config.init_weights:
            b, d = torch.zeros(self.out_features), torch.full((config.r,), float(config.d_initial))
        else:  # PEFT's non-default init, for tests of a non-trivial adapter
            b, d = torch.ones(self.out_features), torch.randn(config.r)
        self.vera_lambda_b[adapter_name] = nn.Parameter(b.to(device))
        self.vera_lambda_d[adapter_name] = nn.Parameter(d.to(device))
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout else nn.Identity()
        self.active_adapters.append(adapter_name)

    def projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices ``A (r, in)`` and ``B (out, r)`` of the shared pair."""
        projection = self.vera_projection.get(adapter_name)
        if projection is None:
            raise RuntimeError(f"VeRA adapter {adapter_name!r} has no shared projections; add VeRA adapters with "
                               "slimtune.add_adapter(model, VeraConfig(...)) so they are created.")
        return projection.vera_A[:, : self.in_features], projection.vera_B[: self.out_features]

    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.vera_factors(adapter_name)

    def vera_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ_d ⊙ A, λ_b ⊙ B)``: the adapter as a LoRA pair with ``ΔW = B' A'``."""
        A, B = self.projections(adapter_name)
        return self.vera_lambda_d[adapter_name][:, None] * A, self.vera_lambda_b[adapter_name][:, None] * B

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.vera_factors(adapter_name)
        delta = B @ A  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            A, B = self.projections(name)
            lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
            x_d = self.vera_dropout[name](x.to(lambda_d.dtype))
            result = result + (lambda_b * F.linear(lambda_d * F.linear(x_d, A), B)).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names}"


class VeraMethod(LayerMethod):
    """VeRA adapters share one frozen random pair per adapter, held in ``model.slimtune_vera`` (a submodule, so
    it follows the model's device) and referenced by each layer."""

    peft_type: ClassVar[str] = "VERA"
    config_class: ClassVar[type[MethodConfig]] = VeraConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (VeraLinear,)
    default_targets: ClassVar[Mapping[str, list[str] | str]] = VERA_TARGETS

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        if not is_adaptable_linear(base):
            raise TypeError(f"VeRA wraps linear layers only, not a {type(base).__name__}; pick linear "
                            "target_modules (e.g. ['q_proj', 'v_proj']).")
        return VeraLinear(base)

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        """Wrap the targets, then draw the shared pair from the seed, sized for the largest layer."""
        assert isinstance(config, VeraConfig)
        super().add(model, config, adapter_name, state)
        layers = [m for _, m in tuner_layers(model) if isinstance(m, VeraLinear) and adapter_name in m.adapter_names]
        holder = _holder(model)
        projection = VeraProjection(config.r, max(m.in_features for m in layers), max(m.out_features for m in layers),
                                    config.projection_prng_key, device=layers[0].vera_lambda_b[adapter_name].device)
        holder[adapter_name] = projection
        for layer in layers:
            layer.vera_projection[adapter_name] = projection

    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        holder = model._modules.get(HOLDER)
        if not isinstance(holder, nn.ModuleDict):  # absent (the holder is always a ModuleDict, see _holder)
            return
        if adapter_name in holder:
            del holder[adapter_name]
        if not len(holder):
            delattr(model, HOLDER)

    def adapter_tensors(self, model: nn.Module, adapter_name: str, state: AdapterState) -> dict[str, torch.Tensor]:
        config = state.configs[adapter_name]
        assert isinstance(config, VeraConfig)
        if not config.save_projection:
            return {}
        projection = _holder(model)[adapter_name]
        assert isinstance(projection, VeraProjection)  # add() puts one there per adapter
        return {"base_model.vera_A": projection.vera_A, "base_model.vera_B": projection.vera_B}


def _holder(model: nn.Module) -> nn.ModuleDict:
    if HOLDER not in model._modules:
        model.add_module(HOLDER, nn.ModuleDict())
    holder = model._modules[HOLDER]
    assert isinstance(holder, nn.ModuleDict)
    return holder
