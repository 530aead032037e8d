"""What every wrapped layer shares: a frozen ``base_layer`` plus adapters stored per adapter name.

A method's layer keeps each adapter's tensors in ``nn.ModuleDict`` / ``nn.ParameterDict`` attributes
keyed by adapter name (``lora_A.default.weight``), exactly like HF PEFT's in-memory layout, so the
on-disk key is the in-memory key with the ``.<adapter>`` segment removed.

Per-layer behaviour that other parts of slimtune need is asked of the layer itself, never decided by
its type: :meth:`TunerLayer.delta_weight` (merging, export), :meth:`TunerLayer.low_rank_factors`
(adapter combination), :meth:`TunerLayer.mixed_batch_factors` (several adapters in one batch) and
:attr:`TunerLayer.fusable` (the fused LoRA autograd path).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from slimtune.core.modules import weight_of
from slimtune.errors import NotMergeableError
from slimtune.quant.state import is_bitsandbytes_quantized


class TunerLayer(nn.Module):
    """Base of wrapped layers. Subclasses set ``adapter_attrs`` and implement ``add_adapter``/``forward``."""

    # Attribute names of the per-adapter containers (ModuleDict / ParameterDict).
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    # Containers holding plain Python values or non-saved modules (scaling factors, dropout …).
    adapter_values: ClassVar[tuple[str, ...]] = ()
    # Whether slimtune.perf.fused_lora may replace this layer's forward (only LoRA's own equation).
    fusable: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: some models read it from the layer they own (T5's ``wo``)."""
        return weight_of(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_attrs[0])
        return list(first.keys())

    def add_adapter(self, adapter_name: str, config: Any, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into {type(self).__name__}; unmerge it first.")
        for attr in self.adapter_attrs + self.adapter_values:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_active(self, adapter_names: list[str]) -> None:
        """Activate these adapters (those this layer holds); trainability follows activity."""
        self.active_adapters = [a for a in adapter_names if a in self.adapter_names]
        for name in self.adapter_names:
            for attr in self.adapter_attrs:
                container = getattr(self, attr)
                if name in container:
                    container[name].requires_grad_(name in self.active_adapters)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's live tensors under PEFT's relative key names (adapter-name segment removed)."""
        out = {}
        for key, tensor in self.state_dict(keep_vars=True).items():
            parts = key.split(".")
            if parts[0] in self.adapter_attrs and len(parts) > 1 and parts[1] == adapter_name:
                out[".".join([parts[0], *parts[2:]])] = tensor
        return out

    def adapter_device(self) -> torch.device:
        """Where new adapter tensors go: the device of the base layer's tensors."""
        for tensor in list(self.base_layer.parameters()) + list(self.base_layer.buffers()):
            return tensor.device
        return torch.device("cpu")

    # ---- what other parts ask of a layer ---------------------------------------------------------
    def low_rank_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A (r, in), B (out, r))`` with the adapter's whole change ``ΔW = B A`` (scaling folded into B),
        or None when the change is not such a product (methods that rescale, gate or normalise)."""
        return None

    def mixed_batch_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B, g)``: the adapter turns ``W x`` into ``g ⊙ (W x + B A x)`` (g None: 1), for routing
        each row of a batch to its own adapter. Methods whose layers cannot say so raise."""
        factors = self.low_rank_factors(adapter_name)
        if factors is None:
            raise ValueError(f"{type(self).__name__} adapters cannot be routed per row of a mixed batch; run "
                             f"adapter {adapter_name!r} in its own batch.")
        return factors[0], factors[1], None

    # ---- merging --------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's change to ``base_layer.weight``, in the weight's layout. Methods override."""
        raise NotMergeableError(f"{type(self).__name__} adapters cannot be merged into the base weight.")

    def check_mergeable(self) -> None:
        """Raise :class:`NotMergeableError` if no merge can fold this layer's adapters into its base (asked of every
        layer before a merge changes any)."""
        mergeable_weight(self.base_layer)

    @property
    def merge_calls(self) -> list[list[str]]:
        """The merged adapters grouped by the :meth:`merge` calls that folded them in: merging them back call by
        call rebuilds the same weight (one call's adapters may depend on each other, as DoRA's do)."""
        return [[name] for name in self.merged_adapters]

    def to_merge(self, adapter_names: list[str] | None) -> list[str]:
        """The adapters a merge call folds in: the named ones (None: the active ones; an empty list: none)
        that are not merged yet."""
        names = self.active_adapters if adapter_names is None else adapter_names
        return [a for a in names if a not in self.merged_adapters]

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold ``adapter_names`` (None: the active adapters) into the base weight. The new weight is built on a
        copy and checked first: if it is not finite, :class:`NonFiniteMergeError` names the adapter and the layer
        is left as it was."""
        self._merge(self.to_merge(adapter_names), check_only=False)

    def check_merge(self, adapter_names: list[str]) -> None:
        """Build and check what :meth:`merge` would write (raising as it would), changing nothing."""
        self._merge(self.to_merge(adapter_names), check_only=True)

    def _merge(self, names: list[str], check_only: bool) -> None:
        if not names:
            return
        weight = mergeable_weight(self.base_layer)
        with torch.no_grad():
            merged = widened_copy(weight)  # W' = W + Σ ΔW rounded once to W's dtype, as PEFT's merge rounds
            for name in names:
                merged.add_(self.delta_weight(name))
                check_finite_merge(merged, name)
            merged = merged.to(weight.dtype)
            check_finite_merge(merged, names[-1])  # (a cast to a narrower dtype can overflow)
            if check_only:
                return
            weight.copy_(merged)
        self.merged_adapters += names

    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        weight = mergeable_weight(self.base_layer)
        with torch.no_grad():
            restored = widened_copy(weight)
            while self.merged_adapters:
                restored.sub_(self.delta_weight(self.merged_adapters.pop()))
            weight.copy_(restored)

    def unmerged_active(self) -> list[str]:
        """Adapters whose contribution the forward must still add (active and not folded into W)."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]


