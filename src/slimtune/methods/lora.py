"""LoRA (and DoRA through ``use_dora``, as in PEFT): the method that wraps target layers with LoRA layers.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685 (the layers:
:mod:`slimtune.methods.lora_layers`); Liu et al., "DoRA", arXiv:2402.09353 (:mod:`slimtune.methods.dora`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from torch import nn

from slimtune.config import LoraConfig, MethodConfig
from slimtune.methods.contract import LayerMethod
from slimtune.methods.default_targets import LOW_RANK_TARGETS, model_type
from slimtune.methods.dora import DoraLinear
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora_layers import LoraEmbedding, LoraLinear
from slimtune.methods.targets import is_adaptable_linear


def make_lora_layer(base: nn.Module, config: LoraConfig) -> TunerLayer:
    """An empty LoRA (or, with ``use_dora``, DoRA) wrapper for ``base``; raise for layer types it cannot wrap."""
    if config.use_dora:
        if isinstance(base, nn.Embedding):
            raise ValueError(
                f"DoRA (use_dora=True) adapts linear layers only in slimtune, but target_modules matched an "
                f"nn.Embedding({base.num_embeddings}, {base.embedding_dim}). Remove the embedding from "
                "target_modules, or use a separate adapter with use_dora=False for it (an adapter file with DoRA on "
                "an embedding: load it with PEFT)."
            )
        if is_adaptable_linear(base):
            return DoraLinear(base)
        raise TypeError(f"DoRA cannot wrap a {type(base).__name__}; supported: nn.Linear, transformers Conv1D, "
                        "slimtune quantized linear. Pick other target_modules (an adapter file with DoRA on such a "
                        "layer: load it with PEFT).")
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base)
    if is_adaptable_linear(base):
        return LoraLinear(base)
    raise TypeError(
        f"LoRA cannot wrap a {type(base).__name__}; supported: nn.Linear, transformers Conv1D, "
        "slimtune quantized linear, nn.Embedding. Pick other target_modules."
    )


# Mamba-based architectures whose kernels read these layers' weights as tensors (PEFT's list).
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
MAMBA_DIRECT_WEIGHTS = frozenset({"out_proj", "conv1d"})


class LoraMethod(LayerMethod):
    peft_type: ClassVar[str] = "LORA"
    config_class: ClassVar[type[MethodConfig]] = LoraConfig
    layer_types: ClassVar[tuple[type[TunerLayer], ...]] = (LoraLinear, LoraEmbedding)
    default_targets: ClassVar[Mapping[str, list[str] | str]] = LOW_RANK_TARGETS

    def make_layer(self, base: nn.Module, config: MethodConfig) -> TunerLayer:
        assert isinstance(config, LoraConfig)
        return make_lora_layer(base, config)

    def target_names(self, model: nn.Module, config: MethodConfig, skip: Iterable[str]) -> list[str]:
        """PEFT's targets, less those a Mamba-style model reads the weight of directly (its fused kernels take
        ``out_proj.weight`` and ``conv1d.weight`` as tensors, so LoRA there would be skipped, yet merged): refused,
        as PEFT refuses them."""
        names = super().target_names(model, config, skip)
        if model_type(model) in MAMBA_MODEL_TYPES:
            bad = sorted({n.rpartition(".")[2] for n in names} & MAMBA_DIRECT_WEIGHTS)
            if bad:
                raise ValueError(f"target_modules: {bad} of a {model_type(model)} model cannot take LoRA: its Mamba "
                                 f"kernels read their weights directly (as PEFT refuses: {sorted(MAMBA_DIRECT_WEIGHTS)}"
                                 "); leave them out, e.g. exclude_modules=" + repr(bad) + ".")
        return names
