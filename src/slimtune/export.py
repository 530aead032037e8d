"""Export a fine-tune as a standard model: merge adapters into (dequantized) base weights.

A 4-bit base cannot absorb ``s · B A`` without re-rounding, so the export path dequantizes first,
merges (each weight rounded once to ``dtype``), and optionally re-quantizes while reporting the error that adds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from slimtune.core.modules import is_dense_linear
from slimtune.lifecycle import merge_and_unload
from slimtune.quant import QuantConfig, QuantizedLinear, dequantize_model, quantize
from slimtune.quant.linear import linear_weight
from slimtune.quant.model import restore_conv1d
from slimtune.quant.state import is_bitsandbytes_quantized


@dataclass
class ExportReport:
    dequantized_layers: int = 0
    # Re-quantization error of the merged weights: mean over layers of ||ΔW||_F / ||W||_F.
    requantized_rel_error: float | None = None
    per_layer_rel_error: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def merge_for_export(model: nn.Module, dtype: torch.dtype = torch.float32, requantize: QuantConfig | None = None,
                     inplace: bool = False) -> tuple[nn.Module, ExportReport]:
    """Merge the active adapters into a full-precision copy of ``model`` and unwrap it.

    Quantized base layers (slimtune's, and bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, which refuse a merge in
    place) are dequantized to ``dtype`` first. With ``requantize``, the merged
    linear layers are quantized again and the relative error that re-rounding adds is reported.
    Returns ``(plain model, report)``; ``model`` itself is untouched unless ``inplace``.
    """
    target = model if inplace else copy.deepcopy(model)
    report = ExportReport(dequantized_layers=sum(isinstance(m, QuantizedLinear) or is_bitsandbytes_quantized(m)
                                                 for m in target.modules()))
    dequantize_model(target, dtype)
    # merged in the wider of each weight's dtype and ``dtype`` (adapters stay in theirs), then rounded once
    for p in target.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.promote_types(p.dtype, dtype))
    merge_and_unload(target)
    for p in target.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    restore_conv1d(target)  # GPT-2's Conv1D layers, dequantized as nn.Linear under their wrappers, (in, out) again
    if requantize is not None:
        merged = {n: linear_weight(m).detach().clone() for n, m in target.named_modules() if is_dense_linear(m)}
        quantize(target, requantize)
        for name, module in target.named_modules():
            if isinstance(module, QuantizedLinear) and name in merged:
                w = merged[name].float()
                err = (module.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30)
                report.per_layer_rel_error[name] = err.item()
        errors = list(report.per_layer_rel_error.values())
        report.requantized_rel_error = sum(errors) / len(errors) if errors else 0.0
    return target, report
