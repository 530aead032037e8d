"""Bottleneck adapters (Houlsby and Pfeiffer): a small residual MLP after a sub-layer's output.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751 (two adapters per
layer: after attention and after the feed-forward block); Pfeiffer et al., "AdapterFusion",
arXiv:2005.00247 (one adapter, after the feed-forward block, reduction factor 16).

slimtune wraps the output projection of each sub-layer (``o_proj`` / ``down_proj`` …), so the
adapter sees the sub-layer output before the residual connection, as in both papers.

File format (slimtune's own; PEFT has no bottleneck adapters). An adapter folder holds
``adapter_config.json`` — ``{"peft_type": "BOTTLENECK", "adapter_type": "houlsby" | "pfeiffer",
"reduction_factor", "non_linearity", "init_std", "target_modules", "modules_to_save", "task_type",
"base_model_name_or_path", "inference_mode"}`` — and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``) with four tensors per wrapped module ``P`` (``base_model.model.`` + module path):
``P.adapter_down.weight`` ``(m, d)``, ``P.adapter_down.bias`` ``(m,)``, ``P.adapter_up.weight``
``(d, m)``, ``P.adapter_up.bias`` ``(d,)``, where ``d`` is the module's output size and
``m = max(1, d // reduction_factor)``. Adapters of other names go to a sub-folder, as for LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimtune.config import MethodConfig, default_head, str_list
from slimtune.core.modules import linear_dims
from slimtune.errors import NotMergeableError
from slimtune.methods.contract import LayerMethod
from slimtune.methods.layers import TunerLayer
from slimtune.methods.targets import is_adaptable_linear

ADAPTER_TYPES = ("houlsby", "pfeiffer")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Output projections of the attention and feed-forward sub-layers, per architecture (regexes over
# the full module name; T5's encoder-decoder attention counts as attention).
ATTENTION_OUTPUTS = r".*\.(self_attn\.o_proj|attn\.c_proj|attention\.output\.dense|SelfAttention\.o|EncDecAttention\.o)"
FFN_OUTPUTS = r".*\.(mlp\.down_proj|mlp\.c_proj|layer\.\d+\.output\.dense|DenseReluDense\.wo)"


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapter config: ``h ← h + W_up · act(W_down · h)`` after chosen sub-layers.

    ``adapter_type="houlsby"`` puts one after attention and one after the feed-forward block of every
    layer; ``"pfeiffer"`` only after the feed-forward block. ``target_modules`` (list or regex)
    overrides that choice. ``init_std``: weights start ~N(0, init_std²), biases at zero (near-identity).
    With ``task_type="SEQ_CLS"`` the ``classifier``/``score`` head trains too unless ``modules_to_save=[]``.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    adapter_type: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    init_std: float = 1e-3
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type={self.adapter_type!r} is not supported; use one of {ADAPTER_TYPES}.")
        if not isinstance(self.reduction_factor, int) or isinstance(self.reduction_factor, bool) or \
                self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be a positive integer "
                             "(bottleneck size = hidden size // reduction_factor; 16 is usual).")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity={self.non_linearity!r} is not supported; use one of "
                             f"{sorted(ACTIVATIONS)}.")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise ValueError(f"init_std={self.init_std!r} must be a number ≥ 0 (e.g. 1e-3 for a near-identity start).")
        self.target_modules = str_list("target_modules", self.target_modules)
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)
        if self.target_modules is None:
            self.target_modules = (
                f"(?:{ATTENTION_OUTPUTS}|{FFN_OUTPUTS})" if self.adapter_type == "houlsby" else FFN_OUTPUTS
            )


class BottleneckLinear(TunerLayer):
    """A linear layer followed by bottleneck adapters: ``h = W x + b``, then ``h ← h + W_up · act(W_down · h)``.

    ``W_down``: (m, d), ``W_up``: (d, m), ``m = d // reduction_factor``; params per adapter
    ``2·d·m + d + m``. Several active adapters apply one after another. Not mergeable (the
    activation sits between the two projections).
    """

    adapter_attrs = ("adapter_down", "adapter_up")
    adapter_values = ("adapter_act",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        d = self.out_features
        m = max(1, d // config.reduction_factor)
        device = self.adapter_device()
        down, up = nn.Linear(d, m, device=device), nn.Linear(m, d, device=device)
        with torch.no_grad():
            for linear in (down, up):
                nn.init.normal_(linear.weight, std=config.init_std)
                nn.init.zeros_(linear.bias)
        self.adapter_down[adapter_name], self.adapter_up[adapter_name] = down, up
        self.adapter_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.active_adapters.append(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)  # (…, d)
        for name in self.unmerged_active():
            down, up, act = self.adapter_down[name], self.adapter_up[name], self.adapter_act[name]
            h = h + up(act(down(h.to(down.weight.dtype)))).to(h.dtype)  # (…, d) → (…, m) → (…, d)
        return h

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotMergeableError(
            "bottleneck adapters cannot be merged into the base weight: the non-linearity between W_down and W_up "
            "makes the adapter non-linear in h. Keep them as separate modules (they add a small latency)."
        )

    def extra_repr(self) -> str:
        sizes = {n: m.out_features for n, m in self.adapter_down.items()}
        return f"features={self.out_features}, bottleneck={sizes}"


class BottleneckMethod(LayerMethod):
    peft_type: ClassVar[str] = "BOTTLENECK"
    config_class: ClassVar[type[MethodConfig]] = BottleneckConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (BottleneckLinear,)

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        if is_adaptable_linear(base):
            return BottleneckLinear(base)
        raise TypeError(
            f"bottleneck adapters follow a linear output projection, not a {type(base).__name__}; "
            "pick target_modules that name linear layers (e.g. 'o_proj', 'down_proj')."
        )
