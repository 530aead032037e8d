"""Prefix tuning: trainable key/value prefixes at every attention layer, through the model's cache.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190.

On the first call the forward pre-hook (see :mod:`slimtune.methods.prompts`) writes the prefix into
the model's key/value cache (transformers' ``DynamicCache``; for encoder-decoder models the decoder's
self-attention cache of an ``EncoderDecoderCache``, as PEFT does), grows the attention mask by
``num_virtual_tokens`` and moves ``position_ids`` right; later cached ``generate`` steps find the
prefix already in the cache. On disk as HF PEFT: ``prompt_embeddings`` of shape
``(num_virtual_tokens, 2 · num_layers · token_dim)`` (for grouped-query attention ``token_dim`` is
``num_key_value_heads · head_dim``); the reparametrization MLP is folded away when saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from slimtune.compat import activation_checkpointing_on, cache_entry, pop_cache
from slimtune.config import MethodConfig, check_positive_int
from slimtune.methods.prompts import (
    PromptLearningConfig,
    PromptLearningMethod,
    PromptModule,
    is_decoding,
    model_dims,
    pad_left,
    shift_positions,
    transformers_model,
)

PREFIX_INITS = (None, "zero")


class PrefixEncoder(PromptModule):
    """Prefix tuning: per layer ``l``, ``K_l ← [P_k^l; K_l]``, ``V_l ← [P_v^l; V_l]``.

    ``P ∈ R^{p × 2·L·d_kv}`` is trainable directly, or reparametrized as ``P = MLP(E)`` with
    ``E ∈ R^{p×d}`` and ``MLP: d → h → 2·L·d`` (tanh), which the paper finds more stable; the MLP is
    dropped after training (:meth:`fold`). Params: ``p·2·L·d`` or ``p·d + d·h + h + h·2Ld + 2Ld``.
    """

    head_names = ("transform",)

    def __init__(self, p: int, token_dim: int, num_layers: int, hidden: int, projection: bool, zero: bool) -> None:
        super().__init__()
        width = 2 * num_layers * token_dim
        if projection:
            self.embedding = nn.Embedding(p, token_dim)
            first, last = nn.Linear(token_dim, hidden), nn.Linear(hidden, width)
            self.transform = nn.Sequential(first, nn.Tanh(), last)
            if zero:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        else:
            self.embedding = nn.Embedding(p, width)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return self.transform(rows)  # (p, 2·L·d_kv)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (Li & Liang, 2021, arXiv:2101.00190) with PEFT's field names.

    ``prefix_projection=True`` trains through the reparametrization MLP of hidden size
    ``encoder_hidden_size``; ``init_weights="zero"`` starts the prefix (or the MLP's output) at zero.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        if self.init_weights not in PREFIX_INITS:
            raise ValueError(f"init_weights={self.init_weights!r} is not supported; use None (random) or 'zero'.")


def new_cache(model: nn.Module) -> DynamicCache | EncoderDecoderCache:
    config = transformers_model(model).config
    if config.is_encoder_decoder:
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def batch_size(kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "encoder_outputs"):
        value = kwargs.get(key)
        if value is not None:
            return (value[0] if key == "encoder_outputs" else value).shape[0]
    raise ValueError("prefix tuning needs input_ids or inputs_embeds in the forward call to size the prefix.")


class PrefixTuningMethod(PromptLearningMethod):
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    config_class: ClassVar[type[MethodConfig]] = PrefixTuningConfig

    def check(self, model: nn.Module, config: MethodConfig) -> None:
        if getattr(model, "config", None) is None:
            raise TypeError(f"prefix tuning needs a transformers model with a .config; got {type(model).__name__}.")
        if cache_entry(model) is None:
            raise ValueError(
                f"prefix tuning needs a model whose forward takes a key/value cache (`cache` or `past_key_values`), "
                f"and {type(model).__name__} has none. Use prompt tuning (PROMPT_TUNING) or P-tuning (P_TUNING) "
                "instead."
            )
        if activation_checkpointing_on(model):
            raise ValueError("prefix tuning feeds the prefix through the key/value cache, which gradient checkpointing "
                             "turns off; call model.gradient_checkpointing_disable() or use prompt tuning.")
        assert isinstance(config, PrefixTuningConfig)
        self.fill_dims(model, config)
        if config.task_type == "SEQ_2_SEQ_LM" and config.num_transformer_submodules != 2:
            raise ValueError(f"prefix tuning on the sequence-to-sequence {type(model).__name__} needs "
                             f"num_transformer_submodules=2 (a prefix for the encoder and one for the decoder), got "
                             f"{config.num_transformer_submodules}; leave it unset.")

    def fill_dims(self, model: nn.Module, config: PromptLearningConfig) -> None:
        super().fill_dims(model, config)
        assert isinstance(config, PrefixTuningConfig) and config.token_dim and config.num_attention_heads
        dims = model_dims(model)
        decoder_only = not transformers_model(model).config.is_encoder_decoder  # (a decoder may be shallower)
        if decoder_only and dims["num_layers"] is not None and config.num_layers != dims["num_layers"]:
            raise ValueError(f"num_layers={config.num_layers}, but {type(model).__name__} has {dims['num_layers']} "
                             "layers (the prefix feeds each one's key/value cache); leave num_layers unset, it is "
                             "read from the model.")
        if dims["num_key_value_heads"] is None and dims["head_dim"] is None:  # keys and values are hidden_size wide
            for name in ("num_attention_heads", "token_dim"):
                if dims[name] is not None and getattr(config, name) != dims[name]:
                    raise ValueError(f"{name}={getattr(config, name)}, but {type(model).__name__}'s attention has "
                                     f"{dims[name]}; leave {name} unset, it is read from the model.")
        if dims["num_key_value_heads"] is not None:
            # The cache holds num_key_value_heads heads of head_dim each, which need not make up hidden_size
            # (grouped-query attention; Gemma's head_dim 256 × 16 heads for a hidden size of 3072), as PEFT sizes it.
            head_dim = dims["head_dim"] or config.token_dim // config.num_attention_heads
            config.token_dim = head_dim * dims["num_key_value_heads"]
            config.num_attention_heads = dims["num_key_value_heads"]
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim

    def build_module(self, model: nn.Module, config: PromptLearningConfig) -> PromptModule:
        assert isinstance(config, PrefixTuningConfig)
        assert config.token_dim and config.num_layers and config.encoder_hidden_size
        projection = config.prefix_projection and not config.inference_mode
        return PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.num_layers,
                             config.encoder_hidden_size, projection, zero=config.init_weights == "zero")

    def input_module(self, model: nn.Module) -> nn.Module:
        """The backbone when the head model cannot carry a cache to it (BERT's head in transformers 4)."""
        entry = cache_entry(model)
        return model if entry is None else entry[0]

    def rewrite_inputs(self, model: nn.Module, config: PromptLearningConfig, prompt: PromptModule,
                       kwargs: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(config, PrefixTuningConfig)
        if model.training and activation_checkpointing_on(model):
            raise ValueError("prefix tuning does not work with gradient checkpointing (it disables the cache); "
                             "call model.gradient_checkpointing_disable().")
        hf_model = transformers_model(model)
        p, encoder_decoder = config.num_virtual_tokens, hf_model.config.is_encoder_decoder
        # With use_cache=False a cache handed back by an earlier call (generate does that) is not reused.
        fresh = kwargs.get("use_cache") is False
        if fresh or not is_decoding(kwargs):
            cache = pop_cache(kwargs)
            if fresh or cache is None:
                cache = new_cache(model)
            write_prefix(config, cache, prompt(), batch_size(kwargs), hf_model.dtype)
            entry = cache_entry(model)
            assert entry is not None
            kwargs[entry[1]] = cache
        mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
        kwargs[mask_key] = pad_left(kwargs.get(mask_key), p, 1)
        shift_positions(kwargs, p, prepend=False)  # real tokens sit after the p prefix positions
        return kwargs


def write_prefix(config: PrefixTuningConfig, cache: DynamicCache | EncoderDecoderCache, prefix: torch.Tensor,
                 batch: int, dtype: torch.dtype) -> None:
    """Put each layer's (key, value) prefix, (batch, heads, p, head_dim), into an empty cache."""
    assert config.num_layers and config.num_attention_heads and config.token_dim and config.num_transformer_submodules
    layers, heads, p = config.num_layers, config.num_attention_heads, config.num_virtual_tokens
    kv = prefix.to(dtype).view(p, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)  # (2L, H, p, hd)
    target = getattr(cache, "self_attention_cache", cache)
    # PEFT's row layout: layer l reads rows (s·l, s·l + 1) mod 2L, s = 2 · num_transformer_submodules.
    step = 2 * config.num_transformer_submodules
    for layer in range(layers):
        key, value = kv[(step * layer) % (2 * layers)], kv[(step * layer + 1) % (2 * layers)]
        target.update(key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1), layer)
