"""How much of a model trains, and how big its adapter is on disk."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtune.adapter_files import serialize_adapter
from slimtune.core.state import find_state
from slimtune.quant.linear import QuantizedLinear


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    total: int
    adapter_bytes: int | None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        size = f" | adapter on disk: {_human(self.adapter_bytes)}" if self.adapter_bytes is not None else ""
        return (f"trainable params: {self.trainable:,} | all params: {self.total:,} | "
                f"trainable: {self.percent:.4f}%{size}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _stored_codes(model: nn.Module) -> set[int]:
    """The parameters that hold a quantized layer's codes and scales (its weight counts by its logical size): a
    4-bit layer's under FSDP, which shards them as parameters; everything but the layer's bias."""
    return {id(p) for m in model.modules() if isinstance(m, QuantizedLinear)
            for name, p in m.named_parameters(recurse=False) if name != "bias"}


def _logical_size(param: nn.Parameter) -> int:
    """How many weights ``param`` holds: a bitsandbytes 4-bit weight (``Params4bit``) packs two per byte of its
    storage; its quantization state knows the shape."""
    if type(param).__name__ != "Params4bit":
        return param.numel()
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel() * 2 * param.element_size()


def trainable_parameters(model: nn.Module, adapter_name: str | None = None) -> TrainableReport:
    """Trainable / total parameter counts (quantized weights counted by their logical size) and the
    size of the active adapter's safetensors file."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    codes = _stored_codes(model)
    total = sum(_logical_size(p) for p in model.parameters() if id(p) not in codes)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    state = find_state(model)
    size = None
    if state is not None and state.configs:
        name = adapter_name or (state.active[0] if state.active else next(iter(state.configs)))
        size = len(serialize_adapter(model, name))
    return TrainableReport(trainable, total, size)
