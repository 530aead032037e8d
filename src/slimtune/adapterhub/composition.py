"""Activating a composition of AdapterHub adapters: ``set_composition(model, Stack("a", "b"))``.

What each block computes is AdapterHub's (:class:`slimtune.adapterhub.layers.HubSite`); this module checks
the block against the model, makes its adapters the active ones and, for ``Parallel``, copies the batch.

- ``Stack("a", "b")``: at every site b takes a's output (both train while active).
- ``Parallel("a", "b")``: ``model(**batch)`` runs the batch once per child in one forward — the inputs
  (``input_ids``, ``attention_mask`` …) are repeated along the batch on entry, so outputs come back with
  ``len(children) × batch`` rows, child i's in rows ``i·B … (i+1)·B``. For plain forward passes (as in
  AdapterHub), not for ``generate``.
- ``Fuse("a", "b")``: the AdapterFusion adapter over a and b (:class:`~slimtune.methods.fusion.AdapterFusionConfig`,
  or :func:`slimtune.adapterhub.load_adapterhub` of a fusion folder) runs; a and b stay frozen.

Any later ``slimtune.set_adapter`` ends the composition. AdapterHub's ``BatchSplit`` is
:func:`slimtune.mixed_batch` (LoRA-family adapters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtune.adapterhub.blocks import Block, Fuse, Parallel, Stack, validate
from slimtune.adapterhub.layers import HubSite
from slimtune.adapterhub.sites import PARALLEL_HOOK
from slimtune.core.state import AdapterState, get_state
from slimtune.lifecycle import set_adapter
from slimtune.methods.bottleneck import BottleneckConfig
from slimtune.methods.contract import tuner_layers
from slimtune.methods.fusion import AdapterFusionConfig

# Keyword inputs with one row per example: what a Parallel composition copies.
BATCHED = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels")


def set_composition(model: nn.Module, block: Block | str) -> None:
    """Run ``block`` (``Stack`` / ``Parallel`` / ``Fuse`` of adapter names) at every AdapterHub site of ``model``."""
    state = get_state(model)
    block = Stack(block) if isinstance(block, str) else block
    if not isinstance(block, Block):
        raise TypeError(f"set_composition takes a Stack, Parallel or Fuse block (or an adapter name), got {block!r}.")
    validate(block)
    resolved = _resolve(block, state)
    set_adapter(model, _active(resolved))
    for _, layer in tuner_layers(model):
        if isinstance(layer, HubSite):
            layer.composition = resolved
    if isinstance(resolved, Parallel) or any(isinstance(c, Parallel) for c in resolved):
        state.shared[PARALLEL_HOOK] = model.register_forward_pre_hook(CopyBatch(resolved.parallel_channels, state),
                                                                      with_kwargs=True)


def get_composition(model: nn.Module) -> Block | None:
    """The composition set with :func:`set_composition` (None after any other activation)."""
    return next((layer.composition for _, layer in tuner_layers(model) if isinstance(layer, HubSite)), None)


def _resolve(block: Block, state: AdapterState) -> Block:
    """``block`` with each ``Fuse`` named after the fusion adapter that implements it; every name checked."""
    children: list[str | Block] = []
    for child in block:
        if isinstance(child, Block):
            children.append(_resolve(child, state))
            continue
        config = state.configs.get(child)
        if not isinstance(config, BottleneckConfig) or config.placement != "adapterhub":
            what = "not an adapter of this model" if config is None else f"a {config.peft_type} adapter" + (
                f" placed {config.placement!r}" if isinstance(config, BottleneckConfig) else "")
            raise ValueError(f"{child!r} is {what}; compositions combine bottleneck adapters with "
                             f"placement='adapterhub' (adapters: {list(state.configs)}).")
        children.append(child)
    if not isinstance(block, Fuse):
        return type(block)(*children)
    fused = [c if isinstance(c, str) else c.last() for c in children]
    fusions = [n for n, c in state.configs.items() if isinstance(c, AdapterFusionConfig) and
               (n == block.name or (c.adapter_names == fused and block.name == c.hub_name))]
    if not fusions:
        raise ValueError(f"{block!r} needs an AdapterFusion adapter over {fused}; add one with slimtune.add_adapter("
                         f"model, AdapterFusionConfig(adapter_names={fused})) or load_adapterhub a fusion folder.")
    return Fuse(*children, name=fusions[0])


def _active(block: Block) -> list[str]:
    """The adapters that train under ``block``: the fusion adapters, and every adapter not inside a Fuse
    (fused adapters stay frozen, as in AdapterHub's ``train_adapter_fusion``)."""
    if isinstance(block, Fuse):
        return [block.name]
    names: list[str] = []
    for child in block:
        names += _active(child) if isinstance(child, Block) else [child]
    return list(dict.fromkeys(names))


class CopyBatch:
    """The model's forward pre-hook under a Parallel composition: every batched input repeated ``channels``
    times along the batch (copy i in rows ``i·B … (i+1)·B``)."""

    def __init__(self, channels: int, state: AdapterState) -> None:
        self.channels, self.state = channels, state

    def _copy(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.repeat(self.channels, *([1] * (value.dim() - 1)))
        return value

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.state.disabled:
            return None
        return (tuple(self._copy(a) for a in args),
                {k: self._copy(v) if k in BATCHED else v for k, v in kwargs.items()})
