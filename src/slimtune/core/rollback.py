"""Take back a change to a model that failed part-way: its module tree, every module's own attributes (children,
parameters, buffers, hooks, training flags, adapter bookkeeping such as scaling dicts and active lists, and the
containers inside those), slimtune's adapter state (shared hooks included), each parameter's ``requires_grad`` and
torch's random generators, as they were when the snapshot was taken.

Adding an adapter wraps layer after layer; one layer refusing late (an odd rank for an orthogonal init, memory
running out) must not leave the earlier ones wrapped. Tensor values are not copied: a change that writes into
existing tensors needs its own undo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from slimtune.core.state import find_state

# Containers are saved this many levels down (a module's dict of adapters' dicts; the state's shared hook tables).
DEPTH = 3


CONTAINERS = (dict, list, set)


def _saved(value: Any, depth: int = DEPTH) -> tuple[Any, Any]:
    """``(value, contents)``: a container with its contents (each saved again, ``depth`` levels down), to put back
    in place, so that whoever holds the container sees it restored; anything else (or deeper) as it is."""
    if not depth:
        return value, None
    if isinstance(value, dict):  # (leaves and empty containers inline: a large model has ~20 entries per module)
        return value, [(key, _item(item, depth)) for key, item in value.items()]
    if isinstance(value, list):
        return value, [_item(item, depth) for item in value]
    if isinstance(value, set):
        return value, set(value)
    return value, None


def _item(item: Any, depth: int) -> tuple[Any, Any]:
    if not isinstance(item, CONTAINERS):
        return item, None
    return (item, ()) if not item else _saved(item, depth - 1)


def _restored(saved: tuple[Any, Any]) -> Any:
    value, contents = saved
    if contents is None:
        return value
    if isinstance(value, dict):
        items = [(key, _restored(item)) for key, item in contents]
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        value[:] = [_restored(item) for item in contents]
    else:
        value.clear()
        value.update(contents)
    return value


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """torch's CPU generator state, and every CUDA device's where CUDA is in use."""
    return torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class ModelSnapshot:
    """``ModelSnapshot(model)`` now, ``.restore()`` after a failed change."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [_saved(module.__dict__) for module in model.modules()]
        state = find_state(model)
        self.state = None if state is None else _saved(state.__dict__)
        self.grads = [(param, param.requires_grad) for param in model.parameters()]
        self.rng = rng_state()

    def restore(self) -> None:
        for saved in self.modules:
            _restored(saved)
        if self.state is not None:
            _restored(self.state)
        for param, requires_grad in self.grads:
            param.requires_grad_(requires_grad)
        set_rng_state(self.rng)


@contextlib.contextmanager
def restored_on_error(model: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, the model is restored to the :class:`ModelSnapshot` taken before it."""
    snapshot = ModelSnapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
