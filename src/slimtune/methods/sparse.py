"""Sparse fine-tuning (BitFit, selective) and LayerDrop.

BitFit: Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", arXiv:2106.10199. LayerDrop: Fan et al., "Reducing Transformer Depth on
Demand with Structured Dropout", arXiv:1909.11556.

BitFit and selective fine-tuning train chosen *base* parameters in place; the values they had
before are kept, so removing the adapter (or ``unload``) restores them, while ``merge`` /
``merge_and_unload`` keeps the trained values. File format (slimtune's own, PEFT has neither):
``adapter_config.json`` with ``peft_type`` ``"BITFIT"`` or ``"SELECTIVE"`` and the fields below, and
``adapter_model.safetensors`` holding each trained parameter under ``base_model.model.<name>`` (the
same key PEFT uses for biases trained with ``bias="all"``), plus any ``modules_to_save`` copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimtune.config import MethodConfig, _check_str_list, register_config
from slimtune.methods.base import TunerLayer
from slimtune.methods.layerwise import find_layer_lists
from slimtune.methods.prompts import PROMPT_CONTAINER, default_head
from slimtune.targets import layer_index, name_matches

_SPARSE = "_slimtune_sparse"  # model.__dict__: adapter -> {param name: [param, value before, merged]}
_LAYERDROP = "_slimtune_layerdrop"  # model.__dict__: adapter -> [(list name, original ModuleList)]
DISK_PREFIX = "base_model.model."


def _adapter_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that belong to adapters (wrapped-layer adapters, head copies, prompt encoders)."""
    names = set()
    for module_name, module in model.named_modules():
        attrs = module.adapter_attrs if isinstance(module, TunerLayer) else ()
        for attr in attrs:
            names |= {f"{module_name}.{attr}.{n}" for n, _ in getattr(module, attr).named_parameters()}
    skip_parts = {"modules_to_save", "original_module", PROMPT_CONTAINER}
    names |= {n for n, _ in model.named_parameters() if skip_parts & set(n.split("."))}
    return names


