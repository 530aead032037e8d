"""Which modules a method wraps: PEFT's matching rules as plain functions over module names."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from slimtune.core.modules import is_dense_linear, output_head_names
from slimtune.methods.default_targets import model_type
from slimtune.methods.layers import TunerLayer
from slimtune.quant.linear import QuantizedLinear


def name_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT's rule: a list entry matches the whole name or a dotted suffix; a string is a full-match regex."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """Index of the (first) numbered block a module sits in, e.g. 3 for ``model.layers.3.mlp.up_proj``."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return int(match["idx"]) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            return int(match["idx"])
    return None


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """Per-module override (``rank_pattern`` / ``alpha_pattern``): first key matching a dotted suffix, as PEFT."""
    return next((value for key, value in patterns.items() if pattern_matches(key, name)), default)


def pattern_matches(key: str, name: str) -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key picks module ``name`` (a regex of its dotted suffix)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def warn_unused_patterns(config: Any, targets: Sequence[str]) -> None:
    """Warn of ``rank_pattern`` / ``alpha_pattern`` keys that match no adapted layer, as PEFT does (a typo would
    quietly train those layers at the default rank or alpha)."""
    for field in ("rank_pattern", "alpha_pattern"):
        unused = [k for k in getattr(config, field, None) or {} if not any(pattern_matches(k, t) for t in targets)]
        if unused:
            warnings.warn(f"{field} keys {unused} match no adapted layer and are ignored; check their spelling "
                          f"(adapted layers: {_summarise(list(targets))}).", stacklevel=3)


def is_adaptable_linear(module: nn.Module) -> bool:
    """A linear layer an adapter can wrap: ``nn.Linear``, GPT-2's ``Conv1D`` or a slimtune quantized linear."""
    return is_dense_linear(module) or isinstance(module, QuantizedLinear)


def wrap_linear(base: nn.Module, layer_class: type[TunerLayer], method: str) -> TunerLayer:
    """``layer_class(base)`` for a method that wraps linear layers only; a clear error for any other module."""
    if is_adaptable_linear(base):
        return layer_class(base)
    raise TypeError(f"{method} wraps linear layers (nn.Linear, transformers Conv1D, slimtune quantized linear), not a "
                    f"{type(base).__name__}; pick other target_modules.")


def wrappable_names(model: nn.Module) -> list[str]:
    """Every module a LoRA-style method can wrap (linear, Conv1D, quantized linear, embedding)."""
    return [n for n, m in model.named_modules() if n and (is_adaptable_linear(m) or isinstance(m, nn.Embedding))]


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: Iterable[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Names of the modules to wrap, in model order. Raises with the available names when nothing matches."""
    if target_modules is None:
        raise ValueError(
            f"target_modules is None and this method has no default layers for model_type {model_type(model)!r}; "
            "name the layers to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'. "
            f"Layers that can be adapted: {_summarise(wrappable_names(model))}."
        )
    all_linear = target_modules == "all-linear"
    heads = output_head_names(model) if all_linear else set()
    skip = set(skip)
    layers = set(layers_to_transform) if layers_to_transform is not None else None
    found, saved_out = [], False
    for name, module in model.named_modules():
        if not name or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        if all_linear:
            base = module.base_layer if isinstance(module, TunerLayer) else module  # a wrapper counts as its base
            if not is_adaptable_linear(base) or name in heads:
                continue
        elif not name_matches(name, target_modules):
            continue
        if name_matches(name, exclude_modules):
            continue
        if modules_to_save and any(is_saved_module(prefix, modules_to_save) for prefix in _self_and_parents(name)):
            saved_out = True
            continue
        exact = not all_linear and not isinstance(target_modules, str) and name in target_modules
        if layers is not None and not exact and layer_index(name, layers_pattern) not in layers:
            continue  # (a module named in full is wrapped whatever its layer, as in PEFT)
        found.append(name)
    if not found:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module"
            + (f" (after exclude_modules={exclude_modules!r})" if exclude_modules else "")
            + (f" outside modules_to_save={list(modules_to_save or [])!r} (a module trained whole, or inside one, "
               "takes no adapter)" if saved_out else "")
            + (f" in layers {sorted(layers)}" if layers is not None else "")
            + f". Layers that can be adapted: {_summarise(wrappable_names(model))}."
        )
    if not isinstance(target_modules, str):  # PEFT skips such an entry silently: a typo (v_prj) trains half the layers
        names = [name for name, _ in model.named_modules() if name]
        unmatched = [t for t in target_modules if not any(name_matches(name, [t]) for name in names)]
        if unmatched:
            warnings.warn(f"target_modules entries {unmatched} match no module of this model (only the others are "
                          f"adapted); check their spelling. Layers that can be adapted: "
                          f"{_summarise(wrappable_names(model))}.", stacklevel=2)
    return found


def is_saved_module(name: str, modules_to_save: Sequence[str]) -> bool:
    """Whether ``modules_to_save`` picks module ``name``: PEFT's own test, a plain string suffix (``norm`` picks
    ``model.norm`` and every ``input_layernorm``; ``classifier`` picks DistilBERT's ``pre_classifier`` too), so the
    same config copies the same modules, and PEFT's files load."""
    return any(name.endswith(m) for m in modules_to_save)


def _self_and_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def adaptable_summary(model: nn.Module) -> str:
    """The layers of ``model`` an adapter can wrap, for error messages."""
    return _summarise(wrappable_names(model))


def _summarise(names: list[str]) -> str:
    """Short names (last component) with one full example each, so the message stays readable."""
    by_suffix: dict[str, str] = {}
    for name in names:
        by_suffix.setdefault(name.split(".")[-1], name)
    return ", ".join(f"{suffix} (e.g. {full})" if suffix != full else suffix for suffix, full in by_suffix.items())


def check_not_peft_model(model: nn.Module) -> None:
    """Refuse a model PEFT has already changed (a ``PeftModel``, or tuner layers ``inject_adapter_in_model`` put in):
    its layers are PEFT's wrappers, which slimtune cannot wrap again."""
    peft = next((name for name, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"), None)
    if peft is not None:
        raise TypeError(f"this model holds PEFT's layers ({peft or 'the model itself'}: "
                        f"{type(model.get_submodule(peft)).__name__}); slimtune adds its adapters to a plain model. "
                        "Give it PEFT's base (peft_model.unload() or merge_and_unload()), or save the PEFT adapter "
                        "(save_pretrained) and load it with slimtune.load_adapter(base, folder).")
