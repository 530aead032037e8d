"""Adding, switching, merging and removing adapters: the lifecycle every method goes through.

slimtune edits the user's model in place (no wrapper model): ``model(...)`` and ``model.generate``
keep working, and :func:`unload` gives back the original module objects. What all methods share is
done here — wrapped layers, head copies (``modules_to_save``), bias modes, which parameters train —
and each step calls the adapter's :class:`~slimtune.methods.contract.Method` for the rest.

    slimtune.add_adapter(model, LoraConfig(...))                 # "default", active (the model's first)
    slimtune.add_adapter(model, LoraConfig(...), "math")          # more adapters: added inactive
    slimtune.set_adapter(model, "math")                           # what model(...) runs (or several: summed)
    slimtune.merge_adapter(model); slimtune.unmerge_adapter(model)
    with slimtune.disable_adapters(model): ...                   # the base model alone
    slimtune.merge_and_unload(model)                              # original classes, the fine-tune baked in
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from slimtune.config import TASK_HEAD_MODULES, MethodConfig, check_field_types
from slimtune.core.modules import replace_module, tied_weights
from slimtune.core.rollback import restored_on_error, rng_state, set_rng_state
from slimtune.core.state import AdapterState, check_adapter_name, create_state, drop_state, find_state, get_state
from slimtune.methods import REGISTRY, method_for
from slimtune.methods.contract import saved_modules, tuner_layers
from slimtune.methods.layerdrop import LayerDropConfig
from slimtune.methods.layers import ModulesToSave, NonFiniteMergeError, TunerLayer
from slimtune.methods.sparse import check_in_place_fits, frozen_active_parameters, in_place_owners
from slimtune.methods.targets import check_not_peft_model, is_saved_module


# ---- adding and removing ----------------------------------------------------------------------------
def add_adapter(model: nn.Module, config: MethodConfig, adapter_name: str = "default",
                activate: bool | None = None) -> nn.Module:
    """Add an adapter described by ``config`` to ``model`` in place and return the model.

    Every base parameter is frozen; the new adapter's parameters (and, per ``bias`` and
    ``modules_to_save``, biases and head copies) train while it is active. ``activate``: make it the
    active adapter (default: only if it is the model's first). Nothing changes if the config does not
    fit the model. The model keeps its own copy of ``config``, completed for it (default target layers, a
    prefix's dimensions); ``config`` itself is not changed, so it can serve other models.
    """
    if not isinstance(config, MethodConfig):
        kind = f"{type(config).__module__.split('.')[0]}.{type(config).__name__}"
        hint = " (PEFT's): use slimtune's, slimtune.config_from_dict(config.to_dict())" if kind.startswith("peft.") \
            else ""
        raise TypeError(f"config must be a slimtune method config (e.g. slimtune.LoraConfig), got {kind}{hint}.")
    check_adapter_name(adapter_name)
    check_field_types(config)
    config = copy.deepcopy(config)
    method = method_for(config)
    state = find_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another adapter_name or delete it first.")
    if state is not None and state.configs and bias_mode(config) != "none":
        raise ValueError(
            f"adapter {adapter_name!r} trains biases (bias={bias_mode(config)!r}), but the model already has adapters "
            f"{list(state.configs)}: biases are the base model's own tensors, shared by every adapter, so training "
            "them would change the other adapters too. Only one adapter can train biases, and it must be the first "
            "(as in PEFT); use bias='none' for this one.")
    check_not_peft_model(model)
    method.check(model, config)  # everything is validated before the first change to the model
    check_in_place_fits(model)
    frozen = frozen_active_parameters(model)
    heads = _modules_to_save(model, config)
    first = state is None or not state.configs
    with restored_on_error(model):  # a layer refusing late (or memory running out) leaves the model as it was
        state = state or create_state(model)
        existing = {id(m) for m in model.modules()}
        method.add(model, config, adapter_name, state)
        for name in heads:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                replace_module(model, name, module)
            module.add_adapter(adapter_name)
        _take_host_mode(model, existing)
        _warn_on_tied_weights(model, adapter_name, heads)  # (a warning turned into an error undoes the add too)
        _declare_tied_weights(model)
    # Activation may write into existing tensors (a sparse method swaps trained values in), which a snapshot does
    # not restore: a failure here removes the adapter through the methods' own steps and re-activates the others.
    with undone_on_error(model, adapter_name):
        state.configs[adapter_name] = config
        _activate(model, state, [adapter_name] if (first if activate is None else activate) else state.active)
        for param in frozen:  # an adapter loaded frozen stays so (as in PEFT)
            param.requires_grad_(False)
    return model


def _take_host_mode(model: nn.Module, existing: set[int]) -> None:
    """New modules (wrappers, dropouts, prompt encoders) train or evaluate as the module they were put in does:
    an adapter added to (or loaded into) a model in ``eval()`` runs no dropout until ``train()`` is called."""
    training: dict[str, bool] = {}
    for name, module in model.named_modules():  # a parent comes before its children
        if id(module) not in existing:
            module.training = training.get(name.rpartition(".")[0], model.training)
        training[name] = module.training


UNTIE_ADVICE = ("untie it before adding the adapter: give the layer its own copy of the weight (layer.weight = "
                "nn.Parameter(layer.weight.detach().clone())) and set model.config.tie_word_embeddings = False")


def _warn_on_tied_weights(model: nn.Module, adapter_name: str, heads: list[str]) -> None:
    """Say so when an adapter touches a layer whose weight another layer shares (tied input and output embeddings),
    as PEFT does: merging changes both, and a head copy trains apart from its twin."""
    wrapped = [name for name, layer in tuner_layers(model) if adapter_name in layer.adapter_names]
    for name, others in tied_weights(model, wrapped).items():
        warnings.warn(f"adapter {adapter_name!r} adapts {name}, whose weight is shared with {others} (tied "
                      f"embeddings): merging the adapter (merge_adapter, merge_and_unload, slimtune merge) changes "
                      f"{others} too, so the merged model will differ from the unmerged one. Keep it unmerged, or "
                      f"{UNTIE_ADVICE}.", stacklevel=3)
    for name, others in tied_weights(model, heads).items():
        warnings.warn(f"adapter {adapter_name!r} trains a copy of {name} (modules_to_save), whose weight is shared "
                      f"with {others} (tied embeddings): the copy trains alone and {others} keep the original weight, "
                      "so the two are no longer tied while the adapter is active, nor after merge_and_unload.",
                      stacklevel=3)


def _declare_tied_weights(model: nn.Module) -> None:
    """Tell transformers' ``save_pretrained`` that a wrapped layer's weight is a tied one (``lm_head.base_layer.weight``
    is the input embedding's): it drops the duplicate, as it drops ``lm_head.weight``, rather than refuse to save
    (a HF Trainer checkpoint of a model with LoRA on a tied head)."""
    wrappers = [(name, layer, "base_layer") for name, layer in tuner_layers(model)] + \
        [(name, module, "original_module") for name, module in saved_modules(model)]
    for name, others in tied_weights(model, [name for name, _, _ in wrappers]).items():
        wrapper, inner = next((w, i) for n, w, i in wrappers if n == name)
        setattr(wrapper, "_tied_weights_keys", {f"{inner}.weight": f"{others[0]}.weight"})  # noqa: B010 (transformers reads its keys)


def _modules_to_save(model: nn.Module, config: MethodConfig) -> list[str]:
    """The modules whose copies ``config`` trains. Names a task type adds by default (``classifier``/``score``)
    may match nothing, as in PEFT (BART's head is ``classification_head``): then no head copy trains, with a
    warning; names the user gave must match."""
    names = getattr(config, "modules_to_save", None)
    if not names:
        return []
    found = [n for n, _ in model.named_modules()
             if n and is_saved_module(n, names) and not in_head_copy(n) and ".base_layer" not in n]
    if not found:
        heads = [n for n, m in model.named_modules() if n and "." not in n and next(m.parameters(), None) is not None]
        if set(names) <= set(TASK_HEAD_MODULES.get(config.task_type or "", ())):
            others = [n for n in heads if n != getattr(model, "base_model_prefix", None)] or heads
            warnings.warn(f"task_type={config.task_type!r} trains a copy of the head named {' or '.join(names)}, but "
                          f"this model has no such module: no head copy trains (as in PEFT), and the model's own head "
                          f"is not part of the adapter. To train it, name it in modules_to_save (top-level modules: "
                          f"{others}).", stacklevel=3)
            return []
        raise ValueError(f"modules_to_save={names!r} matched no module; top-level modules are: {heads}.")
    return found


def in_head_copy(name: str) -> bool:
    """Whether a module or parameter name lies inside a ``modules_to_save`` wrapper."""
    parts = name.split(".")
    return "modules_to_save" in parts or "original_module" in parts


@contextlib.contextmanager
def undone_on_error(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Add adapter ``adapter_name`` inside the block; if the block raises, the adapter is removed and the adapters
    that were active, every parameter's ``requires_grad`` and torch's random generators (the adapter's initial
    values were drawn from them) are as before it (a failed load changes nothing)."""
    state = find_state(model)
    active = list(state.active) if state is not None else []
    grads = {id(p): p.requires_grad for p in model.parameters()}
    rng = rng_state()
    try:
        yield
    except BaseException:
        set_rng_state(rng)
        state = find_state(model)
        if state is not None and adapter_name in state.configs:
            remove_adapter(model, adapter_name)
            state = find_state(model)
            if state is not None and active:
                _activate(model, state, active)
            for param in model.parameters():
                if id(param) in grads:
                    param.requires_grad_(grads[id(param)])
        raise


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter (active or not); layers left without adapters turn back into their original modules."""
    state = get_state(model)
    state.check_known([adapter_name])
    check_in_place_fits(model)
    frozen = frozen_active_parameters(model)
    config = state.configs.pop(adapter_name)
    for name, layer in list(tuner_layers(model)):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            replace_module(model, name, layer.base_layer)
    for name, module in list(saved_modules(model)):
        module.delete_adapter(adapter_name)
        if not module.adapter_names:
            replace_module(model, name, module.original_module)
    method_for(config).remove(model, adapter_name, state)
    if not state.configs:
        drop_state(model)
        return
    _activate(model, state, [a for a in state.active if a != adapter_name] or [next(iter(state.configs))])
    for param in frozen:
        param.requires_grad_(False)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an unmerged adapter, as PEFT does: layers left without adapters become their originals again; if it
    was active, the other active adapters stay so, else the first remaining adapter becomes active (with a
    warning); deleting the last one leaves the base model."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"delete_adapter takes one adapter name (a string), got {adapter_name!r}; to delete several, "
                        "call it once per name.")
    state = get_state(model)
    state.check_known([adapter_name])
    if adapter_name in _merged_names(model, state):
        raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; call "
                         "slimtune.unmerge_adapter(model) before deleting it.")
    if state.active == [adapter_name] and len(state.configs) > 1:
        successor = next(n for n in state.configs if n != adapter_name)
        warnings.warn(f"adapter {adapter_name!r} was active and is deleted; {successor!r} is active now.",
                      stacklevel=2)
    remove_adapter(model, adapter_name)


def list_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).configs)


def apply_layerdrop(model: nn.Module, layerdrop: float, adapter_name: str = "layerdrop",
                    layers_pattern: list[str] | str | None = None) -> nn.Module:
    """Add LayerDrop beside the model's adapters (without changing which adapters are active)."""
    return add_adapter(model, LayerDropConfig(layerdrop=layerdrop, layers_pattern=layers_pattern), adapter_name,
                       activate=False)


# ---- switching ---------------------------------------------------------------------------------------
def set_adapter(model: nn.Module, adapter_name: str | Sequence[str]) -> None:
    """Make ``adapter_name`` (or several names, their outputs summed) the active adapter(s); only active
    adapters' parameters are trainable. Merged adapters are unmerged first, with a warning (as in PEFT): a
    merged adapter would otherwise keep applying whatever is active."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(dict.fromkeys(adapter_name))
    state = get_state(model)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name; to run the base model alone, use "
                         "`with slimtune.disable_adapters(model):` (or disable_adapter_layers).")
    state.check_known(names)
    for peft_type in _methods_present(state):  # before any change: a refused switch leaves the model as it was
        REGISTRY.method(peft_type).check_active(model, names, state)
    for module_name, module in saved_modules(model):
        held = [a for a in names if a in module.modules_to_save]
        if len(held) > 1:  # one module's copies do not add up: one of them would run alone, silently
            raise ValueError(f"{module_name} has a trained copy (modules_to_save) in each of {held}: only one can run "
                             "at a time (as in PEFT). Activate one of them, or route rows with slimtune.mixed_batch.")
    merged = _merged_names(model, state)
    if merged:
        warnings.warn(f"adapter(s) {merged} are merged into the base weights; unmerging them before switching to "
                      f"{names} (as PEFT does). Merge again afterwards if you want the new adapter merged.",
                      stacklevel=2)
        unmerge_adapter(model)
    _activate(model, state, names)


def _merged_names(model: nn.Module, state: AdapterState) -> list[str]:
    """Adapters merged into the base weights: in wrapped layers, or by their method (a sparse adapter's values)."""
    return sorted({a for _, layer in tuner_layers(model) for a in layer.merged_adapters} |
                  {a for t in _methods_present(state) for a in REGISTRY.method(t).merged_adapters(state)})


def _activate(model: nn.Module, state: AdapterState, names: list[str]) -> None:
    for _, layer in tuner_layers(model):
        layer.set_active(names)
    for _, module in saved_modules(model):
        module.set_active(names)
    for peft_type in _methods_present(state):
        REGISTRY.method(peft_type).set_active(model, names, state)
    state.active = list(names)
    _apply_bias_modes(model, state)


def _methods_present(state: AdapterState) -> list[str]:
    return list(dict.fromkeys(config.peft_type for config in state.configs.values()))


def bias_names(model: nn.Module, modes: set[str]) -> list[str]:
    """Biases a ``bias`` mode trains: every one for "all"; those of wrapped layers for "lora_only" /
    "vera_only" (PEFT's modes). Head copies (``modules_to_save``) carry their own biases."""
    wrapped = tuple(f"{n}.base_layer." for n, _ in tuner_layers(model))
    return [
        name
        for name, _ in model.named_parameters()
        if name.endswith("bias") and not in_head_copy(name)
        and ("all" in modes or (bool(modes & {"lora_only", "vera_only"}) and name.startswith(wrapped)))
    ]


def bias_mode(config: MethodConfig) -> str:
    """The config's ``bias`` mode (methods without one train no biases)."""
    return str(getattr(config, "bias", "none"))


def _apply_bias_modes(model: nn.Module, state: AdapterState) -> None:
    modes = {bias_mode(state.configs[a]) for a in state.active}
    params = dict(model.named_parameters())
    for name in state.trainable_biases:  # undo what an earlier activation switched on
        if name in params:
            params[name].requires_grad_(False)
    state.trainable_biases = bias_names(model, modes)
    for name in state.trainable_biases:
        params[name].requires_grad_(True)


# ---- merging ----------------------------------------------------------------------------------------
def merge_adapter(model: nn.Module, adapter_names: str | Sequence[str] | None = None,
                  safe_merge: bool = False) -> nn.Module:
    """Fold the active adapters (or exactly the named ones; an empty list: none) into the base weights: the
    forward stays the same, faster. A named adapter needs not be active: once merged it always applies.

    Every merged weight is built on a copy and checked: a merge that would put inf/NaN into a base weight (a
    diverged adapter) raises a ``ValueError`` naming the adapter and the layer, and the layers this call had
    merged already are unmerged again (the base is as it was, within rounding). ``safe_merge=True`` (PEFT's
    name) checks every layer before changing any, so a refused merge leaves the base bit-identical (at the cost
    of building each merged weight twice). Refused while the adapters are disabled (``disable_adapter_layers``,
    inside ``disable_adapters``): the disabled model must run the base alone, so enable them first."""
    state = get_state(model)
    names = list(dict.fromkeys(state.active if adapter_names is None else
                               [adapter_names] if isinstance(adapter_names, str) else adapter_names))
    state.check_known(names)
    check_in_place_fits(model)
    if state.disabled:
        raise ValueError(f"cannot merge {names}: the adapters are disabled (disable_adapter_layers, or inside "
                         "disable_adapters), and the disabled model must give the base model's outputs. Call "
                         "slimtune.enable_adapter_layers(model) first, or merge after the `with` block.")
    _merge(model, state, names, safe_merge)
    return model


def _merge(model: nn.Module, state: AdapterState, names: list[str], safe_merge: bool) -> None:
    layers = {name: (layer, mine) for name, layer in tuner_layers(model)
              if (mine := layer.to_merge([a for a in names if a in layer.adapter_names]))}
    for name, others in tied_weights(model, layers).items():
        warnings.warn(f"merging {layers[name][1]} into {name} also changes {others}, which share its weight (tied "
                      f"embeddings): the merged model will differ from the unmerged one. Keep the adapter unmerged, "
                      f"or {UNTIE_ADVICE}.", stacklevel=3)
    owned = in_place_owners(state)
    for name, (layer, mine) in layers.items():
        weight = getattr(layer.base_layer, "weight", None)
        if id(weight) in owned and owned[id(weight)] not in names:  # (merged with it: nothing switches it after)
            raise ValueError(f"{name}'s weight is trained in place by adapter {owned[id(weight)]!r} "
                             f"({state.configs[owned[id(weight)]].peft_type}): {mine} merged into it would be "
                             "overwritten when that adapter is switched. Keep them unmerged, or merge both.")
    for layer, _ in layers.values():  # a layer no merge can change refuses before any weight moves
        layer.check_mergeable()
    methods = _methods_present(state)
    for peft_type in [t for t in methods if not REGISTRY.method(t).changes_base_weights]:  # may refuse: first
        if mine := [a for a in names if state.configs[a].peft_type == peft_type]:
            REGISTRY.method(peft_type).merge(model, mine, state)
    if safe_merge:
        for name, (layer, mine) in layers.items():
            _merge_layer(name, layer, mine, check_only=True)
    done: list[tuple[TunerLayer, list[list[str]]]] = []
    try:
        for name, (layer, mine) in layers.items():
            before = layer.merge_calls
            _merge_layer(name, layer, mine)
            done.append((layer, before))
        for peft_type in [t for t in methods if REGISTRY.method(t).changes_base_weights]:  # once the layers merged
            if mine := [a for a in names if state.configs[a].peft_type == peft_type]:
                REGISTRY.method(peft_type).merge(model, mine, state)
    except BaseException:
        for layer, before in reversed(done):  # back to the merges the layer had before this call
            layer.unmerge()
            for call in before:
                layer.merge(call)
        raise


def _merge_layer(name: str, layer: TunerLayer, adapter_names: list[str], check_only: bool = False) -> None:
    try:
        if check_only:
            layer.check_merge(adapter_names)
        else:
            layer.merge(adapter_names)
    except NonFiniteMergeError as error:
        raise NonFiniteMergeError(error.adapter_name, name) from None


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights again."""
    state = get_state(model)
    for _, layer in tuner_layers(model):
        layer.unmerge()
    for peft_type in _methods_present(state):
        REGISTRY.method(peft_type).unmerge(model, state)
    return model


def unload(model: nn.Module, merge_adapters: bool = False, safe_merge: bool = False,
           adapter_names: str | Sequence[str] | None = None) -> nn.Module:
    """Remove slimtune entirely, giving back the original module objects.

    With ``merge_adapters=True`` the active adapters (or ``adapter_names``) are merged first, as
    :func:`merge_adapter` does (``safe_merge`` likewise), and the active copies of ``modules_to_save``
    replace the originals (as in PEFT): a standard model with the fine-tune baked in.
    """
    state = get_state(model)
    check_in_place_fits(model)
    state.check_known([adapter_names] if isinstance(adapter_names, str) else list(adapter_names or []))
    if merge_adapters:
        merge_adapter(model, adapter_names, safe_merge=safe_merge)
    else:
        unmerge_adapter(model)
    for name, layer in list(tuner_layers(model)):
        replace_module(model, name, layer.base_layer)
    for name, module in list(saved_modules(model)):
        keep = module.modules_to_save[module.active_adapter] if merge_adapters and module.active_adapter else None
        replace_module(model, name, keep if keep is not None else module.original_module)
    for adapter_name in list(state.configs):
        method_for(state.configs.pop(adapter_name)).remove(model, adapter_name, state)
    drop_state(model)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False,
                     adapter_names: str | Sequence[str] | None = None) -> nn.Module:
    """Merge the active adapters (or ``adapter_names``) and remove slimtune: see :func:`unload` and
    :func:`merge_adapter` (``safe_merge``, PEFT's argument: check every merged weight before changing any)."""
    return unload(model, merge_adapters=True, safe_merge=safe_merge, adapter_names=adapter_names)


# ---- the base model alone ------------------------------------------------------------------------------
def _set_disabled(model: nn.Module, state: AdapterState, disabled: bool) -> None:
    state.disabled = disabled
    for _, layer in tuner_layers(model):
        layer.disabled = disabled
    for _, module in saved_modules(model):
        module.disabled = disabled
    for peft_type in _methods_present(state):
        REGISTRY.method(peft_type).set_disabled(model, disabled, state)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged, then merged back)."""
    state = get_state(model)
    layers = [layer for _, layer in tuner_layers(model)]
    merged = {id(layer): layer.merge_calls for layer in layers}
    try:  # (a method refusing to disable leaves everything as it was)
        for layer in layers:
            layer.unmerge()
        _set_disabled(model, state, True)
        yield model
    finally:
        _set_disabled(model, state, False)
        live = {id(layer) for _, layer in tuner_layers(model)}  # (unload or delete inside the block took some away)
        for layer in layers:
            for names in merged[id(layer)] if id(layer) in live else ():
                if known := [n for n in names if n in layer.adapter_names]:
                    layer.merge(known)


def disable_adapter_layers(model: nn.Module) -> None:
    """Run the base model alone until :func:`enable_adapter_layers` (merged adapters are unmerged first)."""
    unmerge_adapter(model)
    _set_disabled(model, get_state(model), True)


def enable_adapter_layers(model: nn.Module) -> None:
    _set_disabled(model, get_state(model), False)


# ---- what training asks of the adapters --------------------------------------------------------------
def method_param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
    """Optimizer parameter groups the active adapters' methods need (LoRA+), or None for the defaults."""
    state = get_state(model)
    groups = [g for g in (method_for(state.configs[a]).param_groups(model, state.configs[a], lr)
                          for a in state.active) if g is not None]
    if len(groups) > 1:
        raise ValueError("several active adapters define optimizer parameter groups; train one adapter at a time.")
    return groups[0] if groups else None


def after_optimizer_step(model: nn.Module) -> None:
    """Run the active adapters' work after an optimizer update (Delta-LoRA's W update); the trainer calls it,
    and so should your own loop after ``optimizer.step()``."""
    state = get_state(model)
    for adapter_name in state.active:
        method_for(state.configs[adapter_name]).after_optimizer_step(model, adapter_name, state)
