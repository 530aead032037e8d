"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): a small MLP on a sub-layer's output.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751 (two adapters per
layer: after attention and after the feed-forward block); Pfeiffer et al., "AdapterFusion",
arXiv:2005.00247 (one adapter, after the feed-forward block, reduction factor 16); He et al.,
arXiv:2110.04366 (parallel adapters, AdapterHub placement only).

Two placements:

- ``placement="projection"`` (slimtune's own, the default): the adapter wraps the output projection of
  each sub-layer (``o_proj`` / ``down_proj`` …) and sees its output before dropout and the residual,
  ``h ← h + W_up · act(W_down · h)``.
- ``placement="adapterhub"``: exactly where and how AdapterHub (the ``adapters`` library) puts them — on
  the sub-layer's output after its dropout, with its residual and layer-norm options (``original_ln_before``,
  ``original_ln_after``, ``residual_before_ln``, ``ln_before`` / ``ln_after``, ``scaling``, ``use_gating`` …,
  AdapterHub's field names; None takes ``adapter_type``'s AdapterHub preset: ``houlsby`` = double_seq_bn,
  ``pfeiffer`` = seq_bn, ``parallel`` = par_bn). See :mod:`slimtune.adapterhub` for its file format and
  composition blocks. ``init_from`` starts the adapter from a saved folder (AdapterHub's or slimtune's):
  the folder decides the architecture fields the config leaves at their defaults.