@dataclass
class _SparseConfig(MethodConfig):
    """Shared machinery: pick base parameters, train them in place, remember their old values."""

    modules_to_save: list[str] | None = None

    def select(self, model: nn.Module) -> list[str]:
        """Names of the base parameters this adapter trains (each sparse method defines it)."""
        raise NotImplementedError

    def _eligible(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        adapter_params = _adapter_parameter_names(model)
        heads = self.modules_to_save or []
        return [(n, p) for n, p in model.named_parameters() if n not in adapter_params
                and not any(re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", n) for h in heads)]

    def check_model(self, model: nn.Module) -> None:
        """Raise (before the model is changed) if nothing would train."""
        self.select(model)

    def inject_into(self, model: nn.Module, adapter_name: str) -> None:
        names = self.select(model)
        registry = model.__dict__.setdefault(_SPARSE, {})
        owned = {n: a for a, entries in registry.items() for n in entries}
        clash = sorted(n for n in names if n in owned)
        if clash:
            raise ValueError(f"parameters {clash[:3]} are already trained in place by adapter {owned[clash[0]]!r}; "
                             "two sparse adapters cannot own one parameter. Remove that adapter first.")
        params = dict(model.named_parameters())
        registry[adapter_name] = {n: [params[n], params[n].detach().clone(), False] for n in names}
        for name in names:
            params[name].requires_grad_(True)

    def adapter_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {DISK_PREFIX + n: entry[0] for n, entry in model.__dict__[_SPARSE][adapter_name].items()}

    def set_active(self, model: nn.Module, adapter_names: list[str]) -> None:
        for adapter, entries in model.__dict__.get(_SPARSE, {}).items():
            for param, _, _ in entries.values():
                param.requires_grad_(adapter in adapter_names)

    @torch.no_grad()
    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        """Inside ``disable_adapters``: swap the values from before training back in (and out again)."""
        if model.__dict__.get(_SPARSE + "_disabled", False) == disabled:
            return
        model.__dict__[_SPARSE + "_disabled"] = disabled
        for entries in model.__dict__.get(_SPARSE, {}).values():
            for entry in entries.values():
                if not entry[2]:
                    current = entry[0].detach().clone()
                    entry[0].copy_(entry[1])
                    entry[1] = current

    def merge(self, model: nn.Module, adapter_names: list[str]) -> None:
        """The trained values are already in the weights; merged ones survive removal."""
        for adapter in adapter_names:
            for entry in model.__dict__.get(_SPARSE, {}).get(adapter, {}).values():
                entry[2] = True

    def unmerge(self, model: nn.Module) -> None:
        for entries in model.__dict__.get(_SPARSE, {}).values():
            for entry in entries.values():
                entry[2] = False

    @torch.no_grad()
    def remove_from(self, model: nn.Module, adapter_name: str | None) -> None:
        registry = model.__dict__.get(_SPARSE, {})
        for adapter in [adapter_name] if adapter_name is not None else list(registry):
            for param, before, merged in registry.pop(adapter, {}).values():
                if not merged:
                    param.copy_(before)
                param.requires_grad_(False)
        if not registry:
            model.__dict__.pop(_SPARSE, None)
            model.__dict__.pop(_SPARSE + "_disabled", None)


@register_config
@dataclass
class BitFitConfig(_SparseConfig):
    """BitFit (Ben Zaken et al., 2021): train only the bias terms ``b`` of ``W x + b`` (plus a head).

    Trainable params: the sum of all bias sizes (+ ``modules_to_save``; for ``task_type="SEQ_CLS"``
    the ``classifier``/``score`` head is added unless ``modules_to_save=[]``).
    """

    peft_type: ClassVar[str] = "BITFIT"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)

    def select(self, model: nn.Module) -> list[str]:
        names = [n for n, _ in self._eligible(model) if n.split(".")[-1] == "bias"]
        if not names:
            raise ValueError(f"BitFit found no bias parameters in {type(model).__name__} (Llama- and T5-style models "
                             "have none). Use SELECTIVE (e.g. target_parameters=['norm.weight']) or LoRA instead.")
        return names


@register_config
@dataclass
class SelectiveConfig(_SparseConfig):
    """Selective fine-tuning: train a named subset of the base parameters in place, ``W ← W - η ∇W`` for
    ``W ∈ S`` only.

    ``S`` = parameters of ``target_modules`` (module names: dotted suffix list or full-match regex)
    ∪ ``target_parameters`` (parameter names, same matching, e.g. ``["bias", "norm.weight"]``),
    restricted to the blocks in ``layers_to_transform``; with only ``layers_to_transform`` set,
    whole blocks train. Trainable params: ``Σ_{W∈S} |W|``.
    """

    peft_type: ClassVar[str] = "SELECTIVE"

    target_modules: list[str] | str | None = None
    target_parameters: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _check_str_list("target_modules", self.target_modules)
        self.target_parameters = _check_str_list("target_parameters", self.target_parameters)
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.target_modules is None and self.target_parameters is None and self.layers_to_transform is None:
            raise ValueError("SELECTIVE needs target_modules, target_parameters or layers_to_transform to say what "
                             "trains, e.g. target_parameters=['norm.weight'] or layers_to_transform=[0].")

    def select(self, model: nn.Module) -> list[str]:
        chosen = []
        for name, _ in self._eligible(model):
            module_name = name.rpartition(".")[0]
            by_module = self.target_modules is not None and any(
                name_matches(m, self.target_modules) for m in _prefixes(module_name))
            by_param = self.target_parameters is not None and name_matches(name, self.target_parameters)
            everything = self.target_modules is None and self.target_parameters is None
            if not (by_module or by_param or everything):
                continue
            if self.layers_to_transform is not None and \
                    layer_index(name, self.layers_pattern) not in self.layers_to_transform:
                continue
            chosen.append(name)
        if not chosen:
            raise ValueError(
                f"SELECTIVE matched no parameter (target_modules={self.target_modules!r}, target_parameters="
                f"{self.target_parameters!r}, layers_to_transform={self.layers_to_transform!r}); parameter names "
                f"look like {[n for n, _ in self._eligible(model)][:4]}."
            )
        return chosen


def _prefixes(module_name: str) -> list[str]:
    """``a.b.c`` → ``[a.b.c, a.b, a]``: a parameter belongs to every enclosing module."""
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class LayerDropList(nn.ModuleList):
    """A block list that, in training, skips each block with probability ``p``: ``h_{l+1} = h_l`` w.p. ``p``.

    Shares its entries with the list it replaces (same module names and state-dict keys); in eval
    mode it is the plain list. If every block would be skipped, one random block runs. Fan et al., 2019,
    arXiv:1909.11556.
    """

    def __init__(self, layers: nn.ModuleList, p: float) -> None:
        nn.Module.__init__(self)
        self._modules = layers._modules  # the very same entries, so later surgery shows up in both
        self.p = p
        self.disabled = False

    def _kept(self, layers: list[nn.Module]) -> list[nn.Module]:
        if not self.training or self.p == 0 or self.disabled:
            return layers
        keep = torch.rand(len(layers)) >= self.p
        if layers and not keep.any():  # never skip them all: the loss must still depend on the blocks
            keep[torch.randint(len(layers), ())] = True
        return [layer for layer, k in zip(layers, keep.tolist()) if k]

    def __iter__(self):
        return iter(self._kept(list(self._modules.values())))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(self._kept(list(self._modules.values())[idx]))
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"layerdrop={self.p}"


@register_config
@dataclass
class LayerDropConfig(MethodConfig):
    """LayerDrop: skip whole transformer blocks with probability ``layerdrop`` while training.

    Adds no parameters and composes with any method: add it beside another adapter with
    :func:`apply_layerdrop` (or ``inject(..., activate=False)``); it acts whether or not it is active,
    in ``model.train()`` mode only. ``layers_pattern`` names the block list if auto-detection fails.
    """

    peft_type: ClassVar[str] = "LAYERDROP"

    layerdrop: float = 0.1
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layerdrop, bool) or not isinstance(self.layerdrop, (int, float)) \
                or not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"layerdrop={self.layerdrop!r} must be a probability in [0, 1) (e.g. 0.1); "
                             "1 would skip every layer.")

    def check_model(self, model: nn.Module) -> None:
        """Raise (before the model is changed) if the model has no block list to drop from."""
        find_layer_lists(model, self.layers_pattern)

    def inject_into(self, model: nn.Module, adapter_name: str) -> None:
        if model.__dict__.get(_LAYERDROP):
            raise ValueError(f"LayerDrop is already applied by adapter {next(iter(model.__dict__[_LAYERDROP]))!r}; "
                             "remove it before adding another.")
        from slimtune.inject import replace_module

        replaced = []
        for name in find_layer_lists(model, self.layers_pattern):
            original = model.get_submodule(name)
            replace_module(model, name, LayerDropList(original, self.layerdrop))
            replaced.append((name, original))
        model.__dict__[_LAYERDROP] = {adapter_name: replaced}

    def adapter_tensors(self, model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        for module in model.modules():
            if isinstance(module, LayerDropList):
                module.disabled = disabled

    def remove_from(self, model: nn.Module, adapter_name: str | None) -> None:
        from slimtune.inject import replace_module

        registry = model.__dict__.get(_LAYERDROP, {})
        for adapter in [adapter_name] if adapter_name is not None else list(registry):
            for name, original in registry.pop(adapter, []):
                replace_module(model, name, original)
        if not registry:
            model.__dict__.pop(_LAYERDROP, None)


def apply_layerdrop(model: nn.Module, layerdrop: float, adapter_name: str = "layerdrop",
                    layers_pattern: list[str] | str | None = None) -> nn.Module:
    """Add LayerDrop beside the model's adapters (without changing which adapters are active)."""
    from slimtune.inject import inject

    return inject(model, LayerDropConfig(layerdrop=layerdrop, layers_pattern=layers_pattern), adapter_name,
                  activate=False)
