"""Which modules a method wraps: PEFT's matching rules as plain functions over module names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

try:  # GPT-2 style transposed linear layer; transformers is a run-time dependency.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

from slimtune.quant.linear import QuantizedLinear

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D, QuantizedLinear)  # type: ignore[arg-type]
EMBEDDING_TYPES: tuple[type, ...] = (nn.Embedding,)
# Names of the output head we never wrap with "all-linear" (PEFT does the same).
OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "embed_out", "output")


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


def pattern_value(patterns: dict, name: str, default):
    """Per-module override (``rank_pattern`` / ``alpha_pattern``): first key matching a dotted suffix, as PEFT."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output layer (tied or not), which "all-linear" leaves alone."""
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] in OUTPUT_HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {n for n, m in model.named_modules() if m is head}
    return names


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def wrappable_names(model: nn.Module) -> list[str]:
    """Every module a LoRA-style method can wrap (linear, Conv1D, quantized linear, embedding)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, LINEAR_TYPES + EMBEDDING_TYPES)]


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
            "target_modules is None; name the layers to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'. "
            f"Layers that can be adapted: {_summarise(wrappable_names(model))}."
        )
    all_linear = target_modules == "all-linear"
    heads = output_head_names(model) if all_linear else set()
    skip = set(skip)
    layers = set(layers_to_transform) if layers_to_transform is not None else None
    found = []
    for name, module in model.named_modules():
        if not name or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        if all_linear:
            if not is_linear(getattr(module, "base_layer", module)) or name in heads:  # a wrapper counts as its base
                continue
        elif not name_matches(name, target_modules):
            continue
        if name_matches(name, exclude_modules):
            continue
        if modules_to_save and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save):
            continue
        if layers is not None and layer_index(name, layers_pattern) not in layers:
            continue
        found.append(name)
    if not found:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module"
            + (f" (after exclude_modules={exclude_modules!r})" if exclude_modules else "")
            + (f" in layers {sorted(layers)}" if layers is not None else "")
            + f". Layers that can be adapted: {_summarise(wrappable_names(model))}."
        )
    return found


def _summarise(names: list[str]) -> str:
    """Short names (last component) with one full example each, so the message stays readable."""
    by_suffix: dict[str, str] = {}
    for name in names:
        by_suffix.setdefault(name.split(".")[-1], name)
    return ", ".join(f"{suffix} (e.g. {full})" if suffix != full else suffix for suffix, full in by_suffix.items())
