"""What slimtune knows about a model it has changed, kept in one place: ``model.slimtune_state``.

slimtune edits the user's model in place (no wrapper model), so this record lives on the model
itself (in its ``__dict__``, not as a submodule or buffer). Per-method data is keyed by adapter name
in :attr:`AdapterState.data`; data a method shares among its adapters by ``peft_type`` in
:attr:`AdapterState.shared`. Modules a method adds (wrapped layers, ``prompt_encoder``, VeRA's shared
projections) are part of the module tree as usual, so ``.to(device)`` and ``state_dict`` see them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from slimtune.core.files import check_name

if TYPE_CHECKING:
    from slimtune.config import MethodConfig

STATE_ATTR = "slimtune_state"


@dataclass
class AdapterState:
    """Adapters of a model (name → config, in the order they were added) and what they changed."""

    configs: dict[str, MethodConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # requires_grad of every parameter before the first adapter, restored when the last one goes.
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    # Biases made trainable by a ``bias`` mode ("all" / "lora_only" / "vera_only").
    trainable_biases: list[str] = field(default_factory=list)
    # adapter name → the data its method keeps for it (values before in-place training, replaced modules …)
    data: dict[str, Any] = field(default_factory=dict)
    # peft_type → data a method shares among its adapters (forward hooks …)
    shared: dict[str, Any] = field(default_factory=dict)
    # inside ``disable_adapters`` / between ``disable_adapter_layers`` and ``enable_adapter_layers``
    disabled: bool = False

    def adapters_of(self, peft_type: str) -> list[str]:
        """Names of this model's adapters of one method."""
        return [name for name, config in self.configs.items() if config.peft_type == peft_type]

    def check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.configs)}. Add one with "
                             "slimtune.add_adapter or slimtune.load_adapter(model, path, adapter_name=...).")


def get_state(model: nn.Module) -> AdapterState:
    """The model's :class:`AdapterState`; raises if slimtune has not changed the model."""
    state = find_state(model)
    if state is None:
        raise ValueError("this model has no slimtune adapter; add one first with slimtune.add_adapter(model, config).")
    return state


def find_state(model: nn.Module) -> AdapterState | None:
    """The model's :class:`AdapterState`, or None."""
    return model.__dict__.get(STATE_ATTR)


def create_state(model: nn.Module) -> AdapterState:
    """Record the model's trainability, freeze every parameter, and attach a fresh state."""
    state = AdapterState(original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    model.__dict__[STATE_ATTR] = state
    model.requires_grad_(False)
    return state


def drop_state(model: nn.Module) -> None:
    """Give back each parameter's original ``requires_grad`` and forget the state."""
    state = get_state(model)
    for name, param in model.named_parameters():
        param.requires_grad_(state.original_requires_grad.get(name, param.requires_grad))
    del model.__dict__[STATE_ATTR]


# The containers layers keep adapters in, by name: a name that is one of their attributes (``train``, ``keys``,
# ``training``, ``_modules`` …) cannot be a key there.
ADAPTER_HOLDERS = (nn.ModuleDict(), nn.ParameterDict())


def check_adapter_name(adapter_name: object) -> str:
    """``adapter_name`` if it can name an adapter: a non-empty string without '.' (it becomes a module key) that can
    name a folder (an adapter saved beside others is saved under its name), as load_adapter takes it."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} is not valid: an adapter name is one non-empty string "
                         "without '.' (it becomes a module key), e.g. \"default\" or \"math\".")
    if adapter_name == "__base__" or any(hasattr(holder, adapter_name) for holder in ADAPTER_HOLDERS):
        why = "mixed_batch reads '__base__' as the base model" if adapter_name == "__base__" else \
            "it is an attribute of the containers that hold adapters by name (nn.ModuleDict, nn.ParameterDict)"
        raise ValueError(f"adapter name {adapter_name!r} is taken: {why}; pick another name, e.g. \"default\".")
    return check_name(adapter_name, "adapter name", most_bytes=200)  # (room for "adapter-NAME", temporary names)
