"""How rows of a batch are routed to their own adapters: the engine of :func:`slimtune.mixed_batch` and
:class:`slimtune.serving.Decoder`.

Each wrapped layer's factors are read once and stacked over the adapters in play,
``Aᵀ = [A₁; A₂ …]ᵀ`` (in, R) and ``Bᵀ = [s₁B₁, s₂B₂ …]ᵀ`` (R, out) with ``R = Σ rₖ`` (what a layer
contributes per row it says itself: :meth:`TunerLayer.mixed_batch_factors`). A batch's route keeps the
blocks of the adapters its rows use and a row mask ``M`` (rows, R), 1 on each row's own block::

    y = W x + ((x Aᵀ) ⊙ M) Bᵀ              three launches per layer, whatever the number of adapters
    y = g ⊙ (W x + (x Aᵀ ⊙ M) Bᵀ) + b      DoRA rows (g = m / ‖W + sBA‖; 1 on other rows)

When every row uses the same adapters the mask goes (two launches). Long inputs (a prefill) whose rows
run one adapter each gather each row's own factors instead, zero-padded to the largest rank, and run
two batched matmuls: r FLOPs per token rather than R. A route is installed as the
wrapper's ``forward`` (an instance attribute, taken back on exit); a wrapper none of whose adapters a row
uses runs its base layer's ``forward`` directly, so no wrapper code is in the path.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from slimtune.core.state import AdapterState, get_state
from slimtune.methods import method_for
from slimtune.methods.contract import tuner_layers
from slimtune.methods.layers import ModulesToSave, TunerLayer
from slimtune.methods.prompts import PromptLearningMethod
from slimtune.methods.sparse import TrainedInPlace

BASE = "__base__"  # PEFT's row name for "no adapter"; None works too

Rows = Sequence[tuple[str, ...]]  # each row's adapters (several are summed; none: the base model)
BaseCall = Callable[..., torch.Tensor]


def row_names(adapter_names: Sequence[str | None]) -> list[tuple[str, ...]]:
    """One adapter set per row from user row names (``None`` / ``"__base__"``: the base model)."""
    return [() if n in (None, BASE) else (str(n),) for n in adapter_names]


def repeat_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-row data for a batch, following generate's in-place row repetition (beams, num_return_sequences)."""
    if batch % t.shape[0]:
        raise ValueError(f"mixed_batch got {t.shape[0]} adapter names but the model received a batch of {batch} "
                         "rows; give one adapter name per row.")
    return t if batch == t.shape[0] else t.repeat_interleave(batch // t.shape[0], dim=0)


class Layout:
    """Where each row's adapters sit in a route's stacked factors (shared by the layers of one stacking)."""

    def __init__(self, rows: Rows, widths: dict[str, int], device: torch.device, dtype: torch.dtype) -> None:
        self.used = [n for n in widths if any(n in row for row in rows)]  # in stacking order
        self.offsets, start = {}, 0
        for name in self.used:
            self.offsets[name], start = (start, start + widths[name]), start + widths[name]
        self.same = all(set(row) == set(self.used) for row in rows)  # no mask needed
        self.mask = None
        if not self.same:
            mask = torch.zeros(len(rows), 1, start)
            for i, row in enumerate(rows):
                for name in row:
                    mask[i, 0, self.offsets[name][0]: self.offsets[name][1]] = 1
            self.mask = mask.to(device, dtype)
        # Rows with at most one adapter each can run as per-row factors (long inputs: r FLOPs, not R):
        # slot k + 1 is the layer's k-th adapter (LayerFactors.padded), 0 none.
        single = all(len(row) <= 1 for row in rows)
        order = list(widths)
        self.slots = torch.tensor([order.index(row[0]) + 1 if row else 0 for row in rows],
                                  device=device) if single and not self.same else None


class Route:
    """What one layer adds for one batch: ``((x Aᵀ) ⊙ mask) Bᵀ``, then DoRA's per-row gain."""

    def __init__(self, factors: LayerFactors, At: torch.Tensor, Bt: torch.Tensor, layout: Layout,
                 gain: torch.Tensor | None) -> None:
        self.factors, self.At, self.Bt, self.layout = factors, At, Bt, layout  # (in, R), (R, out)
        self.bias = factors.layer.bias
        self.gain = gain  # (rows, 1, out), (1, 1, out) or None
        self.batch = 0  # the per-row data below is for this batch size
        self.mask: torch.Tensor | None = None
        self.row_gain: torch.Tensor | None = None
        self.for_batch(layout.mask.shape[0] if layout.mask is not None else 1)

    def for_batch(self, batch: int) -> None:
        """Expand the per-row data to a batch of ``batch`` rows (generate may repeat each row in place)."""
        mask, gain = self.layout.mask, self.gain
        self.mask = None if mask is None else repeat_rows(mask, batch)
        self.row_gain = gain if gain is None or gain.shape[0] == 1 else repeat_rows(gain, batch)
        self.batch = batch

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the base layer's output for ``x``) plus every row's adapter."""
        batch, rank, out_f = x.shape[0], self.At.shape[1], out.shape[-1]
        if batch != self.batch:
            self.for_batch(batch)
        mask, gain = self.mask, self.row_gain
        fused = gain is None and out.dtype == self.Bt.dtype  # the product is added by the matmul itself
        if mask is not None and x.numel() > batch * x.shape[-1] and self.layout.slots is not None:
            # A long input (prefill): each row only its own factors, gathered (zero-padded ranks): two bmm.
            A, B = self.factors.padded()
            slots = repeat_rows(self.layout.slots, batch)
            h = torch.bmm(x.reshape(batch, -1, x.shape[-1]).to(A.dtype), A[slots])  # (rows, seq, r)
            if fused:
                return torch.baddbmm(out.reshape(batch, -1, out_f), h, B[slots]).view(out.shape)
            delta = torch.bmm(h, B[slots]).view(-1, out_f)
        else:
            h = x.reshape(-1, x.shape[-1]).to(self.At.dtype).mm(self.At)  # (rows·seq, R)
            if mask is not None:
                h = (h.view(batch, -1, rank) * mask).view(-1, rank)
            if fused:
                return torch.addmm(out.reshape(-1, out_f), h, self.Bt).view(out.shape)
            delta = h.mm(self.Bt)
        flat = out.reshape(-1, out_f)
        if gain is None:
            return (flat + delta.to(flat.dtype)).view(out.shape)
        wx = (flat if self.bias is None else flat - self.bias).to(delta.dtype)  # W x
        y = (wx + delta).view(batch, -1, out_f) * gain
        y = y if self.bias is None else y + self.bias
        return y.to(out.dtype).view(out.shape)


class RoutedForward:
    """A wrapper's ``forward`` while a route is installed: its base layer, then the route."""

    def __init__(self, base: BaseCall, route: Route) -> None:
        self.base, self.route = base, route

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.route.add_to(x, self.base(x, *args, **kwargs))


class LayerFactors:
    """One wrapped layer's factors for a list of adapters, read once and stacked (see the module docstring).

    ``dtype``: the dtype to keep them in (default: their own). Adapters whose layer cannot give per-row
    factors are remembered with the reason, raised when a row asks for them.
    """

    @torch.no_grad()
    def __init__(self, layer: TunerLayer, module_name: str, names: Sequence[str],
                 dtype: torch.dtype | None = None) -> None:
        self.layer = layer
        self.widths: dict[str, int] = {}  # adapter -> rank, in stacking order
        self.unroutable: dict[str, str] = {}
        self.gains: dict[str, torch.Tensor] = {}
        As, Bs = [], []
        for name in [n for n in names if n in layer.adapter_names]:
            try:
                A, B, g = layer.mixed_batch_factors(name)
            except ValueError as error:
                self.unroutable[name] = f"{module_name}: {error}"
                continue
            As.append(A.detach().to(dtype or A.dtype))
            Bs.append(B.detach().to(dtype or A.dtype))
            self.widths[name] = A.shape[0]
            if g is not None:
                self.gains[name] = g.detach().to(dtype or A.dtype)
        self.At = torch.cat(As).T.contiguous() if As else None  # (in, R)
        self.Bt = torch.cat(Bs, dim=1).T.contiguous() if Bs else None  # (R, out)
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors one slot per adapter, zero-padded to the largest rank (slot 0: none):
        A (n + 1, in, r), B (n + 1, r, out). Made on first use, kept."""
        if self._padded is None:
            assert self.At is not None and self.Bt is not None  # routes exist only for routable adapters
            r_max = max(self.widths.values())
            A = self.At.new_zeros(len(self.widths) + 1, self.At.shape[0], r_max)
            B = self.Bt.new_zeros(len(self.widths) + 1, r_max, self.Bt.shape[1])
            start = 0
            for k, width in enumerate(self.widths.values(), 1):
                A[k, :, :width], B[k, :width] = self.At[:, start: start + width], self.Bt[start: start + width]
                start += width
            self._padded = (A, B)
        return self._padded

    def holds(self, name: str) -> bool:
        return name in self.widths or name in self.unroutable

    def route(self, rows: Rows, layouts: dict[Any, Layout] | None = None) -> Route | None:
        """The route of a batch whose row i runs ``rows[i]``; None when no row uses this layer's adapters.
        ``layouts``: a memo shared by the layers of one call (most layers stack the same ranks)."""
        mine = [tuple(n for n in row if self.holds(n)) for row in rows]
        if not any(mine):
            return None
        for name in dict.fromkeys(n for row in mine for n in row):
            if name in self.unroutable:
                raise ValueError(self.unroutable[name])
        if any(len(row) > 1 and any(n in self.gains for n in row) for row in mine):
            raise ValueError(f"a row combines a DoRA adapter with others ({[r for r in mine if len(r) > 1][0]}); "
                             "DoRA rows run one adapter at a time.")
        assert self.At is not None and self.Bt is not None  # some adapter is routable
        key = (tuple(self.widths.items()), tuple(mine), self.At.device, self.At.dtype)
        layout = None if layouts is None else layouts.get(key)
        if layout is None:
            layout = Layout(mine, self.widths, self.At.device, self.At.dtype)
            if layouts is not None:
                layouts[key] = layout
        At, Bt = self.At, self.Bt
        if len(layout.used) < len(self.widths):  # only the blocks the rows use
            starts = dict(zip(self.widths, itertools.accumulate(self.widths.values(), initial=0)))
            cols = torch.cat([torch.arange(starts[n], starts[n] + self.widths[n]) for n in layout.used])
            cols = cols.to(At.device)
            At, Bt = At.index_select(1, cols), Bt.index_select(0, cols)
        return Route(self, At, Bt, layout, self._gain(mine, layout))

    def _gain(self, rows: Rows, layout: Layout) -> torch.Tensor | None:
        if not any(row and row[0] in self.gains for row in rows):
            return None
        if layout.same:
            return self.gains[rows[0][0]].view(1, 1, -1)
        assert self.Bt is not None
        gain = self.Bt.new_ones(len(rows), 1, self.Bt.shape[1])
        for i, row in enumerate(rows):
            if row and row[0] in self.gains:
                gain[i, 0] = self.gains[row[0]]
        return gain


def set_forward(module: nn.Module, forward: Callable[..., Any], undo: list[Callable[[], None]]) -> None:
    """Give ``module`` an instance ``forward`` (its ``__call__`` runs it), recording how to take it back."""
    previous = module.__dict__.get("forward")

    def restore() -> None:
        if previous is None:
            del module.forward
        else:
            module.forward = previous

    module.forward = forward
    undo.append(restore)


def undo_all(undo: list[Callable[[], None]]) -> None:
    while undo:
        undo.pop()()


class _RowHeads:
    """Forward hook of a ``modules_to_save`` wrapper: each row through its adapter's copy (few adapters: a loop)."""

    def __init__(self, names: list[str], index: torch.Tensor, state: AdapterState | None) -> None:
        self.names, self.index, self.state = names, index, state

    def __call__(self, module: ModulesToSave, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if not module.disabled:  # (disable_adapters entered and left inside the block re-enabled the wrapper)
            output = module.original_module(*args, **kwargs)
        if self.state is not None and self.state.disabled:  # disable_adapters inside the block: the base alone
            return output
        x = args[0] if args else next(iter(kwargs.values()))
        idx = repeat_rows(self.index, x.shape[0]).to(x.device)
        output = output.clone()
        for k, name in enumerate(self.names, 1):
            rows = (idx == k).nonzero().squeeze(1)
            if rows.numel() and name in module.modules_to_save:
                output[rows] = module.modules_to_save[name](x[rows]).to(output.dtype)
        return output


def check_rows(model: nn.Module, used: list[str], layers: Sequence[tuple[str, TunerLayer]] | None = None) -> None:
    """Refuse adapters a mixed batch cannot separate by row, and merged models (``layers``: the model's
    wrapped layers, if known)."""
    state = get_state(model)
    state.check_known(used)
    biased = {name: bias for name, config in state.configs.items()
              if (bias := getattr(config, "bias", "none")) not in (None, "none")}
    if biased:  # PEFT keeps trained biases in the base layers' own bias too: every row would get the last loaded
        name, bias = next(iter(sorted(biased.items())))
        raise ValueError(f"adapter {name!r} trains biases (bias={bias!r}), which live in "
                         "the base layers' own bias, shared by every row of a batch: a mixed batch cannot give each "
                         "row its own. Serve it on its own model (load_adapter into a fresh copy), or merge it.")
    for name in used:
        if method_for(state.configs[name]).changes_base_weights:
            raise ValueError(f"adapter {name!r} ({state.configs[name].peft_type}) changed the base weights themselves, "
                             "which a mixed batch cannot undo per row. Run it on its own model copy.")
    in_weights = [n for n, data in state.data.items() if isinstance(data, TrainedInPlace) and not data.swapped_out]
    if in_weights:  # an active or merged sparse adapter: its trained values are every row's weights
        raise ValueError(f"adapter {in_weights[0]!r} ({state.configs[in_weights[0]].peft_type}) has its trained "
                         "values in the base weights (it is active or merged), so every row would run it; activate "
                         "other adapters (slimtune.set_adapter) or unmerge it first.")
    prompts = [n for n in dict.fromkeys([*used, *state.active])
               if isinstance(method_for(state.configs[n]), PromptLearningMethod)]
    if prompts:  # virtual tokens are put before every row of a batch
        raise ValueError(f"adapter(s) {prompts} are prompt-learning adapters, which change every row's inputs: a mixed "
                         "batch cannot give each row its own. Serve them with model.generate on their own.")
    merged = [n for n, layer in (tuner_layers(model) if layers is None else layers) if layer.merged_adapters]
    if merged:
        raise ValueError(f"{merged[0]} has merged adapters; mixed batches need unmerged ones: "
                         "slimtune.unmerge_adapter(model).")


@contextlib.contextmanager
def route_heads(heads: Sequence[ModulesToSave], rows: Rows, used: list[str],
                state: AdapterState | None = None) -> Iterator[None]:
    """Each row through its own adapter's head copy (``modules_to_save``), if the model has any."""
    index = torch.tensor([used.index(row[0]) + 1 if row else 0 for row in rows])
    previous = [m.disabled for m in heads]
    handles: list[RemovableHandle] = []
    try:
        for module in heads:
            module.disabled = True
            handles.append(module.register_forward_hook(_RowHeads(used, index, state), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, disabled in zip(heads, previous):
            module.disabled = disabled
