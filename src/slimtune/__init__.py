"""slimtune: parameter-efficient fine-tuning of transformer language models, natively in PyTorch.

    import slimtune
    slimtune.add_adapter(model, slimtune.LoraConfig(r=16, target_modules="all-linear"))
    ...train...
    slimtune.save_adapter(model, "out/adapter")          # HF PEFT's format

The public names below are imported on first use (so ``slimtune --help`` starts without torch).
Names that were renamed stay available for now and warn (``DeprecationWarning``) when used.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # configs
    "MethodConfig": "slimtune.config",
    "LoraConfig": "slimtune.config",
    "LoraFAConfig": "slimtune.methods.lora_fa",
    "DeltaLoraConfig": "slimtune.methods.delta_lora",
    "LoraPlusConfig": "slimtune.methods.lora_plus",
    "VeraConfig": "slimtune.methods.vera",
    "LohaConfig": "slimtune.methods.loha",
    "LokrConfig": "slimtune.methods.lokr",
    "IA3Config": "slimtune.methods.ia3",
    "BottleneckConfig": "slimtune.methods.bottleneck",
    "AdapterFusionConfig": "slimtune.methods.fusion",
    "PromptTuningConfig": "slimtune.methods.prompt_tuning",
    "PromptEncoderConfig": "slimtune.methods.prompt_tuning",
    "PrefixTuningConfig": "slimtune.methods.prefix",
    "BitFitConfig": "slimtune.methods.sparse",
    "SelectiveConfig": "slimtune.methods.sparse",
    "LayerDropConfig": "slimtune.methods.layerdrop",
    "config_from_dict": "slimtune.methods",
    # the lifecycle
    "add_adapter": "slimtune.lifecycle",
    "set_adapter": "slimtune.lifecycle",
    "delete_adapter": "slimtune.lifecycle",
    "list_adapters": "slimtune.lifecycle",
    "merge_adapter": "slimtune.lifecycle",
    "unmerge_adapter": "slimtune.lifecycle",
    "merge_and_unload": "slimtune.lifecycle",
    "unload": "slimtune.lifecycle",
    "disable_adapters": "slimtune.lifecycle",
    "disable_adapter_layers": "slimtune.lifecycle",
    "enable_adapter_layers": "slimtune.lifecycle",
    "apply_layerdrop": "slimtune.lifecycle",
    "after_optimizer_step": "slimtune.lifecycle",
    "fold_prompt_encoder": "slimtune.methods.prompts",
    # files
    "save_adapter": "slimtune.adapter_files",
    "load_adapter": "slimtune.adapter_files",
    "read_adapter_config": "slimtune.adapter_files",
    # AdapterHub's format and composition blocks
    "load_adapterhub": "slimtune.adapterhub.files",
    "save_adapterhub": "slimtune.adapterhub.files",
    "set_composition": "slimtune.adapterhub.composition",
    "Stack": "slimtune.adapterhub.blocks",
    "Parallel": "slimtune.adapterhub.blocks",
    "Fuse": "slimtune.adapterhub.blocks",
    # several adapters
    "combine_adapters": "slimtune.combination",
    "add_weighted_adapter": "slimtune.combination",
    "combine_adapter_files": "slimtune.combination",
    "mixed_batch": "slimtune.mixed_batch",
    "Decoder": "slimtune.serving",
    # the fast path (Triton kernels and fused LoRA on CUDA, fused LoRA on a CPU)
    "enable_fast_path": "slimtune.perf.fast_path",
    # optimizer groups
    "loraplus_param_groups": "slimtune.optim.loraplus",
    "create_loraplus_optimizer": "slimtune.optim.loraplus",
    "layerwise_lr_groups": "slimtune.optim.layerwise",
    # transformers' Trainer
    "SlimtuneCallback": "slimtune.hf_trainer",
    # reports and errors
    "trainable_parameters": "slimtune.report",
    "TrainableReport": "slimtune.report",
    "NotMergeableError": "slimtune.errors",
}

# old name -> (module, new name): kept as aliases that warn
_DEPRECATED = {
    "inject": ("slimtune.lifecycle", "add_adapter"),
    "set_active_adapters": ("slimtune.lifecycle", "set_adapter"),
    "merge": ("slimtune.lifecycle", "merge_adapter"),
    "unmerge": ("slimtune.lifecycle", "unmerge_adapter"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _DEPRECATED:
        module, new = _DEPRECATED[name]
        warnings.warn(f"slimtune.{name} is deprecated; use slimtune.{new} (same arguments).", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(module), new)
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from slimtune.adapter_files import load_adapter, read_adapter_config, save_adapter
    from slimtune.adapterhub.blocks import Fuse, Parallel, Stack
    from slimtune.adapterhub.composition import set_composition
    from slimtune.adapterhub.files import load_adapterhub, save_adapterhub
    from slimtune.combination import add_weighted_adapter, combine_adapter_files, combine_adapters
    from slimtune.config import LoraConfig, MethodConfig
    from slimtune.errors import NotMergeableError
    from slimtune.hf_trainer import SlimtuneCallback
    from slimtune.lifecycle import (
        add_adapter,
        after_optimizer_step,
        apply_layerdrop,
        delete_adapter,
        disable_adapter_layers,
        disable_adapters,
        enable_adapter_layers,
        list_adapters,
        merge_adapter,
        merge_and_unload,
        set_adapter,
        unload,
        unmerge_adapter,
    )
    from slimtune.methods import config_from_dict
    from slimtune.methods.bottleneck import BottleneckConfig
    from slimtune.methods.delta_lora import DeltaLoraConfig
    from slimtune.methods.fusion import AdapterFusionConfig
    from slimtune.methods.ia3 import IA3Config
    from slimtune.methods.layerdrop import LayerDropConfig
    from slimtune.methods.loha import LohaConfig
    from slimtune.methods.lokr import LokrConfig
    from slimtune.methods.lora_fa import LoraFAConfig
    from slimtune.methods.lora_plus import LoraPlusConfig
    from slimtune.methods.prefix import PrefixTuningConfig
    from slimtune.methods.prompt_tuning import PromptEncoderConfig, PromptTuningConfig
    from slimtune.methods.prompts import fold_prompt_encoder
    from slimtune.methods.sparse import BitFitConfig, SelectiveConfig
    from slimtune.methods.vera import VeraConfig
    from slimtune.mixed_batch import mixed_batch
    from slimtune.optim.layerwise import layerwise_lr_groups
    from slimtune.optim.loraplus import create_loraplus_optimizer, loraplus_param_groups
    from slimtune.perf.fast_path import enable_fast_path
    from slimtune.report import TrainableReport, trainable_parameters
    from slimtune.serving import Decoder
