"""(IA)³: learned vectors that rescale keys, values and the feed-forward intermediate activation.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", arXiv:2205.05638. On disk exactly as HF PEFT: ``...<module>.ia3_l`` of shape ``(out, 1)``
for attention targets and ``(1, in)`` for feed-forward targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimtune.config import MethodConfig, default_head, str_list
from slimtune.core.modules import is_conv1d, linear_dims
from slimtune.errors import NotMergeableError
from slimtune.methods.contract import LayerMethod
from slimtune.methods.default_targets import IA3_TARGETS, model_type
from slimtune.methods.layers import TunerLayer, check_finite_merge, mergeable_weight, widened_copy
from slimtune.methods.targets import is_adaptable_linear, name_matches


@dataclass
class IA3Config(MethodConfig):
    """(IA)³ config with PEFT's field names.

    ``target_modules`` are the layers that get a vector (e.g. ``["k_proj", "v_proj", "down_proj"]``);
    ``feedforward_modules`` names those among them whose *input* is rescaled (the feed-forward
    output projection, whose input is the activation ``γ(W1 x)``); the others rescale their output.
    PEFT's defaults: llama ``k_proj, v_proj, down_proj`` / ff ``down_proj``; gpt2 ``c_attn, mlp.c_proj``
    / ff ``mlp.c_proj``; t5 ``k, v, wo`` / ff ``wo``; bert ``key, value, output.dense`` / ff ``output.dense``.
    With ``task_type="SEQ_CLS"`` the ``classifier``/``score`` head trains too unless ``modules_to_save=[]``.
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = str_list("target_modules", self.target_modules)
        self.exclude_modules = str_list("exclude_modules", self.exclude_modules)
        self.feedforward_modules = str_list("feedforward_modules", self.feedforward_modules)
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)
        if self.target_modules is not None and self.feedforward_modules is None:
            raise ValueError(
                "feedforward_modules=None: name which of target_modules are feed-forward layers (their input, the "
                "FFN activation, is rescaled), e.g. ['down_proj'] for Llama or ['mlp.c_proj'] for GPT-2; "
                "pass [] if none is."
            )
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            stray = [f for f in self.feedforward_modules if not name_matches(f, self.target_modules)]
            if stray:
                raise ValueError(
                    f"feedforward_modules {stray} are not among target_modules {self.target_modules}; an (IA)³ "
                    "feed-forward module must also be a target. Add it to target_modules or remove it."
                )


def is_feedforward(module_name: str, feedforward_modules: str | list[str] | None) -> bool:
    """PEFT's rule for (IA)³, looser than target matching: a string is a full-match regex, a list entry matches
    any name that ends with it (``"o"`` marks T5's ``wo`` too), so that both libraries read each other's files."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(entry) for entry in feedforward_modules or [])


class IA3Linear(TunerLayer):
    """(IA)³ on a linear layer: ``h = l ⊙ (W x + b)`` (keys, values) or ``h = W (l ⊙ x) + b`` (feed-forward).

    ``l`` starts at ones, so a new adapter is a no-op. Params per layer: ``out`` (attention) or ``in``
    (feed-forward). Mergeable: ``W ← diag(l) W`` (and ``b ← l ⊙ b``) or ``W ← W diag(l)``; unmerge divides.
    """

    adapter_attrs = ("ia3_l",)
    adapter_values = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}

    def add_adapter(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        feedforward = is_feedforward(module_name, config.feedforward_modules)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        device = self.adapter_device()
        weight = torch.ones(shape, device=device) if config.init_ia3_weights else torch.randn(shape, device=device)
        self.ia3_l[adapter_name] = nn.Parameter(weight)
        self.is_feedforward[adapter_name] = feedforward
        self.active_adapters.append(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.unmerged_active()
        for name in active:
            if self.is_feedforward[name]:
                x = (x * self.ia3_l[name].flatten()).to(x.dtype)  # (…, in): scale the FFN activation
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            if not self.is_feedforward[name]:
                result = (result * self.ia3_l[name].flatten()).to(result.dtype)  # (…, out): scale K / V
        return result

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """``l`` shaped to broadcast against ``base_layer.weight`` ((out, in), or (in, out) for Conv1D)."""
        vector = self.ia3_l[adapter_name].detach()
        return vector.T if self.fan_in_fan_out else vector

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotMergeableError("(IA)³ rescales the weight rather than adding to it; use merge()/unmerge().")

    def _merge(self, names: list[str], check_only: bool) -> None:
        """Scale W (and b) by each adapter's ``l``, on copies checked first (see :meth:`TunerLayer.merge`)."""
        if not names:
            return
        weight = mergeable_weight(self.base_layer)
        bias = getattr(self.base_layer, "bias", None)
        with torch.no_grad():  # in at least fp32, rounded once to W's dtype (as PEFT's merge rounds)
            new_weight = widened_copy(weight)
            new_bias = None if bias is None else widened_copy(bias)
            for name in names:
                new_weight.mul_(self._weight_scale(name))
                check_finite_merge(new_weight, name)
                if not self.is_feedforward[name] and new_bias is not None:
                    new_bias.mul_(self.ia3_l[name].detach().flatten())
                    check_finite_merge(new_bias, name)
            new_weight = new_weight.to(weight.dtype)
            check_finite_merge(new_weight, names[-1])  # (a cast to a narrower dtype can overflow)
            if bias is not None and new_bias is not None:
                new_bias = new_bias.to(bias.dtype)
                check_finite_merge(new_bias, names[-1])
            if check_only:
                return
            weight.copy_(new_weight)
            if bias is not None and new_bias is not None:
                bias.copy_(new_bias)
        self.merged_adapters += names

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        weight = mergeable_weight(self.base_layer)
        bias = getattr(self.base_layer, "bias", None)
        with torch.no_grad():  # in at least fp32: PEFT's guard against l = 0 (+1e-8) is 0 in fp16
            restored, restored_bias = widened_copy(weight), None if bias is None else widened_copy(bias)
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                restored.div_(self._weight_scale(name).to(restored.dtype) + 1e-8)
                if not self.is_feedforward[name] and restored_bias is not None:
                    restored_bias.div_(self.ia3_l[name].detach().flatten().to(restored_bias.dtype) + 1e-8)
            weight.copy_(restored)
            if bias is not None and restored_bias is not None:
                bias.copy_(restored_bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, feedforward={self.is_feedforward}"


class IA3Method(LayerMethod):
    peft_type: ClassVar[str] = "IA3"
    config_class: ClassVar[type[MethodConfig]] = IA3Config
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (IA3Linear,)

    def fill_default_targets(self, model: nn.Module, config: MethodConfig) -> None:
        """Both lists unset: PEFT's defaults for the architecture (see default_targets)."""
        assert isinstance(config, IA3Config)
        defaults = IA3_TARGETS.get(model_type(model) or "")
        if config.target_modules is None and config.feedforward_modules is None and defaults is not None:
            config.target_modules, config.feedforward_modules = list(defaults[0]), list(defaults[1])

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        if is_adaptable_linear(base):
            return IA3Linear(base)
        raise TypeError(
            f"(IA)³ cannot wrap a {type(base).__name__}; supported: nn.Linear, transformers Conv1D, slimtune "
            "quantized linear. Pick other target_modules."
        )
