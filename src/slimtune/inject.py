"""Model surgery: wrap target modules with a method's layers, freeze the rest, merge, unwrap.

slimtune edits the user's model in place (no wrapper model): ``model(...)`` and ``model.generate``
keep working, and ``slimtune.unload`` gives back the original module objects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from slimtune.config import MethodConfig
from slimtune.methods import ModulesToSave, TunerLayer, layer_factory
from slimtune.targets import find_targets, name_matches

STATE_ATTR = "slimtune_state"


@dataclass
class AdapterState:
    """What slimtune knows about a model it has modified; stored as ``model.slimtune_state``."""

    configs: dict[str, MethodConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # requires_grad of every parameter before the first injection, restored by unload.
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    # Biases made trainable by a ``bias`` mode ("all" / "lora_only").
    trainable_biases: list[str] = field(default_factory=list)


def get_state(model: nn.Module, required: bool = True) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and required:
        raise ValueError("this model has no slimtune adapter; add one first with slimtune.inject(model, config).")
    return state


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, TunerLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, TunerLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: MethodConfig, adapter_name: str = "default", activate: bool = True) -> nn.Module:
    """Add an adapter described by ``config`` to ``model`` in place and return the model.

    Every base parameter is frozen; the new adapter's parameters (and, per ``bias`` and
    ``modules_to_save``, biases and head copies) are trainable. Nothing is changed if the config
    does not fit the model.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a slimtune method config (e.g. LoraConfig), got {type(config).__name__}.")
    state = get_state(model, required=False)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name or delete it first.")
    # Validate everything before the first change to the model.
    custom = getattr(config, "inject_into", None)
    if custom and hasattr(config, "check_model"):  # methods without wrapped layers validate here, too
        config.check_model(model)
    plan = None if custom else _plan_wrapping(model, config)
    to_save = _modules_to_save(model, getattr(config, "modules_to_save", None))

    if state is None:
        state = AdapterState(original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[STATE_ATTR] = state
        model.requires_grad_(False)
    if custom:
        custom(model, adapter_name)
    else:
        _wrap(model, plan, config, adapter_name)
    for name in to_save:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)
    state.configs[adapter_name] = config
    if activate or not state.active:
        set_active_adapters(model, [adapter_name])
    else:
        set_active_adapters(model, state.active)
    return model


def _plan_wrapping(model: nn.Module, config: MethodConfig) -> list[tuple[str, nn.Module]]:
    """(module name, module to wrap or an existing wrapper of the same method) for each target."""
    make_layer, layer_types = layer_factory(config.peft_type)
    # Everything inside an existing wrapper (its base_layer and the adapters' own nn.Linear A/B, which
    # "all-linear" or a regex would otherwise match) is off limits; the wrapper itself is a valid target.
    wrapped = {f"{n}.{child}" for n, layer in tuner_layers(model) for child, _ in layer.named_children()}
    names = find_targets(
        model,
        getattr(config, "target_modules", None),
        getattr(config, "exclude_modules", None),
        getattr(config, "layers_to_transform", None),
        getattr(config, "layers_pattern", None),
        getattr(config, "modules_to_save", None),
        skip=wrapped | {n for n, _ in saved_modules(model)},
    )
    plan = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, TunerLayer):
            needed = type(make_layer(module.base_layer, config))  # e.g. DoraLinear for use_dora=True
            if not isinstance(module, layer_types) or not isinstance(module, needed):
                raise ValueError(
                    f"{name} already holds a {type(module).__name__}; a {config.peft_type} adapter (which needs a "
                    f"{needed.__name__}) cannot be stacked on it. Use other target_modules or remove the existing "
                    "adapter first."
                )
        else:
            make_layer(module, config)  # raises a clear TypeError for unsupported layer types, before any change
        plan.append((name, module))
    return plan


def _wrap(model: nn.Module, plan: list[tuple[str, nn.Module]], config: MethodConfig, adapter_name: str) -> None:
    make_layer, _ = layer_factory(config.peft_type)
    for name, module in plan:
        layer = module if isinstance(module, TunerLayer) else make_layer(module, config)
        layer.add_adapter(adapter_name, config, name)
        if layer is not module:
            replace_module(model, name, layer)


def _modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    if not names:
        return []
    found = [
        n for n, _ in model.named_modules()
        if n and name_matches(n, names) and not _in_saved_copy(n) and ".base_layer" not in n
    ]
    if not found:
        heads = [n for n, m in model.named_modules() if n and "." not in n and any(m.parameters())]
        raise ValueError(f"modules_to_save={names!r} matched no module; top-level modules are: {heads}.")
    return found


