"""The recipe's ``quantization:`` section and the one function that applies it to a loaded model.

The section is :class:`slimtune.quant.QuantConfig` itself (same keys: ``bits``, ``quant_type``,
``double_quant``, ``blocksize``, ``compute_dtype``, ``skip_modules``); an absent or null section
means a full-precision base.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimtune.quant import QuantConfig, quant_summary, quantize

QUANT_SECTION_CLASS = QuantConfig


def apply_quantization(model: nn.Module, config: QuantConfig | None) -> str | None:
    """Quantize ``model``'s linear layers in place (QLoRA's frozen base); return a one-line summary."""
    if config is None:
        return None
    quantize(model, config)
    return str(quant_summary(model))


def quant_dict(config: QuantConfig | None) -> dict[str, Any] | None:
    return None if config is None else config.to_dict()
