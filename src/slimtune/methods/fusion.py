"""AdapterFusion: a trainable attention over the outputs of several frozen bottleneck adapters.

Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
arXiv:2005.00247. At every AdapterHub site that holds the fused adapters, per token::

    out = Σ_i softmax_i((Q q)·(K u_i) / T) · V u_i + residual      (u_i: adapter i's scaled up-projection)

The fused adapters are bottleneck adapters with AdapterHub placement (``BottleneckConfig(placement=
"adapterhub")``), on the model already or loaded by this method from ``adapter_paths`` (folders in
AdapterHub's or slimtune's format). While the fusion adapter is active they run frozen and only the
fusion layers train. Fields are AdapterHub's ``AdapterFusionConfig`` ("dynamic" preset by default); its
trainer's ``regularization`` term (0.01 · Σ‖V − I‖², added at each step end) is not added by slimtune's
trainer: add :func:`fusion_regularization_loss` to your loss to reproduce it. Files: slimtune's format
saves the fusion layers (``….adapter_fusion_layer.<query|key|value>.weight`` …) and this config;
:func:`slimtune.adapterhub.save_adapterhub` writes AdapterHub's ``adapter_fusion_config.json`` +
``model_adapter_fusion.safetensors``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.adapterhub.layers import HubSite
from slimtune.adapterhub.modules import FusionLayer, FusionOptions
from slimtune.adapterhub.sites import detach_stale, find_sites, hidden_size
from slimtune.config import MethodConfig, check_probability
from slimtune.core.modules import replace_module
from slimtune.core.state import AdapterState, find_state
from slimtune.methods.bottleneck import BottleneckConfig, BottleneckMethod
from slimtune.methods.contract import Method, tuner_layers

BUNDLE_FOLDER = "fused"  # inside a saved fusion's folder: the adapters it loaded from adapter_paths


@dataclass
class AdapterFusionConfig(MethodConfig):
    """AdapterFusion over ``adapter_names`` (in order); ``adapter_paths`` maps names the model does not hold
    yet to the folders to load them from. The other fields are AdapterHub's (see the module docstring)."""

    peft_type: ClassVar[str] = "ADAPTER_FUSION"

    adapter_names: list[str] = field(default_factory=list)
    adapter_paths: dict[str, str] = field(default_factory=dict)
    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool | str = True
    dropout_prob: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        names = self.adapter_names
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"adapter_names={names!r} must list the fused adapters' names, each once.")
        extra = sorted(set(self.adapter_paths) - set(names))
        if extra:
            raise ValueError(f"adapter_paths names {extra}, which are not in adapter_names={names}.")
        if self.dropout_prob is not None:
            check_probability("dropout_prob", self.dropout_prob)

    @property
    def hub_name(self) -> str:
        """AdapterHub's name of this fusion: the fused adapters joined by ","."""
        return ",".join(self.adapter_names)

    def options(self) -> FusionOptions:
        return FusionOptions(key=self.key, query=self.query, value=self.value, query_before_ln=self.query_before_ln,
                             residual_before=self.residual_before, temperature=self.temperature,
                             value_before_softmax=self.value_before_softmax,
                             value_initialized=bool(self.value_initialized))


def _fused_configs(model: nn.Module, config: AdapterFusionConfig) -> dict[str, BottleneckConfig]:
    """The fused adapters' configs: from the model, or read from ``adapter_paths``; each must be a bottleneck
    adapter with AdapterHub placement, all at the same sites."""
    state = find_state(model)
    found: dict[str, BottleneckConfig] = {}
    for name in config.adapter_names:
        if state is not None and name in state.configs:
            held = state.configs[name]
        elif name in config.adapter_paths:
            held = BottleneckConfig(init_from=config.adapter_paths[name])
        else:
            raise ValueError(f"adapter {name!r} is not on the model and adapter_paths has no folder for it; load it "
                             "first (slimtune.adapterhub.load_adapterhub or slimtune.load_adapter) or add its path.")
        if not isinstance(held, BottleneckConfig) or held.placement != "adapterhub":
            placed = f" placed {held.placement!r}" if isinstance(held, BottleneckConfig) else ""
            raise ValueError(f"AdapterFusion fuses bottleneck adapters with placement='adapterhub'; {name!r} is a "
                             f"{held.peft_type} adapter{placed}.")
        found[name] = held
    parallel = [n for n, c in found.items() if c.adapter_type == "parallel"]
    if parallel:
        warnings.warn(f"AdapterFusion over parallel adapters {parallel}: AdapterHub's fusion takes the residual path "
                      "of the last adapter, so a parallel adapter runs on the sequential input (or, when last, the "
                      "block's residual is added twice); slimtune computes it the same way. Fuse sequential "
                      "adapters (seq_bn / double_seq_bn) for the usual AdapterFusion.", stacklevel=3)
    sites = {(c.mh_adapter, c.output_adapter) for c in found.values()}
    if len(sites) != 1:
        raise ValueError(f"the fused adapters must sit at the same locations (mh_adapter / output_adapter); got "
                         f"{ {n: (c.mh_adapter, c.output_adapter) for n, c in found.items()} }.")
    return found


