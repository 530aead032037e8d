"""Sparse fine-tuning: BitFit and selective fine-tuning train chosen base parameters in place.

BitFit: Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models", arXiv:2106.10199.

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

from slimtune.config import MethodConfig, default_head, layer_list, str_list
from slimtune.core.state import AdapterState, find_state
from slimtune.methods.contract import PEFT_PREFIX, Method, saved_modules, tuner_layers
from slimtune.methods.layers import TunerLayer
from slimtune.methods.prompts import PROMPT_CONTAINER
from slimtune.methods.targets import layer_index, name_matches
from slimtune.quant.linear import QuantizedLinear


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


def frozen_active_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The active adapters' parameters that are frozen (loaded with is_trainable=False): switching the active set on
    adding or removing another adapter leaves them so, as PEFT does (an adapter that becomes active trains)."""
    state = find_state(model)
    if state is None:
        return []
    owned: list[nn.Parameter] = []
    for _, layer in tuner_layers(model):
        for attr in layer.adapter_attrs:
            held = getattr(layer, attr)
            for name in (n for n in state.active if n in held):
                owned += list(held[name].parameters()) if isinstance(held[name], nn.Module) else [held[name]]
    for _, module in saved_modules(model):
        copies = module.modules_to_save
        owned += [p for n in state.active if n in copies for p in copies[n].parameters()]
    prompts = getattr(model, PROMPT_CONTAINER, {})
    owned += [p for n in state.active if n in prompts for p in prompts[n].parameters()]
    owned += [p for n in state.active if isinstance(data := state.data.get(n), TrainedInPlace)
              for p in data.params.values()]
    return [p for p in owned if not p.requires_grad]


@dataclass
class TrainedInPlace:
    """What a sparse adapter keeps: where its parameters live, their values before training, and whether merged.

    The owning modules are kept rather than the parameters: ``load_state_dict(assign=True)``, ``to("meta")`` /
    ``to_empty`` and the like put new parameter objects into the same modules (and another method's wrapper keeps
    the module as its ``base_layer``).
    """

    owners: dict[str, tuple[nn.Module, str]]  # parameter name when added → (the module holding it, attribute)
    before: dict[str, torch.Tensor]
    merged: bool = False
    swapped_out: bool = False  # the base values are in the weights, and ``before`` holds the trained ones

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The parameters as their modules hold them now."""
        return {name: getattr(module, attr) for name, (module, attr) in self.owners.items()}

    @torch.no_grad()
    def swap(self, model: nn.Module, out: bool) -> None:
        """Put the base values (``out``) or the trained ones in the weights; nothing changes if one does not fit."""
        if self.swapped_out == out:
            return
        params = self.check_fits(model)
        for name, param in params.items():
            current = param.detach().clone()
            param.copy_(self.before[name])
            self.before[name] = current
        self.swapped_out = out

    def check_fits(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters, if ``model`` still holds their modules and the values kept for them still fit (else a
        clear error): resize_token_embeddings resizes an input embedding in place but replaces an output layer."""
        held = {id(module) for module in model.modules()}
        if replaced := [name for name, (module, _) in self.owners.items() if id(module) not in held]:
            raise ValueError(f"the module holding {replaced[0]} was replaced since its sparse adapter was added "
                             "(resize_token_embeddings makes a new output layer): the adapter's values belong to the "
                             "old one. Resize the model before adding the adapter.")
        params = self.params
        for name, param in params.items():
            if param.shape != self.before[name].shape:
                raise ValueError(f"{name} is now {tuple(param.shape)} but was {tuple(self.before[name].shape)} when "
                                 "its sparse adapter was added (resize_token_embeddings after adding it?): the values "
                                 "kept for it no longer fit. Resize the model before adding the adapter.")
        return params

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained values (in the weights, or kept aside while the base ones are in)."""
        return self.before if self.swapped_out else dict(self.params)


def check_in_place_fits(model: nn.Module) -> None:
    """Raise before a lifecycle call changes anything if a sparse adapter's parameters are no longer those it
    kept values for (see :meth:`TrainedInPlace.check_fits`)."""
    state = find_state(model)
    for data in state.data.values() if state is not None else ():
        if isinstance(data, TrainedInPlace):
            data.check_fits(model)


def in_place_owners(state: AdapterState) -> dict[int, str]:
    """id() of each base parameter a sparse adapter trains in place → that adapter's name."""
    return {id(param): adapter for adapter, data in state.data.items() if isinstance(data, TrainedInPlace)
            for param in data.params.values()}


