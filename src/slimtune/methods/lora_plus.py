"""LoRA trained with LoRA+ learning rates, as a method a recipe can name (``peft_type: LORA_PLUS``).

Hayou et al., arXiv:2402.12354. The adapter is plain LoRA (or DoRA with ``use_dora``) and is saved as
PEFT's ``"LORA"``; only the optimizer's parameter groups differ (:mod:`slimtune.optim.loraplus`).
Recipes can also keep ``peft_type: LORA`` and set ``training.loraplus_lr_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from slimtune.config import LoraConfig, MethodConfig
from slimtune.methods.lora import LoraMethod
from slimtune.optim.loraplus import check_ratio, loraplus_param_groups


@dataclass
class LoraPlusConfig(LoraConfig):
    """LoRA trained with LoRA+ learning rates (``lr_B = loraplus_lr_ratio × lr_A``)."""

    peft_type: ClassVar[str] = "LORA_PLUS"

    loraplus_lr_ratio: float = 16.0
    loraplus_lr_embedding: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.loraplus_lr_ratio)


class LoraPlusMethod(LoraMethod):
    peft_type: ClassVar[str] = "LORA_PLUS"
    config_class: ClassVar[type[MethodConfig]] = LoraPlusConfig

    def param_groups(self, model: nn.Module, config: MethodConfig, lr: float) -> list[dict[str, Any]] | None:
        assert isinstance(config, LoraPlusConfig)
        return loraplus_param_groups(model, lr, config.loraplus_lr_ratio, config.loraplus_lr_embedding)

    def saved_config(self, config: MethodConfig) -> dict[str, Any]:
        data = {k: v for k, v in config.to_dict().items() if not k.startswith("loraplus_")}
        return {**data, "peft_type": "LORA"}
