"""The checks of a recipe that span its sections (a key valid alone, refused beside another), with what to change."""

from __future__ import annotations

from typing import Any

from slimtune.config import MethodConfig
from slimtune.methods import method_for
from slimtune.methods.contract import Method
from slimtune.methods.prompts import PromptLearningConfig
from slimtune.quant import QuantConfig
from slimtune.train.schema import RecipeError


def method_sets_param_groups(config: MethodConfig) -> bool:
    """Whether the method defines the optimizer's parameter groups itself (LoRA+ as a method)."""
    return type(method_for(config)).param_groups is not Method.param_groups


def check_combinations(method: MethodConfig, quantization: QuantConfig | None, distributed: Any,
                       sections: dict[str, Any]) -> None:
    """Raise :class:`RecipeError` for a combination ``slimtune train`` cannot run (``sections``: the built
    model/data/training/output/demo sections; ``distributed``: the DistributedSection or None)."""
    if method.task_type not in (None, "CAUSAL_LM"):
        raise RecipeError(f"method.task_type: {method.task_type!r} is not supported by `slimtune train`, "
                          "which fine-tunes causal language models; use CAUSAL_LM.")
    if method.inference_mode:
        raise RecipeError("method.inference_mode: true marks an adapter for inference only (PEFT freezes it), so "
                          "`slimtune train` would train nothing; remove it (saved adapters are marked so by slimtune).")
    training = sections["training"]
    for key in ("loraplus_lr_ratio", "layerwise_lr_decay"):
        if getattr(training, key) is not None and method_sets_param_groups(method):
            raise RecipeError(f"training.{key}: method {method.peft_type} sets the optimizer's parameter groups itself "
                              f"(its own learning rates per group); drop training.{key}, or use peft_type LORA.")
    if training.keep_dequantized and quantization is None:
        raise RecipeError("training.keep_dequantized: true keeps a quantized base's decoded weights for backward, and "
                          "this recipe has no quantization section (a full-precision base); drop the key, or add "
                          "quantization.")
    if quantization is not None and method.peft_type == "DELTA_LORA":
        raise RecipeError("method.peft_type: DELTA_LORA moves the base weights after every step, which a quantized "
                          "base cannot take (its weights are fixed codes); drop the quantization section, or use "
                          "peft_type LORA.")
    if distributed is not None and distributed.strategy == "fsdp" and method.peft_type in ("BITFIT", "SELECTIVE"):
        raise RecipeError(f"distributed.strategy: fsdp cannot train {method.peft_type}: it trains base weights in "
                          "place, which FSDP2 replaces with shards the adapter does not hold; use strategy: ddp "
                          "(auto picks it).")
    if sections["data"].packing and isinstance(method, PromptLearningConfig):
        raise RecipeError(f"data.packing: true cannot train {method.peft_type}: its virtual tokens (or prefix) "
                          "apply once per packed row, so every example after the first would see none, or see the "
                          "other examples; set data.packing: false.")
    if training.compile:
        _check_compile(distributed, sections["model"].gradient_checkpointing)


def _check_compile(distributed: Any, checkpointing: Any) -> None:
    """training.compile: true beside what makes each block compile again (then torch.compile gives up after 8
    and runs the rest eagerly) or what it was not tried with."""
    if checkpointing:
        raise RecipeError("training.compile: true with model.gradient_checkpointing: each checkpointed block has a "
                          "forward of its own, which makes every block compile again; set "
                          "model.gradient_checkpointing: false, or drop training.compile.")
    if distributed is not None:
        raise RecipeError("training.compile: true with a distributed section: compiled blocks are not supported "
                          "under DDP/FSDP yet; drop training.compile for distributed runs.")
