"""The method contract: what slimtune's lifecycle asks of every PEFT method, and the registry.

A method is one :class:`Method` subclass, registered once (``slimtune/methods/__init__.py``). The
lifecycle (:mod:`slimtune.lifecycle`) handles what all methods share — wrapped layers
(:class:`~slimtune.methods.layers.TunerLayer`), head copies (``modules_to_save``), bias modes,
trainability — and calls the method's steps below; each has a default (a no-op or the common case),
so a method overrides only what it does differently. Methods hold no state: what they keep for an
adapter lives in ``model.slimtune_state`` (:class:`~slimtune.core.state.AdapterState`), keyed by
adapter name.

Layer-wrapping methods (LoRA and its family, VeRA, LoHa, (IA)³, bottleneck adapters) derive from
:class:`LayerMethod` and only say how to wrap one layer (:meth:`LayerMethod.make_layer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.config import MethodConfig
from slimtune.core.modules import is_conv1d, replace_module
from slimtune.core.state import AdapterState
from slimtune.methods.default_targets import model_type
from slimtune.methods.layers import ModulesToSave, TunerLayer
from slimtune.methods.targets import find_targets, warn_unused_patterns

PEFT_PREFIX = "base_model.model."


class Method:
    """A PEFT method as the lifecycle drives it; every step has a default."""

    peft_type: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # Prefix of head copies (modules_to_save) on disk: PEFT's prompt-learning methods use "base_model.".
    saved_modules_prefix: ClassVar[str] = PEFT_PREFIX
    # Whether the method changes base weights in place (then a mixed batch cannot separate its rows).
    changes_base_weights: ClassVar[bool] = False

    # ---- adding and removing ----------------------------------------------------------------------
    def check(self, model: nn.Module, config: MethodConfig) -> None:
        """Raise if ``config`` cannot apply to ``model``; change nothing (sizes left open may be filled in)."""

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        """Build the adapter on the model (after :meth:`check` passed)."""
        raise NotImplementedError

    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        """Undo :meth:`add` beyond wrapped layers and head copies, which the lifecycle removes."""

    # ---- switching --------------------------------------------------------------------------------
    def set_active(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        """After the active set changed (``adapter_names`` may include other methods' adapters)."""

    def check_active(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        """Raise if these adapters cannot be active together (called before anything changes)."""

    def set_disabled(self, model: nn.Module, disabled: bool, state: AdapterState) -> None:
        """Entering (True) or leaving (False) "base model only" mode."""

    # ---- merging ----------------------------------------------------------------------------------
    def merge(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        """Fold these adapters (this method's only) into the model, beyond their wrapped layers."""

    def unmerge(self, model: nn.Module, state: AdapterState) -> None:
        """Take every merged adapter of this method out again."""

    def merged_adapters(self, state: AdapterState) -> list[str]:
        """This method's adapters merged beyond wrapped layers (their layers list their own merges)."""
        return []

    # ---- files ------------------------------------------------------------------------------------
    def adapter_tensors(self, model: nn.Module, adapter_name: str, state: AdapterState) -> dict[str, torch.Tensor]:
        """Tensors to save beyond wrapped layers, head copies and biases, under their on-disk keys."""
        return {}

    def saved_config(self, config: MethodConfig) -> dict[str, Any]:
        """What ``adapter_config.json`` holds for ``config`` (variants PEFT knows as another type change it)."""
        return config.to_dict()

    def bundled_adapters(self, config: MethodConfig) -> dict[str, str]:
        """Other adapters saved inside this one's folder: name → folder relative to it (AdapterFusion's fused
        adapters), so that the folder is complete on its own and never points outside itself."""
        return {}

    # ---- training ---------------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, config: MethodConfig, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups the method needs (None: the trainer's defaults)."""
        return None

    def after_optimizer_step(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        """Runs after each optimizer update while the adapter is active."""

    def checkpoint_tensors(self, model: nn.Module, adapter_name: str, state: AdapterState) -> dict[str, torch.Tensor]:
        """The live tensors training changes besides the trainable parameters (a base weight the method
        updates in place, a step counter), by a stable name: a checkpoint saves them, and resuming copies the
        saved values back into these very tensors, so the run continues exactly."""
        return {}


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, TunerLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, TunerLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


class LayerMethod(Method):
    """A method that wraps target layers with its :class:`TunerLayer` classes."""

    layer_types: ClassVar[tuple[type[TunerLayer], ...]]

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        """An empty wrapper for ``base``; raise a clear ``TypeError`` for layer types the method cannot wrap."""
        raise NotImplementedError

    # model_type → the layers adapted when target_modules is unset (PEFT's defaults; see default_targets)
    default_targets: ClassVar[Mapping[str, list[str] | str]] = {}

    def fill_default_targets(self, model: nn.Module, config: MethodConfig) -> None:
        """Set an unset ``target_modules`` to the defaults for ``model``'s architecture, as PEFT does (the saved
        config then lists them); left unset for an architecture without defaults (find_targets explains)."""
        defaults = self.default_targets.get(model_type(model) or "")
        if getattr(config, "target_modules", "") is None and defaults is not None:
            setattr(config, "target_modules",  # noqa: B010 (not every config has the field)
                    defaults if isinstance(defaults, str) else list(defaults))

    def target_names(self, model: nn.Module, config: MethodConfig, skip: Iterable[str]) -> list[str]:
        """Names of the modules ``config`` targets (PEFT's matching rules)."""
        self.fill_default_targets(model, config)
        names = find_targets(model, getattr(config, "target_modules", None), getattr(config, "exclude_modules", None),
                             getattr(config, "layers_to_transform", None), getattr(config, "layers_pattern", None),
                             getattr(config, "modules_to_save", None), skip=skip)
        warn_unused_patterns(config, [*names, *self.pattern_targets(model, config)])
        return names

    def pattern_targets(self, model: nn.Module, config: MethodConfig) -> list[str]:
        """Names beyond the wrapped modules that ``rank_pattern`` / ``alpha_pattern`` keys may pick."""
        return []

    def plan(self, model: nn.Module, config: MethodConfig) -> list[tuple[str, nn.Module]]:
        """``(name, module to wrap or an existing wrapper this method can add to)`` for every target."""
        # Inside an existing wrapper (its base_layer, the adapters' own nn.Linear A/B, which "all-linear" or a
        # regex would otherwise match) is off limits; the wrapper itself is a valid target.
        inside = {f"{n}.{child}" for n, layer in tuner_layers(model) for child, _ in layer.named_children()}
        names = self.target_names(model, config, skip=inside | {n for n, _ in saved_modules(model)})
        plan = []
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, TunerLayer):
                needed = type(self.make_layer(module.base_layer, config))  # e.g. DoraLinear for use_dora=True
                upgrade = isinstance(module, self.layer_types) and type(module) in needed.__mro__[1:]
                if upgrade and module.merged_adapters:
                    raise ValueError(f"{name} holds merged adapters {module.merged_adapters}; a {needed.__name__} "
                                     "adapter can join it once they are unmerged (slimtune.unmerge_adapter(model)).")
                if not upgrade and (not isinstance(module, self.layer_types) or not isinstance(module, needed)):
                    raise ValueError(
                        f"{name} already holds a {type(module).__name__}; a {config.peft_type} adapter (which needs "
                        f"a {needed.__name__}) cannot be stacked on it. Use other target_modules or remove the "
                        "existing adapter first."
                    )
            else:
                self.make_layer(module, config)  # raises a clear TypeError for unsupported layer types
            plan.append((name, module))
        return plan

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        self.plan(model, config)

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        self.add_planned(model, config, adapter_name, self.plan(model, config))

    def add_planned(self, model: nn.Module, config: MethodConfig, adapter_name: str,
                    plan: list[tuple[str, nn.Module]]) -> None:
        """:meth:`add` with the :meth:`plan` made already."""
        if hasattr(config, "fan_in_fan_out"):
            bases = {n: m.base_layer if isinstance(m, TunerLayer) else m for n, m in plan}
            settle_fan_in_fan_out(config, {n: m for n, m in bases.items() if not isinstance(m, nn.Embedding)})
        for name, module in plan:
            if isinstance(module, TunerLayer):
                needed = self.make_layer(module.base_layer, config)
                layer = module if isinstance(module, type(needed)) else _upgraded(module, needed)
            else:
                layer = self.make_layer(module, config)
            layer.add_adapter(adapter_name, config, name)
            if layer is not module:
                replace_module(model, name, layer)


def _upgraded(layer: TunerLayer, richer: TunerLayer) -> TunerLayer:
    """``richer`` (a subclass of ``layer``'s class, e.g. a DoraLinear for a LoraLinear) holding ``layer``'s adapters,
    the very same tensors: a DoRA adapter can join layers that hold plain LoRA adapters, as in PEFT."""
    for attr in layer.adapter_attrs + layer.adapter_values:
        setattr(richer, attr, getattr(layer, attr))
    richer.active_adapters, richer.merged_adapters = list(layer.active_adapters), list(layer.merged_adapters)
    richer.disabled, richer.training = layer.disabled, layer.training
    return richer


class Registry:
    """Every method by ``peft_type``: one registration each."""

    def __init__(self, methods: Iterable[type[Method]]) -> None:
        self._methods: dict[str, Method] = {}
        for method in methods:
            self.register(method)

    def register(self, method: type[Method]) -> None:
        """Add a method (a plug-in, or a test's); its ``peft_type`` must be new."""
        if method.peft_type in self._methods:
            raise ValueError(f"peft_type {method.peft_type!r} is registered twice")
        self._methods[method.peft_type] = method()

    def unregister(self, peft_type: str) -> None:
        del self._methods[peft_type]

    def method(self, peft_type: Any) -> Method:
        if not isinstance(peft_type, str) or peft_type not in self._methods:
            raise ValueError(f"peft_type={peft_type!r} is not supported by slimtune; known types: "
                             f"{sorted(self._methods)}.")
        return self._methods[peft_type]

    def for_config(self, config: MethodConfig) -> Method:
        return self.method(config.peft_type)

    def config_classes(self) -> dict[str, type[MethodConfig]]:
        return {peft_type: method.config_class for peft_type, method in self._methods.items()}

    def config_from_dict(self, data: dict[str, Any]) -> MethodConfig:
        """Read any registered method's config from its dict (``peft_type`` picks the class)."""
        return self.method(data.get("peft_type")).config_class.from_dict(data)


def settle_fan_in_fan_out(config: Any, layers: dict[str, nn.Module]) -> None:
    """A config's ``fan_in_fan_out`` (LoRA, IA3, VeRA) follows the layers (GPT-2's Conv1D stores (in, out)): say so
    when the config disagrees, and record their layout in the model's copy of the config (saved with the adapter),
    as PEFT does."""
    conv1d = {name: is_conv1d(layer) for name, layer in layers.items()}
    wrong = [n for n, kind in conv1d.items() if kind != config.fan_in_fan_out]
    if wrong:
        warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not match {wrong[0]} (and {len(wrong) - 1} more): "
                      f"{'it is' if conv1d[wrong[0]] else 'it is not'} a transformers Conv1D; slimtune follows the "
                      "layer.", stacklevel=4)
    if len(set(conv1d.values())) == 1:
        config.fan_in_fan_out = next(iter(conv1d.values()))
