"""Take back a change to a model that failed part-way: its module tree, every module's own attributes (children,
parameters, buffers, hooks, training flags, adapter bookkeeping such as scaling dicts and active lists), slimtune's
adapter state and each parameter's ``requires_grad``, as they were when the snapshot was taken.

Adding an adapter wraps layer after layer; one layer refusing late (an odd rank for an orthogonal init, memory
running out) must not leave the earlier ones wrapped. Tensor values are not copied: a change that writes into
existing tensors needs its own undo.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import nn

from slimtune.core.state import find_state


def _saved(attributes: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Each attribute with a copy of its contents where it is a container changed in place (dict, list, set)."""
    return {key: (value, copy.copy(value) if isinstance(value, (dict, list, set)) else None)
            for key, value in attributes.items()}


def _restore(attributes: dict[str, Any], saved: dict[str, tuple[Any, Any]]) -> None:
    for key in [k for k in attributes if k not in saved]:
        del attributes[key]
    for key, (value, contents) in saved.items():
        attributes[key] = value
        if isinstance(value, list):
            value[:] = contents
        elif isinstance(value, (dict, set)):
            value.clear()
            value.update(contents)


class ModelSnapshot:
    """``ModelSnapshot(model)`` now, ``.restore()`` after a failed change."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [(module, _saved(module.__dict__)) for module in model.modules()]
        state = find_state(model)
        self.state = None if state is None else (state, _saved(state.__dict__))
        self.grads = [(param, param.requires_grad) for param in model.parameters()]

    def restore(self) -> None:
        for module, saved in self.modules:
            _restore(module.__dict__, saved)
        if self.state is not None:
            _restore(self.state[0].__dict__, self.state[1])
        for param, requires_grad in self.grads:
            param.requires_grad_(requires_grad)


@contextlib.contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, the model is restored to the :class:`ModelSnapshot` taken before it."""
    snapshot = ModelSnapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