class SparseMethod(Method):
    """Shared machinery: pick base parameters, train them in place, remember their old values.

    The values they had before are kept, so removing the adapter (or ``unload``) restores them, while
    ``merge`` / ``merge_and_unload`` keeps the trained values. File format (slimtune's own, PEFT has
    neither): ``adapter_config.json`` with ``peft_type`` ``"BITFIT"`` or ``"SELECTIVE"``, and
    ``adapter_model.safetensors`` holding each trained parameter under ``base_model.model.<name>`` (the key
    PEFT uses for biases trained with ``bias="all"``), plus any ``modules_to_save`` copies.
    """

    changes_base_weights: ClassVar[bool] = True

    def select(self, model: nn.Module, config: MethodConfig) -> list[str]:
        """Names of the base parameters this adapter trains (each sparse method defines it)."""
        raise NotImplementedError

    def eligible(self, model: nn.Module, config: MethodConfig) -> list[tuple[str, nn.Parameter]]:
        adapter_params = _adapter_parameter_names(model)
        heads = getattr(config, "modules_to_save", None) or []
        return [(n, p) for n, p in model.named_parameters() if n not in adapter_params
                and not any(re.match(rf"(^|.*\.){re.escape(h)}($|\..*)", n) for h in heads)]

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        """Raise (before the model is changed) if nothing would train, or a chosen weight holds merged adapters
        (switching this adapter in and out would overwrite them)."""
        names = self.select(model, config)
        for layer_name, layer in tuner_layers(model):
            if layer.merged_adapters and any(n.startswith(f"{layer_name}.base_layer.") for n in names):
                raise ValueError(f"{layer_name} holds merged adapters {layer.merged_adapters}; a sparse adapter "
                                 "training its weight in place would overwrite them. Unmerge them first "
                                 "(slimtune.unmerge_adapter(model)).")

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        names = self.select(model, config)
        params = dict(model.named_parameters())
        owned = in_place_owners(state)  # by identity: a wrapper renames a weight (….base_layer.weight)
        clash = sorted(n for n in names if id(params[n]) in owned)
        if clash:
            raise ValueError(f"parameters {clash[:3]} are already trained in place by adapter "
                             f"{owned[id(params[clash[0]])]!r}; two sparse adapters cannot own one parameter. Remove "
                             "that adapter first.")
        owners = {n: (model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names}
        state.data[adapter_name] = TrainedInPlace(owners, {n: params[n].detach().clone() for n in names})
        for name in names:
            params[name].requires_grad_(True)

    def _mine(self, state: AdapterState) -> dict[str, TrainedInPlace]:
        return {a: state.data[a] for a in state.adapters_of(self.peft_type)}

    def adapter_tensors(self, model: nn.Module, adapter_name: str, state: AdapterState) -> dict[str, torch.Tensor]:
        """The trained values under the parameters' names in the base model (``.base_layer`` of another method's
        wrapper left out, so the file loads whichever adapters the model holds)."""
        data = state.data[adapter_name]
        data.check_fits(model)
        return {PEFT_PREFIX + n.replace(".base_layer.", "."): t for n, t in data.trained().items()}

    def _place(self, model: nn.Module, state: AdapterState, active: list[str]) -> None:
        """Trained values in the weights for the active and the merged adapters, base values for the others and
        for all of them inside ``disable_adapters``."""
        for adapter, data in self._mine(state).items():
            data.swap(model, state.disabled or (adapter not in active and not data.merged))

    def set_active(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        for adapter, data in self._mine(state).items():
            for param in data.params.values():
                param.requires_grad_(adapter in adapter_names)
        self._place(model, state, adapter_names)

    def set_disabled(self, model: nn.Module, disabled: bool, state: AdapterState) -> None:
        """Inside ``disable_adapters``: swap the values from before training back in (and out again)."""
        self._place(model, state, state.active)

    def merge(self, model: nn.Module, adapter_names: list[str], state: AdapterState) -> None:
        """Trained values in the weights (a merged adapter applies whether active or not); they survive removal."""
        for adapter in adapter_names:
            state.data[adapter].merged = True
        self._place(model, state, state.active)

    def unmerge(self, model: nn.Module, state: AdapterState) -> None:
        for data in self._mine(state).values():
            data.merged = False
        self._place(model, state, state.active)

    def merged_adapters(self, state: AdapterState) -> list[str]:
        return [name for name, data in self._mine(state).items() if data.merged]

    @torch.no_grad()
    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        data = state.data.pop(adapter_name)
        data.swap(model, not data.merged)
        for param in data.params.values():
            param.requires_grad_(False)


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Ben Zaken et al., 2021): train only the bias terms ``b`` of ``W x + b`` (plus a head).

    Trainable params: the sum of all bias sizes (+ ``modules_to_save``; for ``task_type="SEQ_CLS"``
    the ``classifier``/``score`` head is added unless ``modules_to_save=[]``).
    """

    peft_type: ClassVar[str] = "BITFIT"

    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)


class BitFitMethod(SparseMethod):
    peft_type: ClassVar[str] = "BITFIT"
    config_class: ClassVar[type[MethodConfig]] = BitFitConfig

    def select(self, model: nn.Module, config: MethodConfig) -> list[str]:
        names = [n for n, _ in self.eligible(model, config) if n.split(".")[-1] == "bias"]
        if not names:
            raise ValueError(f"BitFit found no bias parameters in {type(model).__name__} (Llama- and T5-style models "
                             "have none). Use SELECTIVE (e.g. target_parameters=['norm.weight']) or LoRA instead.")
        return names


@dataclass
class SelectiveConfig(MethodConfig):
    """Selective fine-tuning: train a named subset of the base parameters in place, ``W ← W - η ∇W`` for
    ``W ∈ S`` only.

    ``S`` = parameters of ``target_modules`` (module names: dotted suffix list or full-match regex)
    ∪ ``target_parameters`` (parameter names, same matching, e.g. ``["bias", "norm.weight"]``),
    restricted to the blocks in ``layers_to_transform``; with only ``layers_to_transform`` set,
    whole blocks train. Trainable params: ``Σ_{W∈S} |W|``.
    """

    peft_type: ClassVar[str] = "SELECTIVE"

    modules_to_save: list[str] | None = None
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = str_list("target_modules", self.target_modules)
        self.target_parameters = str_list("target_parameters", self.target_parameters)
        self.modules_to_save = default_head(self.task_type, self.modules_to_save)
        self.layers_to_transform = layer_list(self.layers_to_transform)
        if self.target_modules is None and self.target_parameters is None and self.layers_to_transform is None:
            raise ValueError("SELECTIVE needs target_modules, target_parameters or layers_to_transform to say what "
                             "trains, e.g. target_parameters=['norm.weight'] or layers_to_transform=[0].")


class SelectiveMethod(SparseMethod):
    peft_type: ClassVar[str] = "SELECTIVE"
    config_class: ClassVar[type[MethodConfig]] = SelectiveConfig

    def select(self, model: nn.Module, config: MethodConfig) -> list[str]:
        assert isinstance(config, SelectiveConfig)
        layers = config.layers_to_transform
        assert not isinstance(layers, int)  # __post_init__ made a one-element list of a single index
        chosen = []
        matched = {"target_modules": False, "target_parameters": False}
        for name, _ in self.eligible(model, config):
            module_name = name.rpartition(".")[0]
            plain = name.replace(".base_layer.", ".")  # as the model names it without other adapters' wrappers
            by_module = config.target_modules is not None and any(
                name_matches(m, config.target_modules) for m in _prefixes(module_name))
            by_param = config.target_parameters is not None and (name_matches(plain, config.target_parameters)
                                                                 or name_matches(name, config.target_parameters))
            matched["target_modules"] |= by_module
            matched["target_parameters"] |= by_param
            everything = config.target_modules is None and config.target_parameters is None
            if not (by_module or by_param or everything):
                continue
            if layers is not None and layer_index(name, config.layers_pattern) not in layers:
                continue
            chosen.append(name)
        _refuse_quantized(model, config)
        for key, hit in matched.items():  # each given selector must select something, as LoRA's targets must
            if getattr(config, key) is not None and not hit:
                raise ValueError(f"{key}={getattr(config, key)!r} matched no parameter of this model{_tied(model)}; "
                                 f"parameter names look like {[n for n, _ in self.eligible(model, config)][:4]}.")
        if not chosen:
            raise ValueError(
                f"SELECTIVE matched no parameter (target_modules={config.target_modules!r}, target_parameters="
                f"{config.target_parameters!r}, layers_to_transform={config.layers_to_transform!r}); parameter names "
                f"look like {[n for n, _ in self.eligible(model, config)][:4]}."
            )
        return chosen


def _tied(model: nn.Module) -> str:
    """Which parameters are another's under a second name (a tied head): listed once, under the first."""
    first: dict[int, str] = {}
    tied = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.append(f"{name} is {first[id(param)]}")
        first.setdefault(id(param), name)
    return f" ({'; '.join(tied[:3])}: select it by that name)" if tied else ""


def _refuse_quantized(model: nn.Module, config: SelectiveConfig) -> None:
    """A quantized layer's weight is packed codes, not a parameter: one the selection names cannot train in place
    (it would be left out silently)."""
    picked, layers = [], config.layers_to_transform
    assert not isinstance(layers, int)  # __post_init__ made a one-element list of a single index
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        if layers is not None and layer_index(name, config.layers_pattern) not in layers:
            continue
        if (config.target_modules is None and config.target_parameters is None) or (
                config.target_modules is not None and any(name_matches(m, config.target_modules)
                                                          for m in _prefixes(name))):
            picked.append(f"{name} ({module.bits}-bit)")
    if picked:
        selector = "target_modules" if config.target_modules is not None else "layers_to_transform"
        raise ValueError(f"{selector}={getattr(config, selector)!r} selects quantized layers {picked[:3]}"
                         f"{f' and {len(picked) - 3} more' if len(picked) > 3 else ''}, whose weights are packed codes "
                         "that cannot train in place. Train them on an unquantized base (no quantization), adapt "
                         "them with LoRA, or select full-precision parameters (target_parameters=['norm.weight']).")


def _prefixes(module_name: str) -> list[str]:
    """``a.b.c`` → ``[a.b.c, a.b, a]``: a parameter belongs to every enclosing module."""
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