class NonFiniteMergeError(ValueError):
    """Merging an adapter would put inf/NaN into a base weight (a diverged adapter); nothing was changed."""

    def __init__(self, adapter_name: str, layer_name: str | None = None) -> None:
        self.adapter_name, self.layer_name = adapter_name, layer_name
        where = f" into {layer_name}" if layer_name else ""
        super().__init__(f"merging adapter {adapter_name!r}{where} gives inf/NaN weights: the adapter seems to be "
                         "broken (diverged in training, or a damaged file). The base weights were left as they were; "
                         "check the adapter's tensors (torch.isfinite) before merging it.")


def widened_copy(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` in at least fp32, to add adapter terms to before one rounding back to its dtype."""
    return weight.detach().to(torch.promote_types(weight.dtype, torch.float32), copy=True)


def check_finite_merge(merged: torch.Tensor, adapter_name: str) -> None:
    """Raise :class:`NonFiniteMergeError` if a merged weight (built on a copy) holds inf or NaN."""
    if not bool(torch.isfinite(merged).all()):
        raise NonFiniteMergeError(adapter_name)


def mergeable_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight, to merge into in place; refused for a quantized one (slimtune's, or bitsandbytes',
    whose packed bytes may sit in a float ``quant_storage`` tensor): re-rounding it there is what
    ``merge_for_export`` does openly, with ``requantize``."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or is_bitsandbytes_quantized(base):
        raise NotMergeableError(
            f"cannot merge into a {type(base).__module__}.{type(base).__name__} in place: its weight is quantized "
            "(merging would re-round it to the quantized grid). Merge into a full-precision copy with "
            "slimtune.export.merge_for_export(model), and pass requantize=slimtune.quant.QuantConfig(...) to quantize "
            "the merged model again (PEFT's merge into bitsandbytes layers dequantizes, adds and requantizes likewise)."
        )
    reset = getattr(getattr(base, "state", None), "reset_grads", None)
    if callable(reset):  # a bitsandbytes 8-bit layer keeping 16-bit weights caches their int8 codes for its forward:
        reset()  # dropped, so that the next forward codes the weight written now (as PEFT's merge does)
    return weight


class ModulesToSave(nn.Module):
    """A fully trainable copy of a module (e.g. a classification head) per adapter, saved whole.

    The frozen original stays in ``original_module``; the active copy runs in its place.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, adapter_name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        copied.requires_grad_(True)
        self.modules_to_save[adapter_name] = copied
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_active(self, adapter_names: list[str]) -> None:
        held = [a for a in adapter_names if a in self.modules_to_save]
        self.active_adapter = held[0] if held else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Callers (e.g. transformers' heads) read attributes like ``weight`` or ``out_features``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.original_module, name)