File format (slimtune's own; PEFT has no bottleneck adapters). An adapter folder holds
``adapter_config.json`` — ``{"peft_type": "BOTTLENECK", "adapter_type", "reduction_factor",
"non_linearity", "init_std", "target_modules", "modules_to_save", "task_type", "base_model_name_or_path",
"inference_mode"}`` (plus ``placement`` and the AdapterHub fields for that placement) — and
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``). Projection placement: four tensors per wrapped
module ``P`` (``base_model.model.`` + module path): ``P.adapter_down.weight`` ``(m, d)``, ``P.adapter_down.bias``
``(m,)``, ``P.adapter_up.weight`` ``(d, m)``, ``P.adapter_up.bias`` ``(d,)``, where ``d`` is the module's output
size and ``m = max(1, d // reduction_factor)``. AdapterHub placement: ``P.adapters.<AdapterHub's parameter
names>`` per site. Adapters of other names go to a sub-folder, as for LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from slimtune.adapterhub import format as hubformat
from slimtune.adapterhub.initial import PROBE, adapter_shapes, check_initial, is_hub_folder, load_initial
from slimtune.adapterhub.layers import HubSite
from slimtune.adapterhub.modules import ACTIVATIONS, INIT_WEIGHTS, AdapterOptions
from slimtune.adapterhub.sites import Site, attach, detach_stale, drop_parallel_hook, find_sites, hidden_size
from slimtune.config import MethodConfig, check_probability, default_head, str_list
from slimtune.core.modules import linear_dims, replace_module
from slimtune.core.state import AdapterState
from slimtune.errors import NotMergeableError
from slimtune.methods.contract import PEFT_PREFIX, LayerMethod
from slimtune.methods.default_targets import model_type
from slimtune.methods.layers import TunerLayer
from slimtune.methods.targets import adaptable_summary, is_adaptable_linear

ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel")
PLACEMENTS = ("projection", "adapterhub")

# Output projections of the attention and feed-forward sub-layers, per architecture (regexes over
# the full module name; T5's encoder-decoder attention counts as attention).
ATTENTION_OUTPUTS = r".*\.(self_attn\.o_proj|attn\.c_proj|attention\.output\.dense|SelfAttention\.o|EncDecAttention\.o)"
FFN_OUTPUTS = r".*\.(mlp\.down_proj|mlp\.c_proj|layer\.\d+\.output\.dense|DenseReluDense\.wo)"
DEFAULT_TARGETS = (f"(?:{ATTENTION_OUTPUTS}|{FFN_OUTPUTS})", FFN_OUTPUTS)  # Houlsby's, Pfeiffer's

# AdapterHub's presets for the placement fields left None: double_seq_bn, seq_bn, par_bn.
PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": {"mh_adapter": True, "output_adapter": True, "original_ln_before": False},
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "original_ln_before": True},
    "parallel": {"mh_adapter": False, "output_adapter": True, "original_ln_before": False, "scaling": 4.0,
                 "init_weights": "mam_adapter"},
}
PRESET_COMMON = {"original_ln_after": True, "residual_before_ln": True, "scaling": 1.0, "init_weights": "bert"}
# Fields of the AdapterHub placement, with the value that means "not set" (what the projection placement needs).
HUB_FIELDS: dict[str, Any] = {
    "mh_adapter": None, "output_adapter": None, "original_ln_before": None, "original_ln_after": None,
    "residual_before_ln": None, "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False,
    "scaling": None, "use_gating": False, "leave_out": [], "dropout": 0.0, "init_weights": None,
    "init_weights_seed": None,
}
NOT_FROM_FOLDER = {"init_from", "base_model_name_or_path", "inference_mode"}


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapter config: ``h ← h + W_up · act(W_down · h)`` after chosen sub-layers.

    ``adapter_type="houlsby"`` puts one after attention and one after the feed-forward block of every
    layer; ``"pfeiffer"`` only after the feed-forward block; ``"parallel"`` (AdapterHub placement) one beside
    it. Projection placement: ``target_modules`` (list or regex) overrides that choice; ``init_std``: weights
    start ~N(0, init_std²), biases at zero (near-identity). AdapterHub placement: ``mh_adapter`` /
    ``output_adapter`` choose the sites, ``leave_out`` skips layers, ``init_weights`` is AdapterHub's
    initialiser, and ``reduction_factor`` may be a number or a mapping ``{"<layer>": rf, "default": rf}``.
    With ``task_type="SEQ_CLS"`` the ``classifier``/``score`` head trains too unless ``modules_to_save=[]``.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    adapter_type: str = "houlsby"
    reduction_factor: int | float | dict[str, float] = 16
    non_linearity: str = "relu"
    init_std: float = 1e-3
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    placement: str = "projection"
    init_from: str | None = None
    # AdapterHub placement only (AdapterHub's BnConfig names); None: adapter_type's AdapterHub preset.
    mh_adapter: bool | None = None
    output_adapter: bool | None = None
    original_ln_before: bool | None = None
    original_ln_after: bool | None = None
    residual_before_ln: bool | str | None = None
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    scaling: float | str | None = None
    use_gating: bool = False
    leave_out: list[int] = field(default_factory=list)
    dropout: float = 0.0
    init_weights: str | None = None
    init_weights_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_from is not None:
            self._take_from_folder(Path(self.init_from))
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} is not supported; use one of {PLACEMENTS}.")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type={self.adapter_type!r} is not supported; use one of {ADAPTER_TYPES}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity={self.non_linearity!r} is not supported; use one of "
                             f"{sorted(ACTIVATIONS)}.")
        if not isinstance(self.init_std, (int, float)) or not 0 <= self.init_std < math.inf:
            raise ValueError(f"init_std={self.init_std!r} must be a number ≥ 0 (e.g. 1e-3 for a near-identity start).")
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)
        self.target_modules = str_list("target_modules", self.target_modules)
        if self.placement == "adapterhub":
            self._check_adapterhub()
            return
        rf = self.reduction_factor
        if not isinstance(rf, int) or isinstance(rf, bool) or rf <= 0:
            raise ValueError(f"reduction_factor={rf!r} must be a positive integer "
                             "(bottleneck size = hidden size // reduction_factor; 16 is usual).")
        if self.adapter_type == "parallel":
            raise ValueError("adapter_type='parallel' needs placement='adapterhub' (the adapter reads the sub-layer's "
                             "input, which only that placement sees).")
        for name, unset in HUB_FIELDS.items():
            if getattr(self, name) != unset:
                raise ValueError(f"{name}={getattr(self, name)!r} applies to placement='adapterhub' only; set "
                                 "placement='adapterhub' or leave it out.")
        if self.target_modules is None:
            self.target_modules = DEFAULT_TARGETS[0] if self.adapter_type == "houlsby" else DEFAULT_TARGETS[1]

    def _check_adapterhub(self) -> None:
        if self.target_modules is not None:
            raise ValueError("target_modules applies to placement='projection'; with placement='adapterhub' the sites "
                             "are chosen by mh_adapter / output_adapter (and leave_out).")
        if self.init_std != 1e-3:
            raise ValueError(f"init_std={self.init_std!r} applies to placement='projection'; AdapterHub placement "
                             f"initialises with init_weights (one of {INIT_WEIGHTS}).")
        for name, value in {**PRESET_COMMON, **PRESETS[self.adapter_type]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        rfs = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [self.reduction_factor]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in rfs):
            raise ValueError(f"reduction_factor={self.reduction_factor!r} must be a positive number or a mapping "
                             "of layer index (or 'default') to one.")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("mh_adapter=False and output_adapter=False leave no site for the adapter.")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"residual_before_ln={self.residual_before_ln!r} must be true, false or 'post_add'.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True (it takes the residual after "
                             "the model's residual addition).")
        if not (self.scaling in ("learned", "channel") or isinstance(self.scaling, (int, float))
                and math.isfinite(self.scaling)):
            raise ValueError(f"scaling={self.scaling!r} must be a number, 'learned' or 'channel'.")
        if isinstance(self.scaling, int) and not isinstance(self.scaling, bool):
            self.scaling = float(self.scaling)
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights={self.init_weights!r} is not supported; use one of {INIT_WEIGHTS}.")
        check_probability("dropout", self.dropout)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.leave_out):
            raise ValueError(f"leave_out={self.leave_out!r} must be a list of layer indices.")

    def _take_from_folder(self, folder: Path) -> None:
        """Fill the architecture fields from ``init_from``'s config; a field set here that disagrees is an error."""
        kind = hubformat.folder_kind(folder)
        if kind == "adapterhub":
            found = hubformat.bottleneck_fields(hubformat.read_hub_config(folder), folder)
        elif kind == "peft":
            data = hubformat.read_json(folder / hubformat.CONFIG_NAME)
            if data.get("peft_type") != self.peft_type:
                raise ValueError(f"init_from={str(folder)!r} holds a {data.get('peft_type')} adapter, not a bottleneck "
                                 "adapter.")
            found = {k: v for k, v in data.items() if k != "peft_type"}
        else:
            raise ValueError(f"init_from={str(folder)!r} holds an AdapterFusion layer; use an ADAPTER_FUSION config.")
        defaults = {f.name: _default(f) for f in dataclasses.fields(self)}
        for key, value in found.items():
            if key not in defaults or key in NOT_FROM_FOLDER:
                continue
            current = getattr(self, key)
            if current == defaults[key]:
                setattr(self, key, value)
            elif current != value:
                raise ValueError(f"init_from={str(folder)!r}: the folder's {key}={value!r} differs from this config's "
                                 f"{key}={current!r}; leave {key} out (the folder decides it) or drop init_from.")

    def adapter_options(self) -> AdapterOptions:
        """The AdapterHub placement's options, as its modules take them."""
        assert self.placement == "adapterhub" and self.scaling is not None and self.init_weights is not None
        return AdapterOptions(
            non_linearity=self.non_linearity, is_parallel=self.adapter_type == "parallel",
            original_ln_before=bool(self.original_ln_before), original_ln_after=bool(self.original_ln_after),
            residual_before_ln=self.residual_before_ln if self.residual_before_ln == "post_add" else
            bool(self.residual_before_ln), adapter_residual_before_ln=self.adapter_residual_before_ln,
            ln_before=self.ln_before, ln_after=self.ln_after, scaling=self.scaling, use_gating=self.use_gating,
            dropout=self.dropout, init_weights=self.init_weights, init_weights_seed=self.init_weights_seed,
        )

    def bottleneck_size(self, d: int, layer: int) -> int:
        """``m`` for a site of size ``d`` in block ``layer`` (AdapterHub: ``int(d // rf)``, at least 1)."""
        rf: Any = self.reduction_factor
        if isinstance(rf, dict):
            if str(layer) not in rf and "default" not in rf:
                raise ValueError(f"reduction_factor={rf!r} gives no value for layer {layer} and no 'default'.")
            rf = rf.get(str(layer), rf.get("default"))
        return max(1, int(d // rf))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    return factory() if callable(factory) else None


NOT_MERGEABLE = ("bottleneck adapters cannot be merged into the base weight: the non-linearity between W_down and W_up "
                 "makes the adapter non-linear in h. Keep them as separate modules (they add a small latency).")


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
        assert isinstance(config.reduction_factor, int)  # projection placement checks it
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
        raise NotMergeableError(NOT_MERGEABLE)

    def check_mergeable(self) -> None:
        raise NotMergeableError(NOT_MERGEABLE)

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

    def target_names(self, model: nn.Module, config: MethodConfig, skip: Iterable[str]) -> list[str]:
        """As every layer method; the default layers (set when ``target_modules`` is left out) say which families
        they know when this model is not one of them."""
        assert isinstance(config, BottleneckConfig)
        if config.target_modules in DEFAULT_TARGETS and not any(
                re.fullmatch(config.target_modules, name) for name, _ in model.named_modules()):
            raise ValueError(f"target_modules is unset and the default bottleneck layers (the attention and "
                             "feed-forward output projections of the BERT, GPT-2, Llama and T5 families) match no "
                             f"module of this {model_type(model)!r} model; set target_modules to its output "
                             f"projections (e.g. ['out_proj', 'fc2'] for BART or OPT). Layers that can be adapted: "
                             f"{adaptable_summary(model)}.")
        return super().target_names(model, config, skip)

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        assert isinstance(config, BottleneckConfig)
        if config.placement == "projection":
            super().check(model, config)
        else:
            sites = find_sites(model)  # raises for architectures AdapterHub placement does not know
            if config.residual_before_ln == "post_add" and any(s.kind == "pre_norm" for s in sites):
                raise ValueError("residual_before_ln='post_add' needs a post-norm model (BERT family): in pre-norm "
                                 "blocks AdapterHub has no residual addition before the adapter.")
            for site, _ in self._hub_sites(model, config):
                module = model.get_submodule(site.name)
                inner = [n for n, m in module.named_modules() if isinstance(m, TunerLayer) and m is not module]
                if inner and not isinstance(module, HubSite):
                    raise ValueError(f"{site.name} holds adapters of another method ({site.name}.{inner[0]} …): "
                                     "AdapterHub placement wraps the whole sub-layer, which would rename their saved "
                                     "tensors. Use placement='projection' beside them, or separate models.")
        if config.init_from is not None:
            check_initial(model, Path(config.init_from), self._shapes(model, config, Path(config.init_from)))

    def _hub_sites(self, model: nn.Module, config: BottleneckConfig) -> list[tuple[Site, int]]:
        """The AdapterHub sites the adapter goes to, with its bottleneck size at each."""
        d = hidden_size(model)
        wanted = {"mh_adapter": config.mh_adapter, "output_adapter": config.output_adapter}
        return [(s, config.bottleneck_size(d, s.index)) for s in find_sites(model)
                if wanted[s.location] and s.index not in config.leave_out]

    def _shapes(self, model: nn.Module, config: BottleneckConfig, folder: Path) -> dict[str, torch.Size]:
        """The new adapter's tensors as ``init_from``'s format keys them (before anything is built)."""
        if config.placement == "adapterhub":
            return adapter_shapes(self._hub_sites(model, config), hidden_size(model), config.adapter_options(), PROBE,
                                  hub_keys=is_hub_folder(folder))
        shapes = {}
        for name, module in self.plan(model, config):
            d = linear_dims(module.base_layer if isinstance(module, TunerLayer) else module)[1]
            m = max(1, d // cast(int, config.reduction_factor))  # projection placement: an int
            prefix = f"{PEFT_PREFIX}{name}."
            shapes.update({prefix + "adapter_down.weight": torch.Size([m, d]), prefix + "adapter_down.bias":
                           torch.Size([m]), prefix + "adapter_up.weight": torch.Size([d, m]),
                           prefix + "adapter_up.bias": torch.Size([d])})
        return shapes

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        assert isinstance(config, BottleneckConfig)
        if config.placement == "projection":
            super().add(model, config, adapter_name, state)
        else:
            d, options = hidden_size(model), config.adapter_options()
            for site, m in self._hub_sites(model, config):
                layer = model.get_submodule(site.name)
                if not isinstance(layer, HubSite):
                    layer = HubSite(layer, site.kind, site.location, site.index)
                    replace_module(model, site.name, layer)
                    attach(model, site, layer, state)
                layer.add_bottleneck(adapter_name, d, m, options)
        if config.init_from is not None:
            load_initial(model, Path(config.init_from), adapter_name)  # checked in check(): cannot fail halfway

    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        detach_stale(model, state)
        if not any(isinstance(m, HubSite) and m.composition is not None for m in model.modules()):
            drop_parallel_hook(state)  # its composition lost an adapter (HubSite.delete_adapter), or all went

    def set_active(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        drop_parallel_hook(state)  # a composition ends with any new active set (set_composition sets it after)

    def saved_config(self, config: MethodConfig) -> dict[str, Any]:
        """Without ``init_from`` (the saved weights replace it); projection placement without the AdapterHub
        fields, so its files stay as they were before that placement existed."""
        data = config.to_dict()
        data.pop("init_from", None)
        if data.get("placement") == "projection":
            for name in [*HUB_FIELDS, "placement"]:
                data.pop(name, None)
        return data
