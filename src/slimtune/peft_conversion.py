"""What PEFT (under transformers 5) does to a LoRA adapter's targets on some mixture-of-experts models, so that
saving an adapter PEFT would load differently says so.

For the model types transformers converts from version 4's one module per expert to fused expert tensors, PEFT
reads every LoRA target named like a version-4 expert projection (``gate_proj``/``up_proj``/``down_proj``, or
Mixtral's ``w1``/``w2``/``w3``) or the router (``gate``) as the fused experts' parameters (``target_parameters``),
whatever module the name stands for: a dense MLP layer or a shared expert with those names is then not adapted,
and an adapter file holding them loads into PEFT without them (PEFT says nothing). slimtune adapts the modules
the names pick, as the names say.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

try:  # transformers 5 (absent in 4, where PEFT converts nothing)
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN
except ImportError:
    _MODEL_TO_CONVERSION_PATTERN = {}

# The names PEFT converts, by the conversion pattern the model type follows (PEFT's _MOE_TARGET_MODULE_MAPPING).
CONVERTED_NAMES = {"mixtral": ("gate", "w1", "w2", "w3"), "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", ""))


def peft_converted_names(model: nn.Module) -> tuple[str, ...]:
    """The last name components PEFT reads as fused experts' parameters on ``model`` (none for most models)."""
    kind = model_type(model)
    pattern = "mixtral" if kind == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(kind)
    return CONVERTED_NAMES.get(pattern, ()) if isinstance(pattern, str) else ()


def warn_if_peft_drops(model: nn.Module, adapter_name: str, wrapped: Sequence[str]) -> None:
    """Warn when PEFT would load the LoRA adapter wrapping the modules ``wrapped`` without some of them."""
    names = peft_converted_names(model)
    dropped = [name for name in wrapped if name.rpartition(".")[2] in names]
    if dropped:
        leaves = sorted({name.rpartition(".")[2] for name in dropped})
        warnings.warn(
            f"adapter {adapter_name!r} adapts {len(dropped)} layers named {leaves} "
            f"(e.g. {dropped[0]}): on a {model_type(model)} model PEFT reads those names as the fused experts' weights "
            "(target_parameters), so PEFT loads this adapter without them, silently, and computes otherwise (or "
            "refuses it, where one of a fused pair such as gate_proj / up_proj is named without the other); "
            "slimtune loads it whole. For an adapter PEFT loads the same, leave those names out of target_modules "
            "(e.g. adapt the attention projections); the experts themselves take LoRA through target_parameters "
            "(e.g. ['experts.gate_up_proj', 'experts.down_proj']).", stacklevel=3)
