"""slimtune: parameter-efficient fine-tuning of transformer language models, natively in PyTorch.

    import slimtune
    slimtune.inject(model, slimtune.LoraConfig(r=16, target_modules="all-linear"))
    ...train...
    slimtune.save_adapter(model, "out/adapter")          # HF PEFT's format
"""

from slimtune.config import LoraConfig, MethodConfig, config_from_dict
from slimtune.inject import (
    disable_adapters,
    inject,
    merge,
    merge_and_unload,
    set_active_adapters,
    unload,
    unmerge,
)
from slimtune.io import load_adapter, read_adapter_config, save_adapter
from slimtune.methods import NotMergeableError
from slimtune.report import TrainableReport, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "MethodConfig",
    "NotMergeableError",
    "TrainableReport",
    "config_from_dict",
    "disable_adapters",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
    "set_active_adapters",
    "trainable_parameters",
    "unload",
    "unmerge",
]
