"""Prompt tuning and P-tuning: trainable virtual tokens prepended to the input embeddings.

Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691;
Liu et al., "GPT Understands, Too" (P-tuning), arXiv:2103.10385.

Through the forward pre-hook of :mod:`slimtune.methods.prompts`: on a first call (no filled
key/value cache) ``input_ids`` become ``inputs_embeds`` with the virtual tokens in front, and
``attention_mask`` (ones), token-level ``labels`` (-100), ``token_type_ids`` (0) and ``position_ids``
(virtual tokens at 0…p-1) grow to match; on later cached steps of ``generate`` the prompt is already
in the cache and only the mask and positions grow. As in PEFT, a causal LM returns logits for the
virtual positions too. Encoder-decoder models (T5) get the prompt on the encoder input and the
cross-attention mask grows.

On disk as HF PEFT: one tensor ``prompt_embeddings`` of shape
``(num_virtual_tokens · num_transformer_submodules, token_dim)`` — for P-tuning the encoder's output,
so a saved P-tuning adapter loads as plain prompt embeddings (PEFT's ``inference_mode``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn
from transformers import AutoTokenizer

from slimtune.config import MethodConfig, check_positive_int, check_probability
from slimtune.core.modules import weight_of
from slimtune.methods.prompts import (
    PromptLearningConfig,
    PromptLearningMethod,
    PromptModule,
    is_decoding,
    pad_left,
    shift_positions,
    transformers_model,
)

PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
ENCODER_TYPES = ("MLP", "LSTM")


def prepend_prompt(model: nn.Module, prompt: nn.Module, p: int, kwargs: dict, token_labels: bool = True) -> dict:
    """``inputs_embeds ← [P; E(x)]`` and every per-token input grown to match (first, uncached call).
    ``token_labels``: (batch, seq) labels are per token (not a multi-label classification target)."""
    embeds, ids = kwargs.pop("inputs_embeds", None), kwargs.pop("input_ids", None)
    if embeds is None:
        if ids is None:
            raise ValueError("prompt tuning needs input_ids or inputs_embeds in the forward call.")
        embeds = transformers_model(model).get_input_embeddings()(ids)  # (b, n, d)
    batch, n = embeds.shape[:2]
    virtual = prompt()[:p].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (b, p, d)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (b, p + n, d)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[-1] == n:  # the encoder call inside a forward already has it grown
        kwargs["attention_mask"] = pad_left(mask, p, 1)
    labels = kwargs.get("labels")
    if token_labels and isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == n:
        kwargs["labels"] = pad_left(labels, p, -100)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = pad_left(kwargs["token_type_ids"], p, 0)
    shift_positions(kwargs, p, prepend=True)
    return kwargs


class VirtualTokenMethod(PromptLearningMethod):
    """Shared forward rewrite of prompt tuning and P-tuning: ``[P; E(x)]`` on the (encoder) input."""

    def fill_dims(self, model: nn.Module, config: PromptLearningConfig) -> None:
        """Virtual tokens live beside the token embeddings, so ``token_dim`` is their width, which is not always the
        hidden size (OPT-350m embeds in 512 and projects to 1024)."""
        width = weight_of(transformers_model(model).get_input_embeddings()).shape[-1]
        if config.token_dim is None:
            config.token_dim = width
        elif config.token_dim != width:
            raise ValueError(f"token_dim={config.token_dim}, but {type(model).__name__}'s token embeddings are {width} "
                             "wide (virtual tokens are prepended to them); leave token_dim unset, it is read from the "
                             "model.")
        super().fill_dims(model, config)

    def rewrite_inputs(self, model: nn.Module, config: PromptLearningConfig, prompt: PromptModule,
                       kwargs: dict[str, Any]) -> dict[str, Any]:
        p = config.num_virtual_tokens
        # encoder-decoder: the encoder hook prepends; the cross-attention mask must cover P
        if transformers_model(model).config.is_encoder_decoder:
            mask, encoded = kwargs.get("attention_mask"), kwargs.get("encoder_outputs")
            source = encoded[0] if encoded is not None else _first(kwargs, "input_ids", "inputs_embeds")
            input_len = None if source is None else source.shape[1] - (p if encoded is not None else 0)
            if mask is not None and mask.shape[-1] == input_len:
                kwargs["attention_mask"] = pad_left(mask, p, 1)
            return kwargs
        if is_decoding(kwargs):
            kwargs["attention_mask"] = pad_left(kwargs.get("attention_mask"), p, 1)
            shift_positions(kwargs, p, prepend=False)
            return kwargs
        return prepend_prompt(model, prompt, p, kwargs, token_labels=config.task_type != "SEQ_CLS")

    def rewrite_encoder_inputs(self, model: nn.Module, config: PromptLearningConfig, prompt: PromptModule,
                               kwargs: dict[str, Any]) -> dict[str, Any]:
        """Encoder-decoder models: the encoder reads ``[P; E(x)]``."""
        return prepend_prompt(model, prompt, config.num_virtual_tokens, kwargs)


def _first(kwargs: dict[str, Any], *keys: str) -> torch.Tensor | None:
    return next((kwargs[k] for k in keys if kwargs.get(k) is not None), None)


class PromptEmbedding(PromptModule):
    """Prompt tuning (Lester et al., 2021): a trainable ``P ∈ R^{p×d}``; the model reads ``[P; E(x)]``.

    Params: ``p · num_transformer_submodules · d``. Init: N(0, 1) ("RANDOM", as PEFT), rows of the
    vocabulary embedding ("SAMPLE_VOCAB"), or the embeddings of a text's tokens repeated ("TEXT").
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)


