"""Shared fixtures of the quantization tests: tiny models built from configs, the bitsandbytes oracle."""

from __future__ import annotations

import pytest
import torch
from oracles import bitsandbytes_oracle


@pytest.fixture(scope="session")
def bnbF():
    """bitsandbytes.functional (the oracle; its CPU path is what these tests compare against)."""
    return bitsandbytes_oracle().functional


@pytest.fixture
def no_dynamo(monkeypatch):
    """bitsandbytes runs its CPU fallback for odd-width shapes through torch.compile, which costs
    seconds per shape and changes nothing numerically (one fp32 multiply per value): call the
    eager function it wraps instead."""
    ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    for name in ("_dequantize_4bit_compute", "_dequantize_blockwise_compute"):
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, getattr(fn, "__wrapped__", fn))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture(scope="session")
def make_llama():
    """``make_llama(seed=0, **config_overrides)`` -> a tiny LlamaForCausalLM in eval mode."""
    return tiny_llama


@pytest.fixture(scope="session")
def llama_config():
    """``llama_config(**overrides)`` -> the tiny LlamaConfig used by ``make_llama``."""
    return tiny_llama_config


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
