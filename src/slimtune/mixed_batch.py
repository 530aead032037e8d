"""Several adapters in one batch: row i of every batch runs its own adapter (or the base model).

    with slimtune.mixed_batch(model, ["math", "code", None]):      # None (or "__base__"): the base model
        model.generate(**batch)

Each adapted layer runs one stacked low-rank product for all rows, ``W x + ((x Aᵀ) ⊙ M) Bᵀ`` with a
row mask M: three launches per layer, no Python loop over adapters (:mod:`slimtune.serving.routing`).
For fast decoding (static cache, 4-bit kernels, merged layers bypassed) see :class:`slimtune.Decoder`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import nn

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
    layers = list(tuner_layers(model))
    layouts: dict = {}
    routes = [(layer, LayerFactors(layer, name, used).route(rows, layouts)) for name, layer in layers]  # checked first
    undo: list[Callable[[], None]] = []
    try:
        for layer, route in routes:
            set_forward(layer, layer.base_layer.forward if route is None else RoutedForward(layer.base_layer, route),
                        undo)
        with route_heads([m for _, m in saved_modules(model)], rows, used):
            yield model
    finally:
        undo_all(undo)