def fusion_regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """AdapterHub's fusion regularizer: 0.01 · Σ over trainable value matrices of ‖I − V‖² (None without any)."""
    terms = []
    for _, layer in tuner_layers(model):
        if isinstance(layer, HubSite):
            for fusion in layer.adapter_fusion_layer.values():
                value = fusion.value if isinstance(fusion, FusionLayer) else None
                if value is not None and value.weight.requires_grad:
                    eye = torch.eye(value.weight.shape[0], device=value.weight.device, dtype=value.weight.dtype)
                    terms.append(0.01 * (eye - value.weight).pow(2).sum())
    return torch.stack(terms).sum() if terms else None


class FusionMethod(Method):
    peft_type: ClassVar[str] = "ADAPTER_FUSION"
    config_class: ClassVar[type[MethodConfig]] = AdapterFusionConfig

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        """The fused adapters fit (those to load included: their folders are checked before anything changes)."""
        assert isinstance(config, AdapterFusionConfig)
        find_sites(model)
        state = find_state(model)
        for name, fused in _fused_configs(model, config).items():
            if state is None or name not in state.configs:
                BottleneckMethod().check(model, fused)

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        """Load the fused adapters the model lacks (frozen), then a fusion layer at each of their sites."""
        assert isinstance(config, AdapterFusionConfig)
        fused = _fused_configs(model, config)
        loaded = [n for n in config.adapter_names if n not in state.configs]
        bottleneck = BottleneckMethod()
        for name in loaded:
            bottleneck.add(model, fused[name], name, state)
            state.configs[name] = fused[name]
        state.data[adapter_name] = loaded
        first = fused[config.adapter_names[0]]
        locations = {loc for loc, on in (("mh_adapter", first.mh_adapter), ("output_adapter", first.output_adapter))
                     if on}
        # AdapterHub: the config's dropout_prob, or (when unset or 0) the model's attention dropout.
        dropout = config.dropout_prob or float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob",
                                                       0.0) or 0.0)
        d = hidden_size(model)
        for _, layer in tuner_layers(model):
            if isinstance(layer, HubSite) and layer.location in locations and \
                    set(config.adapter_names) & set(layer.adapters.keys()):
                layer.add_fusion(adapter_name, config.adapter_names, d, config.options(), dropout)

    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        """Also remove the adapters this fusion loaded itself."""
        for name in state.data.pop(adapter_name, []):
            if name not in state.configs:
                continue
            for module_name, layer in list(tuner_layers(model)):
                layer.delete_adapter(name)
                if not layer.adapter_names:
                    replace_module(model, module_name, layer.base_layer)
            state.configs.pop(name)
            state.active = [a for a in state.active if a != name]
        detach_stale(model, state)

    def bundled_adapters(self, config: MethodConfig) -> dict[str, str]:
        """The adapters this fusion loaded from ``adapter_paths`` are saved inside its folder, under
        ``fused/<name>/``: the saved fusion is complete on its own, and loading it reads nothing outside it."""
        assert isinstance(config, AdapterFusionConfig)
        return {name: f"{BUNDLE_FOLDER}/{name}" for name in config.adapter_paths}

    def saved_config(self, config: MethodConfig) -> dict[str, Any]:
        """``adapter_paths`` point at the bundled copies (relative to the saved folder)."""
        data = config.to_dict()
        data["adapter_paths"] = self.bundled_adapters(config)
        return data
