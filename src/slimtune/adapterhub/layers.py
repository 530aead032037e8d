"""An AdapterHub adapter site on slimtune's own layers: where AdapterHub adapts a sub-layer's output, with
its composition (Stack, Parallel, Fuse) computed as AdapterHub computes it.

A :class:`HubSite` wraps the module whose output AdapterHub adapts:

- ``post_norm`` (BERT family): the sub-layer's output module (``BertSelfOutput`` / ``BertOutput``:
  dense → dropout → ``LayerNorm(x + input)``); the site runs dense and dropout, then the adapters, which
  decide where the residual and the model's LayerNorm go (``original_ln_before`` / ``_after``);
- ``pre_norm`` (GPT-2, Llama family): the attention or MLP module, whose output the block then adds to its
  residual ``r``. ``r`` (the input of the norm before the sub-layer) is captured by a forward pre-hook on that
  norm (:mod:`slimtune.adapterhub.sites`); the site returns what, added to ``r``, is AdapterHub's output.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import torch
from torch import nn

from slimtune.adapterhub.blocks import Block, Fuse, Parallel, Stack
from slimtune.adapterhub.modules import AdapterOptions, BottleneckAdapter, FusionLayer, FusionOptions
from slimtune.errors import NotMergeableError
from slimtune.methods.layers import TunerLayer

KINDS = ("post_norm", "pre_norm")
LOCATIONS = ("mh_adapter", "output_adapter")  # after attention / after the feed-forward block (AdapterHub's keys)


class SiteState(NamedTuple):
    """What flows through a composition at one site (AdapterHub's ``BottleneckState``)."""

    hidden: torch.Tensor  # (batch, seq, d) the current hidden states
    r: torch.Tensor  # (batch, seq, d) the sub-layer's input (the block's residual)
    residual: torch.Tensor  # (batch, seq, d) the residual around the adapter
    norm: nn.Module | None  # the model's LayerNorm at this site (post-norm models)
    up: torch.Tensor | None = None  # the last adapter's scaled up-projection (what fusion attends over)
    last: str | None = None  # the last adapter applied


class HubSite(TunerLayer):
    """Adapters (``adapters``) and AdapterFusion layers (``adapter_fusion_layer``) at one AdapterHub site."""

    adapter_attrs = ("adapters", "adapter_fusion_layer")

    def __init__(self, base_layer: nn.Module, kind: str, location: str, index: int) -> None:
        super().__init__(base_layer)
        if kind not in KINDS or location not in LOCATIONS:
            raise ValueError(f"unknown site kind {kind!r} or location {location!r}")
        self.kind, self.location, self.index = kind, location, index
        self.adapters = nn.ModuleDict()
        self.adapter_fusion_layer = nn.ModuleDict()
        self.fused: dict[str, list[str]] = {}  # fusion adapter name → the adapters it fuses, in order
        self.composition: Block | None = None  # set by slimtune.adapterhub.set_composition
        self.residual: torch.Tensor | None = None  # pre_norm: r of the current forward (see the module docstring)
        self.train(base_layer.training)  # new modules follow the model's mode (dropout off in eval)

    # ---- adapters -------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys()) + list(self.adapter_fusion_layer.keys())

    def add_bottleneck(self, adapter_name: str, d: int, m: int, options: AdapterOptions) -> None:
        adapter = BottleneckAdapter(d, m, options, device=self.adapter_device())
        self.adapters[adapter_name] = adapter.train(self.training)
        self.active_adapters.append(adapter_name)

    def add_fusion(self, adapter_name: str, fused: list[str], d: int, options: FusionOptions, dropout: float) -> None:
        fusion = FusionLayer(d, options, dropout, device=self.adapter_device())
        self.adapter_fusion_layer[adapter_name] = fusion.train(self.training)
        self.fused[adapter_name] = list(fused)
        self.active_adapters.append(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.fused.pop(adapter_name, None)
        if self.composition is not None and adapter_name in self.composition.flatten():
            self.composition = None

    def set_active(self, adapter_names: list[str]) -> None:
        super().set_active(adapter_names)
        self.composition = None  # a new active set replaces any composition

    def merge(self, adapter_names: list[str] | None = None) -> None:
        if adapter_names or self.active_adapters:
            self.check_mergeable()

    def check_mergeable(self) -> None:
        raise NotMergeableError("bottleneck adapters cannot be merged into the base weights: the non-linearity "
                                "between W_down and W_up makes them non-linear in h.")

    def setup(self) -> Block | None:
        """The composition this site runs: the one set, else the active adapters stacked (a fusion adapter
        standing for ``Fuse`` over its adapters); None when nothing here applies (AdapterHub's rule)."""
        if self.disabled:
            return None
        block = self.composition
        if block is None:
            items: list[str | Block] = [Fuse(*self.fused[n], name=n) if n in self.fused else n
                                        for n in self.active_adapters]
            block = Stack(*items) if items else None
        if block is None or not block.flatten() & set(self.adapters.keys()):
            return None
        return block

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        setup = self.setup()
        if self.kind == "post_norm":
            if setup is None:
                return self.base_layer(*args, **kwargs)
            hidden, r = _post_norm_inputs(args, kwargs)
            base = self.base_layer  # dense → dropout, then the adapters; the LayerNorm is theirs to place
            h = cast(nn.Module, base.dropout)(cast(nn.Module, base.dense)(hidden))
            return self._run(setup, h, r, cast(nn.Module, base.LayerNorm), residual_outside=False)
        residual, self.residual = self.residual, None
        out = self.base_layer(*args, **kwargs)
        if setup is None:
            return out
        if residual is None:
            raise RuntimeError(f"AdapterHub site (layer {self.index}, {self.location}) got no residual: the norm "
                               "before this sub-layer did not run, so its forward pre-hook is missing.")
        h = out[0] if isinstance(out, tuple) else out
        y = self._run(setup, h, residual, None, residual_outside=True)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def _run(self, setup: Block, h: torch.Tensor, r: torch.Tensor, norm: nn.Module | None,
             residual_outside: bool) -> torch.Tensor:
        """AdapterHub's ``bottleneck_layer_forward``: compose, then the last adapter's residual and norm."""
        state = self._compose(setup, SiteState(h, r, r, norm), 0)
        if state.last is None:
            return h if residual_outside else (norm(h + r) if norm is not None else h + r)
        adapter = self.adapters[state.last]
        assert isinstance(adapter, BottleneckAdapter)
        return adapter.post_forward(state.hidden, h, state.r, norm, residual_outside)

    # ---- composition (AdapterHub's compose_stack / compose_fuse / compose_parallel) -------------------------
    def _compose(self, block: Block, state: SiteState, level: int) -> SiteState:
        if isinstance(block, Fuse):
            return self._fuse(block, state, level)
        if isinstance(block, Parallel):
            return self._parallel(block, state, level)
        for child in block:  # Stack
            if isinstance(child, Block):
                state = self._compose(child, state, level + 1)
            elif child in self.adapters:
                state = self._single(child, self._pre(child, state))
        return state

    def _adapter(self, name: str) -> BottleneckAdapter:
        adapter = self.adapters[name]
        assert isinstance(adapter, BottleneckAdapter)
        return adapter

    def _pre(self, setup: str | Block, state: SiteState) -> SiteState:
        first = setup if isinstance(setup, str) else setup.first()
        if first not in self.adapters:
            return state
        x, _, residual = self._adapter(first).pre_forward(state.hidden, state.r, state.norm)
        return state._replace(hidden=x, residual=residual)

    def _single(self, name: str, state: SiteState) -> SiteState:
        out, up = self._adapter(name)(state.hidden, state.residual)
        return state._replace(hidden=out, up=up, last=name)

    def _fuse(self, block: Fuse, state: SiteState, level: int) -> SiteState:
        fusion = self.adapter_fusion_layer[block.name]
        assert isinstance(fusion, FusionLayer)
        last = block.last()
        if last not in self.adapters:
            return state
        x, query, residual = self._adapter(last).pre_forward(state.hidden, state.r, state.norm,
                                                             fusion.options.query_before_ln)
        state = state._replace(hidden=x, residual=residual)
        ups: list[torch.Tensor | None] = []
        for child in block:
            if isinstance(child, Block):
                ups.append(self._compose(child, state, level + 1).up)
            elif child in self.adapters:
                ups.append(self._single(child, state).up)
        stacked = torch.stack([u for u in ups if u is not None], dim=2)  # (batch, seq, n, d)
        hidden = fusion(query.to(stacked.dtype), stacked, state.residual.to(stacked.dtype)).to(x.dtype)
        return state._replace(hidden=hidden, last=last)

    def _parallel(self, block: Parallel, state: SiteState, level: int) -> SiteState:
        channels, rows = len(block), state.hidden.shape[0]
        if rows % channels:
            raise ValueError(f"a Parallel block of {channels} adapters needs a batch that holds {channels} copies "
                             f"of the input; got {rows} rows (use slimtune.adapterhub.set_composition, which "
                             "copies the input).")
        size = rows // channels
        state = self._pre(block, state)
        parts = []
        for i, child in enumerate(block):
            rows_i = slice(i * size, (i + 1) * size)
            part = SiteState(state.hidden[rows_i], state.r[rows_i], state.residual[rows_i], state.norm,
                             None if state.up is None else state.up[rows_i], state.last)
            if isinstance(child, Block):
                part = self._compose(child, part, level + 1)
            elif child in self.adapters:
                part = self._single(child, part)
            parts.append(part)
        ups = [p.up for p in parts]
        return SiteState(torch.cat([p.hidden for p in parts]), torch.cat([p.r for p in parts]),
                         torch.cat([p.residual for p in parts]), state.norm,
                         torch.cat([u for u in ups if u is not None]) if all(u is not None for u in ups) else None,
                         parts[-1].last)

    def extra_repr(self) -> str:
        sizes = {n: a.adapter_up.in_features for n, a in self.adapters.items() if isinstance(a, BottleneckAdapter)}
        return f"{self.kind}, layer={self.index}, {self.location}, bottleneck={sizes}, fusion={self.fused}"


def _post_norm_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states, input_tensor)`` of a BERT-style output module, however they were passed."""
    values = list(args) + [kwargs[k] for k in ("hidden_states", "input_tensor") if k in kwargs]
    if len(values) != 2:
        raise TypeError(f"a BERT-style output module takes (hidden_states, input_tensor); got {len(args)} positional "
                        f"and {sorted(kwargs)} keyword arguments.")
    return values[0], values[1]