def set_active_adapters(model: nn.Module, adapter_names: list[str]) -> None:
    """Make these adapters the active ones; only active adapters' parameters are trainable."""
    state = get_state(model)
    unknown = [a for a in adapter_names if a not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}.")
    for _, layer in tuner_layers(model):
        layer.set_active(adapter_names)
    for _, module in saved_modules(model):
        module.set_active(adapter_names)
    for custom in _custom_hooks(model, "set_active"):
        custom(model, adapter_names)
    state.active = list(adapter_names)
    _apply_bias_modes(model, state)


def _custom_hooks(model: nn.Module, hook: str):
    state = get_state(model)
    return [getattr(c, hook) for c in state.configs.values() if hasattr(c, hook)]


def bias_names(model: nn.Module, modes: set[str]) -> list[str]:
    """Biases a ``bias`` mode trains: every one for "all"; those of wrapped layers for "lora_only" /
    "vera_only" (PEFT's modes). Head copies (``modules_to_save``) carry their own biases."""
    wrapped = tuple(f"{n}.base_layer." for n, _ in tuner_layers(model))
    return [
        name
        for name, _ in model.named_parameters()
        if name.endswith("bias") and not _in_saved_copy(name)
        and ("all" in modes or (modes & {"lora_only", "vera_only"} and name.startswith(wrapped)))
    ]


def _apply_bias_modes(model: nn.Module, state: AdapterState) -> None:
    modes = {getattr(state.configs[a], "bias", "none") for a in state.active}
    params = dict(model.named_parameters())
    for name in state.trainable_biases:  # undo what an earlier activation switched on
        if name in params:
            params[name].requires_grad_(False)
    state.trainable_biases = bias_names(model, modes)
    for name in state.trainable_biases:
        params[name].requires_grad_(True)


def _in_saved_copy(name: str) -> bool:
    parts = name.split(".")
    return "modules_to_save" in parts or "original_module" in parts


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; layers left without adapters turn back into their original modules."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}.")
    config = state.configs.pop(adapter_name)
    remover = getattr(config, "remove_from", None)
    if remover:
        remover(model, adapter_name)
    for name, layer in list(tuner_layers(model)):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            replace_module(model, name, layer.base_layer)
    for name, module in list(saved_modules(model)):
        module.delete_adapter(adapter_name)
        if not module.adapter_names:
            replace_module(model, name, module.original_module)
    if not state.configs:
        _restore(model, state)
    else:
        set_active_adapters(model, [a for a in state.active if a != adapter_name] or [next(iter(state.configs))])


def _restore(model: nn.Module, state: AdapterState) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad.get(name, param.requires_grad))
    del model.__dict__[STATE_ATTR]


def merge(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold the active (or named) adapters into the base weights; forward stays the same, faster."""
    state = get_state(model)
    names = adapter_names or state.active
    for custom in _custom_hooks(model, "merge"):  # methods without wrapped layers (sparse, prompts)
        custom(model, list(names))
    for _, layer in tuner_layers(model):
        layer.merge([a for a in names if a in layer.adapter_names])
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights again."""
    get_state(model)
    for _, layer in tuner_layers(model):
        layer.unmerge()
    for custom in _custom_hooks(model, "unmerge"):
        custom(model)
    return model


def unload(model: nn.Module, merge_adapters: bool = False) -> nn.Module:
    """Remove slimtune entirely, giving back the original module objects.

    With ``merge_adapters=True`` the active adapters are merged first and the active copies of
    ``modules_to_save`` replace the originals: a standard model with the fine-tune baked in.
    """
    state = get_state(model)
    if merge_adapters:
        merge(model)
    else:
        unmerge(model)
    for name, layer in list(tuner_layers(model)):
        replace_module(model, name, layer.base_layer)
    for name, module in list(saved_modules(model)):
        keep = module.modules_to_save[module.active_adapter] if merge_adapters and module.active_adapter else None
        replace_module(model, name, keep if keep is not None else module.original_module)
    for config in state.configs.values():
        if hasattr(config, "remove_from"):
            config.remove_from(model, None)
    _restore(model, state)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    return unload(model, merge_adapters=True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged, then merged back)."""
    get_state(model)
    layers = [layer for _, layer in tuner_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    switchable = layers + [m for _, m in saved_modules(model)]
    for layer in layers:
        layer.unmerge()
    for module in switchable:
        module.disabled = True
    toggles = _custom_hooks(model, "set_disabled")  # methods without wrapped layers (sparse, prompts)
    for toggle in toggles:
        toggle(model, True)
    try:
        yield model
    finally:
        for toggle in toggles:
            toggle(model, False)
        for module in switchable:
            module.disabled = False
        for layer in layers:
            if merged[id(layer)]:
                layer.merge(merged[id(layer)])
