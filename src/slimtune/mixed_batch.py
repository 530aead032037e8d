"""Several adapters in one batch: row i of every batch runs its own adapter (or the base model).

    with slimtune.mixed_batch(model, ["math", "code", None]):      # None (or "__base__"): the base model
        model.generate(**batch)

Each adapted layer gathers its rows' factors and runs two batched matmuls, with no Python loop over
adapters; what a layer contributes per row it says itself (:meth:`TunerLayer.mixed_batch_factors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from slimtune.core.state import get_state
from slimtune.methods import method_for
from slimtune.methods.contract import saved_modules, tuner_layers
from slimtune.methods.layers import ModulesToSave, TunerLayer

BASE = "__base__"  # PEFT's row name for "no adapter"; None works too


def _row_factors(layer: TunerLayer, module_name: str, name: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
    try:
        return layer.mixed_batch_factors(name)
    except ValueError as error:
        raise ValueError(f"{module_name}: {error}") from None


def _expand(index: torch.Tensor, batch: int, device) -> torch.Tensor:
    """Row indices for a batch, following generate's in-place row repetition (beams, num_return_sequences)."""
    if batch % index.numel():
        raise ValueError(f"mixed_batch got {index.numel()} adapter names but the model received a batch of {batch} "
                         "rows; give one adapter name per row.")
    return index.repeat_interleave(batch // index.numel()).to(device)


class _RowRouter:
    """Forward hook of one layer: adds each row's own adapter via gathered factors and two batched matmuls."""

    @torch.no_grad()
    def __init__(self, layer: TunerLayer, module_name: str, names: list[str], index: torch.Tensor) -> None:
        factors = [_row_factors(layer, module_name, n) if n in layer.adapter_names else None for n in names]
        ref = next(f[0] for f in factors if f is not None)
        r = max(f[0].shape[0] for f in factors if f is not None)
        out_features = next(f[1].shape[0] for f in factors if f is not None)
        self.A = ref.new_zeros(len(names) + 1, r, ref.shape[1])  # slot 0: no adapter
        self.B = ref.new_zeros(len(names) + 1, out_features, r)
        self.G = ref.new_ones(len(names) + 1, out_features) if any(f and f[2] is not None for f in factors) else None
        for k, f in enumerate(factors, 1):
            if f is not None:
                self.A[k, : f[0].shape[0]], self.B[k, :, : f[0].shape[0]] = f[0], f[1]
                if f[2] is not None:
                    assert self.G is not None  # made above, as some adapter has a g
                    self.G[k] = f[2]
        self.index, self.bias = index, layer.bias

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        idx = _expand(self.index, x.shape[0], x.device)
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.A.dtype)  # (batch, seq, in)
        delta = torch.bmm(torch.bmm(xs, self.A[idx].transpose(1, 2)), self.B[idx].transpose(1, 2))  # (batch, seq, out)
        out = output.reshape(delta.shape)
        if self.G is not None:  # DoRA rows: g ⊙ (W x + B A x) − W x
            wx = (out if self.bias is None else out - self.bias).to(delta.dtype)
            delta = self.G[idx][:, None, :] * (wx + delta) - wx
        return (out + delta.to(out.dtype)).reshape(output.shape)


class _RowHeads:
    """Forward hook of a ``modules_to_save`` wrapper: each row through its adapter's copy (few adapters: a loop)."""

    def __init__(self, names: list[str], index: torch.Tensor) -> None:
        self.names, self.index = names, index

    def __call__(self, module: ModulesToSave, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        idx = _expand(self.index, x.shape[0], x.device)
        output = output.clone()
        for k, name in enumerate(self.names, 1):
            rows = (idx == k).nonzero().squeeze(1)
            if rows.numel() and name in module.modules_to_save:
                output[rows] = module.modules_to_save[name](x[rows]).to(output.dtype)
        return output


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch runs adapter ``adapter_names[i]`` (``None`` or ``"__base__"``:
    the base model alone) — for ``model(...)`` and ``model.generate(...)`` alike.

    Inference only (no dropout; factors are read on entry). Each adapted layer gathers its rows'
    factors and runs two batched matmuls, with no Python loop over adapters. Works for LoRA, DoRA,
    LoRA-FA, LoRA+ and VeRA adapters on linear layers, and per-adapter head copies (modules_to_save).
    """
    rows = [None if n in (None, BASE) else n for n in adapter_names]
    used = list(dict.fromkeys(n for n in rows if n is not None))
    state = get_state(model)
    state.check_known(used)
    for name in used:
        if method_for(state.configs[name]).changes_base_weights:
            raise ValueError(f"adapter {name!r} ({state.configs[name].peft_type}) changed the base weights themselves, "
                             "which a mixed batch cannot undo per row. Run it on its own model copy.")
    layers, heads = list(tuner_layers(model)), list(saved_modules(model))
    merged = [n for n, layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(f"{merged[0]} has merged adapters; mixed batches need unmerged ones: slimtune.unmerge(model).")
    index = torch.tensor([0 if n is None else used.index(n) + 1 for n in rows])
    routers = [(layer, _RowRouter(layer, n, used, index)) for n, layer in layers
               if any(a in layer.adapter_names for a in used)]  # built (and validated) before any change
    switchable = [m for _, m in layers] + [m for _, m in heads]
    previous = [m.disabled for m in switchable]
    handles: list[RemovableHandle] = []
    try:
        for module in switchable:
            module.disabled = True
        handles += [layer.register_forward_hook(router, with_kwargs=True) for layer, router in routers]
        handles += [m.register_forward_hook(_RowHeads(used, index), with_kwargs=True) for _, m in heads]
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, disabled in zip(switchable, previous):
            module.disabled = disabled
