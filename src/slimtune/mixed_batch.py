"""Several adapters in one batch: row i of every batch runs its own adapter (or the base model).

    with slimtune.mixed_batch(model, ["math", "code", None]):      # None (or "__base__"): the base model
        model.generate(**batch)

Each adapted layer runs one stacked low-rank product for all rows, ``W x + ((x Aᵀ) ⊙ M) Bᵀ`` with a
row mask M: three launches per layer, no Python loop over adapters (:mod:`slimtune.serving.routing`).
For fast decoding (static cache, 4-bit kernels, merged layers bypassed) see :class:`slimtune.Decoder`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from slimtune.core.state import get_state
from slimtune.methods.contract import saved_modules, tuner_layers
from slimtune.serving.routing import (
    BASE,
    LayerFactors,
    RoutedForward,
    check_rows,
    route_heads,
    row_names,
    set_forward,
    undo_all,
)

__all__ = ["BASE", "mixed_batch"]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch runs adapter ``adapter_names[i]`` (``None`` or ``"__base__"``:
    the base model alone) — for ``model(...)`` and ``model.generate(...)`` alike.

    Inference only (no dropout; factors are read on entry). Each adapted layer runs one stacked low-rank
    product for all rows, with no Python loop over adapters. Works for LoRA, DoRA, LoRA-FA, LoRA+ and
    VeRA adapters on linear layers, and per-adapter head copies (modules_to_save). For fast decoding
    (static cache, 4-bit kernels) see :class:`slimtune.serving.Decoder`.
    """
    rows = row_names(adapter_names)
    used = list(dict.fromkeys(n for row in rows for n in row))
    check_rows(model, used)
    if model.training:
        raise ValueError(TRAINING)
    if get_state(model).disabled:  # inside disable_adapters every row runs the base model (as PEFT's)
        yield model
        return
    layers = list(tuner_layers(model))
    layouts: dict = {}
    routes = [(layer, LayerFactors(layer, name, used).route(rows, layouts)) for name, layer in layers]  # checked first
    undo: list[Callable[[], None]] = []
    generating = [False]
    hook = model.register_forward_pre_hook(functools.partial(_check_call, len(rows), generating), with_kwargs=True)
    undo.append(hook.remove)
    try:
        set_generate(model, len(rows), generating, undo)
        state = get_state(model)
        for layer, route in routes:
            set_forward(layer, layer.base_layer.forward if route is None else
                        _UnlessDisabled(state, layer.base_layer, RoutedForward(layer.base_layer, route)), undo)
        with route_heads([m for _, m in saved_modules(model)], rows, used, state):
            yield model
    finally:
        undo_all(undo)


class _UnlessDisabled:
    """A routed forward that runs the base layer alone while the adapters are disabled (``disable_adapters``
    entered inside the block), as outside it."""

    def __init__(self, state: Any, base: Callable[..., Any], routed: Callable[..., Any]) -> None:
        self.state, self.base, self.routed = state, base, routed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.base if self.state.disabled else self.routed)(*args, **kwargs)


TRAINING = ("mixed_batch serves inference (the adapters' factors are read without gradients or dropout); call "
            "model.eval() first, as PEFT refuses adapter_names in training mode.")


def _check_call(names: int, generating: list[bool], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """One adapter name per row of a direct call (generate repeats rows for beams and num_return_sequences)."""
    if module.training:
        raise ValueError(TRAINING)
    inputs = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None),
                  args[0] if args else None)
    if not generating[0] and isinstance(inputs, torch.Tensor) and inputs.shape[0] != names:
        raise ValueError(f"mixed_batch got {names} adapter names but the model received a batch of "
                         f"{inputs.shape[0]} rows; give one adapter name per row.")


def set_generate(model: nn.Module, names: int, generating: list[bool], undo: list[Callable[[], None]]) -> None:
    """Wrap ``model.generate`` to mark its calls (it repeats rows, and the names with them)."""
    original = getattr(model, "generate", None)
    if original is None:
        return

    def generate(*args: Any, **kwargs: Any) -> Any:
        _check_call(names, generating, model, args, kwargs)  # its inputs: one row per name (it repeats them after)
        generating[0] = True
        try:
            return original(*args, **kwargs)
        finally:
            generating[0] = False

    previous = model.__dict__.get("generate")

    def restore() -> None:
        if previous is None:
            del model.__dict__["generate"]
        else:
            model.__dict__["generate"] = previous

    model.__dict__["generate"] = generate
    undo.append(restore)
