"""LoKr: low-rank Kronecker product adaptation, PEFT's ``LOKR``.

Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
arXiv:2309.14859 (LyCORIS' LoKr, as HF PEFT implements it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.config import MethodConfig
from slimtune.core.modules import is_conv1d, linear_dims
from slimtune.methods.contract import LayerMethod
from slimtune.methods.default_targets import LOW_RANK_TARGETS
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lycoris import LycorisConfig, rank_dropout_keep
from slimtune.methods.targets import pattern_value, wrap_linear

LOKR_INITS = (True, False, "lycoris")


@dataclass
class LokrConfig(LycorisConfig):
    """LoKr with PEFT's field names: ``ΔW = (alpha / r) · W1 ⊗ W2`` (a Kronecker product).

    Each dimension is split into two factors, ``out = a · b`` and ``in = c · d`` (the pair nearest its square root,
    or with one factor ``decompose_factor``); ``W1`` is ``(a, c)``, ``W2`` ``(b, d)``. ``W2`` is the product of two
    rank-``r`` factors when ``r < max(b, d) / 2`` (else a full matrix); so is ``W1`` with ``decompose_both`` and
    ``r < max(a, c) / 2``. ``init_weights``: True starts ``W1`` at zero (a no-op), ``"lycoris"`` ``W2``, False
    neither. ``rank_dropout`` drops output rows while training (rescaled by the kept fraction with
    ``rank_dropout_scale``); ``module_dropout`` skips the adapter for a forward call with that probability.
    """

    peft_type: ClassVar[str] = "LOKR"
    # A rank of at least half a factor's side makes that factor a full matrix: r need not be any tensor's dimension
    # (and whatever r, a layer's tensors hold at most (a · c + b · d) + 2 r (b + d) values with r < max(b, d) / 2).
    rank_is_a_dimension: ClassVar[bool] = False

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in LOKR_INITS:
            raise ValueError(f"init_weights={self.init_weights!r} is not supported; use one of {LOKR_INITS}.")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) \
                or (self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ValueError(f"decompose_factor={self.decompose_factor!r}: use -1 (split each dimension near its "
                             "square root) or a positive int (one factor of each split).")


def split_dimension(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension``: ``factor`` and its cofactor when it divides the dimension (in that
    order, as LyCORIS returns them, whichever is larger); otherwise the divisor pair nearest the square root with
    ``m ≤ n`` and ``m`` at most ``factor`` (LyCORIS' rule, PEFT's shapes). E.g. 576 → (24, 24), 128 → (8, 16),
    127 → (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, math.isqrt(dimension) + 1):  # larger divisors up to √d bring m + n down
        if candidate > limit:
            break
        if dimension % candidate == 0:
            m = candidate
    return m, dimension // m


def _factor_or_product(full: nn.ParameterDict, a: nn.ParameterDict, b: nn.ParameterDict,
                       name: str) -> torch.Tensor:
    return full[name] if name in full else a[name] @ b[name]


class LokrLinear(TunerLayer):
    """LoKr on a linear layer: ``h = W x + b + ΔW x`` with ``ΔW = s · W1 ⊗ W2``, ``s = alpha / r``.

    ``ΔW`` is never built in the forward: with ``x`` seen as a ``(c, d)`` matrix ``X``, ``(W1 ⊗ W2) x`` is
    ``W1 X W2ᵀ`` seen as a vector of ``a · b``, so a call costs ``c d b + a c b`` multiply-adds per token instead of
    ``a b c d`` and keeps a ``(c, b)`` intermediate, not an ``(out, in)`` weight. Mergeable: ``W += ΔW`` (transposed
    for Conv1D).
    """

    adapter_attrs = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    adapter_values = ("scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.shapes: dict[str, tuple[int, int, int, int]] = {}  # (a, b, c, d): out = a · b, in = c · d
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def add_adapter(self, adapter_name: str, config: Any, module_name: str) -> None:
        assert isinstance(config, LokrConfig)
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        a, b = split_dimension(self.out_features, config.decompose_factor)
        c, d = split_dimension(self.in_features, config.decompose_factor)
        w1_full = not (config.decompose_both and r < max(a, c) / 2)
        w2_full = not r < max(b, d) / 2
        shapes = {"lokr_w1": (a, c)} if w1_full else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        shapes.update({"lokr_w2": (b, d)} if w2_full else {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)})
        # True: W1 (or its first factor) starts at zero; "lycoris": W2 (or its second factor); False: neither.
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}[config.init_weights]
        device = self.adapter_device()
        for attr, shape in shapes.items():
            weight = torch.empty(shape, device=device)
            if attr in zero:
                nn.init.zeros_(weight)
            else:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            getattr(self, attr)[adapter_name] = nn.Parameter(weight)
        self.shapes[adapter_name] = (a, b, c, d)
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        self.module_dropout[adapter_name] = config.module_dropout
        self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.shapes.pop(adapter_name, None)

    def kronecker_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1 (a, c), W2 (b, d))``, either one the product of its two factors where it is decomposed."""
        w1 = _factor_or_product(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b, adapter_name)
        return w1, _factor_or_product(self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b, adapter_name)

    def kept_elements(self, adapter_name: str) -> tuple[int, int, int]:
        """What the forward keeps for backward besides its input, for the memory estimate: ``X W2ᵀ`` (``c · b``
        per token), and ``W1`` and ``W2`` where each is built from two factors (``W2`` only when the input needs a
        gradient)."""
        a, b, c, d = self.shapes[adapter_name]
        return c * b, 0 if adapter_name in self.lokr_w1 else a * c, 0 if adapter_name in self.lokr_w2 else b * d

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self.kronecker_factors(adapter_name)
        delta = torch.kron(w1, w2).detach() * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if self.training and torch.rand(1).item() < self.module_dropout[name]:
                continue  # the whole adapter skipped for this call
            w1, w2 = self.kronecker_factors(name)
            a, b, c, d = self.shapes[name]
            X = x.to(w1.dtype).reshape(*x.shape[:-1], c, d)
            delta = (w1 @ (X @ w2.T)).reshape(*x.shape[:-1], a * b) * self.scaling[name]  # W1 X W2ᵀ
            if self.training and self.rank_dropout[name]:
                delta = delta * rank_dropout_keep(a * b, self.rank_dropout[name], delta, self.rank_dropout_scale[name])
            result = result + delta.to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kronecker_shapes={self.shapes}"


class LokrMethod(LayerMethod):
    peft_type: ClassVar[str] = "LOKR"
    config_class: ClassVar[type[MethodConfig]] = LokrConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (LokrLinear,)
    default_targets: ClassVar[Mapping[str, list[str] | str]] = LOW_RANK_TARGETS

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        return wrap_linear(base, LokrLinear, "LoKr")
