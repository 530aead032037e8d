"""LayerDrop: skip whole transformer blocks at random while training.

Fan et al., "Reducing Transformer Depth on Demand with Structured Dropout", arXiv:1909.11556.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.config import MethodConfig
from slimtune.core.modules import block_lists, replace_module
from slimtune.core.state import AdapterState
from slimtune.methods.contract import Method


class PassThrough(nn.Module):
    """A skipped block that returns its input hidden states (what a block returning a tensor computes as identity).
    It carries the block's ``attention_type``, which transformers 4's Gemma 2/3 and Qwen loops read off each block."""

    def __init__(self, block: nn.Module, as_tuple: bool = False) -> None:
        super().__init__()
        self.as_tuple = as_tuple  # (transformers 4's blocks return ``(hidden_states,)``)
        if isinstance(getattr(block, "attention_type", None), str):
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if hidden_states is None else hidden_states
        return (hidden,) if self.as_tuple else hidden


def owns_shared_state(block: nn.Module) -> bool:
    """Whether later blocks read something this block computes (T5's first block computes the relative position
    bias every other block adds): such a block is never skipped."""
    return any(getattr(m, "has_relative_attention_bias", False) is True for m in block.modules())


class LayerDropList(nn.ModuleList):
    """A block list that, in training, skips each block with probability ``p``: ``h_{l+1} = h_l`` w.p. ``p``.

    Shares its entries with the list it replaces (same module names and state-dict keys); in eval
    mode, and outside the forward of the module holding it (code that walks the blocks), it is the plain list.
    If every block would be skipped, one random block runs. A skipped block that
    returned the hidden states (or a tuple of them alone, as transformers 4's blocks) when it last ran is replaced by
    a :class:`PassThrough` returning the same, so the list keeps its length and every block its position (Gemma 2/3
    and Qwen pick a block's attention mask by its index in the loop); a block returning more is left out of the list
    (a tensor in its place would be read as a tuple), and a block not seen yet runs. A block whose result later
    blocks read (T5's position bias) always runs. Fan et al., 2019,
    arXiv:1909.11556.
    """

    def __init__(self, layers: nn.ModuleList, p: float, owner: nn.Module) -> None:
        nn.Module.__init__(self)
        self._modules = layers._modules  # the very same entries, so later surgery shows up in both
        self.p = p
        self.disabled = False
        self.in_forward = False  # blocks are dropped only in the forward of the module holding the list
        # id(block) → what its last output was: the hidden states alone ("tensor"), a tuple of them alone ("tuple"), or
        # more ("other")
        self.returned: dict[int, str] = {}
        self.stand_ins: dict[int, PassThrough] = {}  # id(block) → what runs in its place when it is skipped
        self.hooks = [block.register_forward_hook(self._note_output) for block in self._modules.values()]
        self.hooks += [owner.register_forward_pre_hook(self._enter),
                       owner.register_forward_hook(self._leave, always_call=True)]

    def _enter(self, *_: Any) -> None:  # (bound methods: a deepcopy's hooks move its own list, and pickle)
        self.in_forward = True

    def _leave(self, *_: Any) -> None:
        self.in_forward = False

    def _note_output(self, block: nn.Module, args: Any, output: Any) -> None:
        alone = isinstance(output, tuple) and len(output) == 1 and isinstance(output[0], torch.Tensor)
        self.returned[id(block)] = "tensor" if isinstance(output, torch.Tensor) else "tuple" if alone else "other"

    def close(self) -> None:
        """Remove the hooks that watch the blocks' outputs (the list is being taken out of the model)."""
        for hook in self.hooks:
            hook.remove()

    def _kept(self, layers: list[Any]) -> list[Any]:
        if not self.training or self.p == 0 or self.disabled or not self.in_forward:  # (code reading the list: all)
            return layers
        keep = torch.rand(len(layers)) >= self.p
        if layers and not keep.any():  # never skip them all: the loss must still depend on the blocks
            keep[torch.randint(len(layers), ())] = True
        kept = []
        for layer, k in zip(layers, keep.tolist()):
            returned = self.returned.get(id(layer))
            if k or returned is None or owns_shared_state(layer):
                kept.append(layer)
            elif returned != "other":
                as_tuple = returned == "tuple"
                stand_in = self.stand_ins.get(id(layer))
                if stand_in is None or stand_in.as_tuple != as_tuple:
                    stand_in = self.stand_ins[id(layer)] = PassThrough(layer, as_tuple)
                kept.append(stand_in)
        return kept

    def __iter__(self):
        return iter(self._kept(list(self._modules.values())))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.ModuleList(self._kept(list(self._modules.values())[idx]))
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"layerdrop={self.p}"



@dataclass
class LayerDropConfig(MethodConfig):
    """LayerDrop: skip whole transformer blocks with probability ``layerdrop`` while training.

    Adds no parameters and composes with any method: add it beside another adapter with
    :func:`apply_layerdrop` (or ``add_adapter(..., activate=False)``); it acts whether or not it is active,
    in ``model.train()`` mode only. ``layers_pattern`` names the block list if auto-detection fails.
    """

    peft_type: ClassVar[str] = "LAYERDROP"

    layerdrop: float = 0.1
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layerdrop, bool) or not isinstance(self.layerdrop, (int, float)) \
                or not 0.0 <= self.layerdrop < 1.0:
            raise ValueError(f"layerdrop={self.layerdrop!r} must be a probability in [0, 1) (e.g. 0.1); "
                             "1 would skip every layer.")


class LayerDropMethod(Method):
    """Replaces each block list by a :class:`LayerDropList` sharing its entries; the originals are kept in
    the state to be put back."""

    peft_type: ClassVar[str] = "LAYERDROP"
    config_class: ClassVar[type[MethodConfig]] = LayerDropConfig

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        """Raise (before the model is changed) if the model has no block list to drop from, or already drops."""
        assert isinstance(config, LayerDropConfig)
        if any(isinstance(m, LayerDropList) for m in model.modules()):
            raise ValueError("LayerDrop is already applied to this model; remove that adapter before adding another.")
        block_lists(model, config.layers_pattern)

    def add(self, model: nn.Module, config: MethodConfig, adapter_name: str, state: AdapterState) -> None:
        assert isinstance(config, LayerDropConfig)
        replaced = []
        for name in block_lists(model, config.layers_pattern):
            original = model.get_submodule(name)
            assert isinstance(original, nn.ModuleList)
            owner = model.get_submodule(name.rpartition(".")[0])
            replace_module(model, name, LayerDropList(original, config.layerdrop, owner))
            replaced.append((name, original))
        state.data[adapter_name] = replaced

    def set_disabled(self, model: nn.Module, disabled: bool, state: AdapterState) -> None:
        for module in model.modules():
            if isinstance(module, LayerDropList):
                module.disabled = disabled

    def remove(self, model: nn.Module, adapter_name: str, state: AdapterState) -> None:
        for name, original in state.data.pop(adapter_name, []):
            dropping = model.get_submodule(name)
            if isinstance(dropping, LayerDropList):
                dropping.close()
            replace_module(model, name, original)
