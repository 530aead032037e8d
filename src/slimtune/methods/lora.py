"""LoRA (and DoRA through ``use_dora``, as in PEFT): the method that wraps target layers with LoRA layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685 (the layers:
:mod:`slimtune.methods.lora_layers`); Liu et al., "DoRA", arXiv:2402.09353 (:mod:`slimtune.methods.dora`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from torch import nn

from slimtune.config import LoraConfig, MethodConfig
from slimtune.core.modules import replace_module
from slimtune.core.state import AdapterState
from slimtune.methods.contract import LayerMethod, saved_modules, tuner_layers
from slimtune.methods.default_targets import LOW_RANK_TARGETS, model_type
from slimtune.methods.dora import DoraLinear
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora_layers import LoraEmbedding, LoraLinear
from slimtune.methods.lora_parameters import PARAMETER_INITS, LoraParameters, parameter_keys, parameter_targets
from slimtune.methods.targets import is_adaptable_linear, is_saved_module, warn_unused_patterns


def make_lora_layer(base: nn.Module, config: LoraConfig) -> TunerLayer:
    """An empty LoRA (or, with ``use_dora``, DoRA) wrapper for ``base``; raise for layer types it cannot wrap."""
    if config.use_dora:
        if isinstance(base, nn.Embedding):
            raise ValueError(
                f"DoRA (use_dora=True) adapts linear layers only in slimtune, but target_modules matched an "
                f"nn.Embedding({base.num_embeddings}, {base.embedding_dim}). Remove the embedding from "
                "target_modules, or use a separate adapter with use_dora=False for it (an adapter file with DoRA on "
                "an embedding: load it with PEFT)."
            )
        if is_adaptable_linear(base):
            return DoraLinear(base)
        raise TypeError(f"DoRA cannot wrap a {type(base).__name__}; supported: nn.Linear, transformers Conv1D, "
                        "slimtune quantized linear. Pick other target_modules (an adapter file with DoRA on such a "
                        "layer: load it with PEFT).")
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base)
    if is_adaptable_linear(base):
        return LoraLinear(base)
    raise TypeError(
        f"LoRA cannot wrap a {type(base).__name__}; supported: nn.Linear, transformers Conv1D, "
        "slimtune quantized linear, nn.Embedding. Pick other target_modules."
    )


# Mamba-based architectures whose kernels read these layers' weights as tensors (PEFT's list).
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
MAMBA_DIRECT_WEIGHTS = frozenset({"out_proj", "conv1d"})


class LoraMethod(LayerMethod):
    peft_type: ClassVar[str] = "LORA"
    config_class: ClassVar[type[MethodConfig]] = LoraConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (LoraLinear, LoraEmbedding, LoraParameters)
    default_targets: ClassVar[Mapping[str, list[str] | str]] = LOW_RANK_TARGETS

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        assert isinstance(config, LoraConfig)
        return make_lora_layer(base, config)

    def target_names(self, model: nn.Module, config: MethodConfig, skip: Iterable[str]) -> list[str]:
        """PEFT's targets, less those a Mamba-style model reads the weight of directly (its fused kernels take
        ``out_proj.weight`` and ``conv1d.weight`` as tensors, so LoRA there would be skipped, yet merged): refused,
        as PEFT refuses them."""
        assert isinstance(config, LoraConfig)
        self.fill_default_targets(model, config)
        if config.target_parameters and not config.target_modules:  # (PEFT: [] adapts the parameters alone)
            warn_unused_patterns(config, self.pattern_targets(model, config))
            return []
        names = super().target_names(model, config, skip)
        if model_type(model) in MAMBA_MODEL_TYPES:
            bad = sorted({n.rpartition(".")[2] for n in names} & MAMBA_DIRECT_WEIGHTS)
            if bad:
                raise ValueError(f"target_modules: {bad} of a {model_type(model)} model cannot take LoRA: its Mamba "
                                 f"kernels read their weights directly (as PEFT refuses: {sorted(MAMBA_DIRECT_WEIGHTS)}"
                                 "); leave them out, e.g. exclude_modules=" + repr(bad) + ".")
        return names

    def pattern_targets(self, model: nn.Module, config: MethodConfig) -> list[str]:
        return parameter_keys(model, getattr(config, "target_parameters", None) or [])

    def parameter_plan(self, model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
        """The modules whose parameters ``target_parameters`` names; raises when it names none (PEFT's rule: a
        list entry equals ``<module>.<parameter>`` or is a dotted suffix of it)."""
        if config.init_lora_weights not in PARAMETER_INITS:
            raise ValueError(f"init_lora_weights={config.init_lora_weights!r} cannot initialise LoRA on "
                             f"target_parameters; use one of {list(PARAMETER_INITS)}.")
        inside = {f"{n}.{child}" for n, layer in tuner_layers(model) for child, _ in layer.named_children()}
        plan = parameter_targets(model, config.target_parameters or [], inside | {n for n, _ in saved_modules(model)})
        if not plan:
            names = [f"{n}.{p}" for n, m in model.named_modules() for p, _ in m.named_parameters(recurse=False)
                     if n and getattr(m, p).ndim in (2, 3) and not isinstance(m, (nn.Linear, nn.Embedding))]
            raise ValueError(f"target_parameters={config.target_parameters} matched no parameter. Weights held by "
                             f"modules other than linear layers: {names[:8] or 'none'}"
                             f"{' …' if len(names) > 8 else ''} (linear layers: use target_modules).")
        return plan

    def checked_plans(self, model: nn.Module, config: MethodConfig
                      ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
        """The modules to wrap and those whose parameters to adapt, checked together (raising as :meth:`check`)."""
        assert isinstance(config, LoraConfig)
        modules = self.plan(model, config)
        plan = self.parameter_plan(model, config) if config.target_parameters else []
        both = [name for name, _ in plan if name in {n for n, _ in modules}]
        if both:
            raise ValueError(f"{both[0]} is named by target_modules and, through its parameters, by target_parameters "
                             f"{config.target_parameters}: a layer is adapted one way. Leave it out of one list.")
        parts = {name: name.split(".") for name, _ in plan}  # the module itself, or one it sits in, trained whole:
        saved = [name for name, _ in plan if config.modules_to_save and any(
            is_saved_module(".".join(parts[name][:i]), config.modules_to_save) for i in range(1, len(parts[name]) + 1))]
        if saved:
            raise ValueError(f"{saved[0]} is trained whole (modules_to_save={config.modules_to_save}) and adapted "
                             f"through target_parameters {config.target_parameters}; pick one (as PEFT refuses both).")
        return modules, plan

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        self.checked_plans(model, config)

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        assert isinstance(config, LoraConfig)
        modules, plan = self.checked_plans(model, config)
        self.add_planned(model, config, adapter_name, modules)
        for name, module in plan:
            layer = module if isinstance(module, LoraParameters) else LoraParameters(module)
            layer.add_adapter(adapter_name, config, name)
            if layer is not module:
                replace_module(model, name, layer)
