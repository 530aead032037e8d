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
from slimtune.methods.adapter import BottleneckConfig
from slimtune.methods.ia3 import IA3Config
from slimtune.methods.layerwise import layerwise_lr_groups
from slimtune.methods.prefix import PrefixTuningConfig
from slimtune.methods.prompt_tuning import PromptEncoderConfig, PromptTuningConfig
from slimtune.methods.prompts import fold_prompt_encoder
from slimtune.methods.sparse import BitFitConfig, LayerDropConfig, SelectiveConfig, apply_layerdrop
from slimtune.report import TrainableReport, trainable_parameters
from slimtune.methods.delta_lora import DeltaLoraConfig
from slimtune.methods.lora_fa import LoraFAConfig
from slimtune.methods.vera import VeraConfig
from slimtune.optim import LoraPlusConfig, create_loraplus_optimizer, loraplus_param_groups
from slimtune.adapters import (
    add_adapter,
    combine_adapter_files,
    combine_adapters,
    delete_adapter,
    disable_adapter_layers,
    enable_adapter_layers,
    list_adapters,
    merge_adapter,
    mixed_batch,
    set_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "DeltaLoraConfig",
    "LoraFAConfig",
    "LoraPlusConfig",
    "VeraConfig",
    "add_adapter",
    "combine_adapter_files",
    "combine_adapters",
    "create_loraplus_optimizer",
    "delete_adapter",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "list_adapters",
    "loraplus_param_groups",
    "merge_adapter",
    "mixed_batch",
    "set_adapter",
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LayerDropConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "apply_layerdrop",
    "fold_prompt_encoder",
    "layerwise_lr_groups",
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