class PromptEncoder(PromptModule):
    """P-tuning (Liu et al., 2021): ``P = MLP(E)`` or ``P = MLP(BiLSTM(E))`` with trainable ``E ∈ R^{p×d}``.

    MLP: ``d→h→h→d`` with ReLU; LSTM: bidirectional, ``encoder_num_layers``, then ``2h→2h→d``.
    Folded into a plain ``P`` after training (saving always writes ``P``).
    """

    head_names = ("lstm_head", "mlp_head")

    def __init__(self, rows: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float,
                 folded: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, dim)
        if folded:
            return
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        hidden = rows.unsqueeze(0)  # (1, p, d)
        if hasattr(self, "lstm_head"):
            hidden = self.lstm_head(hidden)[0]  # (1, p, 2h)
        return self.mlp_head(hidden)[0]  # (p, d)


# ---- configs --------------------------------------------------------------------------------------
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (Lester et al., 2021, arXiv:2104.08691) with PEFT's field names."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init!r} is not supported; "
                             f"use one of {PROMPT_TUNING_INITS}.")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the text) and "
                             "tokenizer_name_or_path (a local tokenizer folder or a hub id) to turn it into tokens.")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":  # as PEFT: options for a tokenizer not used
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} only apply with prompt_tuning_init='TEXT' "
                             "(they load the tokenizer of the init text); drop them or set the TEXT init.")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning (Liu et al., 2021, arXiv:2103.10385) with PEFT's field names (PEFT's ``P_TUNING``)."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_reparameterization_type={self.encoder_reparameterization_type!r} is not "
                             f"supported; use one of {ENCODER_TYPES}.")
        check_positive_int("encoder_hidden_size", self.encoder_hidden_size, optional=True)
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        check_probability("encoder_dropout", self.encoder_dropout)
        if self.encoder_reparameterization_type == "MLP":  # as PEFT, which warns of the first
            ignored = [f"{name}={getattr(self, name)}" for name, default in (("encoder_num_layers", 2),
                                                                           ("encoder_dropout", 0.0))
                       if getattr(self, name) != default]
            if ignored:
                warnings.warn(f"P-tuning's MLP encoder has exactly 2 layers and no dropout: {', '.join(ignored)} "
                              "is ignored (they shape the LSTM encoder, encoder_reparameterization_type='LSTM').",
                              stacklevel=3)


class PromptTuningMethod(VirtualTokenMethod):
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    config_class: ClassVar[type[MethodConfig]] = PromptTuningConfig

    def build_module(self, model: nn.Module, config: PromptLearningConfig) -> PromptModule:
        assert isinstance(config, PromptTuningConfig) and config.token_dim and config.num_transformer_submodules
        rows = config.num_virtual_tokens * config.num_transformer_submodules
        module = PromptEmbedding(rows, config.token_dim)
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return module
        words = transformers_model(model).get_input_embeddings()
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, cast(int, words.num_embeddings), (rows,))  # an int attribute of embeddings
        else:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
            text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            if not text_ids:
                raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens.")
            ids = torch.tensor((text_ids * math.ceil(rows / len(text_ids)))[:rows])
        with torch.no_grad():
            module.embedding.weight.copy_(words(ids.to(weight_of(words).device)).float())
        return module


class PTuningMethod(VirtualTokenMethod):
    peft_type: ClassVar[str] = "P_TUNING"
    config_class: ClassVar[type[MethodConfig]] = PromptEncoderConfig

    def fill_dims(self, model: nn.Module, config: PromptLearningConfig) -> None:
        super().fill_dims(model, config)
        assert isinstance(config, PromptEncoderConfig)
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim

    def build_module(self, model: nn.Module, config: PromptLearningConfig) -> PromptModule:
        assert isinstance(config, PromptEncoderConfig) and config.token_dim and config.num_transformer_submodules
        assert config.encoder_hidden_size is not None
        return PromptEncoder(config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim,
                             config.encoder_hidden_size, config.encoder_reparameterization_type,
                             config.encoder_num_layers, config.encoder_dropout, folded=config.inference_mode)
