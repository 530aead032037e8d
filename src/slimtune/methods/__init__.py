"""The PEFT methods, one module each, and the registry: each method is registered exactly once, here.

To add a method: write its module (a :class:`~slimtune.methods.contract.Method`, usually a
:class:`~slimtune.methods.contract.LayerMethod`, with its config class) and list it below.
"""

from __future__ import annotations

from typing import Any

from slimtune.config import MethodConfig
from slimtune.methods.bottleneck import BottleneckMethod
from slimtune.methods.contract import LayerMethod, Method, Registry
from slimtune.methods.delta_lora import DeltaLoraMethod
from slimtune.methods.fusion import FusionMethod
from slimtune.methods.ia3 import IA3Method
from slimtune.methods.layerdrop import LayerDropMethod
from slimtune.methods.loha import LohaMethod
from slimtune.methods.lokr import LokrMethod
from slimtune.methods.lora import LoraMethod
from slimtune.methods.lora_fa import LoraFAMethod
from slimtune.methods.lora_plus import LoraPlusMethod
from slimtune.methods.prefix import PrefixTuningMethod
from slimtune.methods.prompt_tuning import PromptTuningMethod, PTuningMethod
from slimtune.methods.sparse import BitFitMethod, SelectiveMethod
from slimtune.methods.vera import VeraMethod

REGISTRY = Registry([
    LoraMethod,
    LoraFAMethod,
    DeltaLoraMethod,
    LoraPlusMethod,
    VeraMethod,
    LohaMethod,
    LokrMethod,
    IA3Method,
    BottleneckMethod,
    FusionMethod,
    PromptTuningMethod,
    PTuningMethod,
    PrefixTuningMethod,
    BitFitMethod,
    SelectiveMethod,
    LayerDropMethod,
])


def method_for(config: MethodConfig) -> Method:
    """The registered method of a config (by its ``peft_type``)."""
    return REGISTRY.for_config(config)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Read any registered method's config from its dict (``peft_type`` picks the class)."""
    return REGISTRY.config_from_dict(data)


def config_classes() -> dict[str, type[MethodConfig]]:
    """Every registered method's config class by ``peft_type``."""
    return REGISTRY.config_classes()


__all__ = ["REGISTRY", "LayerMethod", "Method", "config_classes", "config_from_dict", "method_for"]
