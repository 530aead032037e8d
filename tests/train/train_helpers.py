"""Helpers for the training-engine tests: a tiny offline tokenizer and a tiny LLaMA.

Nothing here downloads: the tokenizer is a byte-level BPE trained in a few milliseconds on a small
corpus, the model is built from a config with random weights. (A uniquely named module rather than
``conftest``: several conftest.py files exist, so ``from conftest import`` would be ambiguous.)
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point slimtune's cache at a fresh folder, so tests neither read nor fill the user's cache (a conftest
    that imports this fixture turns it on for its folder)."""
    old = os.environ.get("SLIMTUNE_CACHE")
    os.environ["SLIMTUNE_CACHE"] = str(tmp_path_factory.mktemp("slimtune-cache"))
    yield os.environ["SLIMTUNE_CACHE"]
    if old is None:
        del os.environ["SLIMTUNE_CACHE"]
    else:
        os.environ["SLIMTUNE_CACHE"] = old

# ChatML, as SmolLM2-Instruct uses it (without its default system prompt, to keep rows short).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Write a Python function that returns the sum of two numbers.",
    "### Instruction:\nSay hello\n\n### Response:\nhello world",
    "user assistant system: the quick brown fox jumps over the lazy dog 0123456789",
] * 20


def make_tokenizer(chat_template: str | None = CHATML, pad_token: str = "<|im_end|>"):
    """A byte-level BPE tokenizer (any text encodes) with ChatML specials; EOS is ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
        pad_token=pad_token,
    )
    tok.chat_template = chat_template
    return tok


def tiny_llama(vocab_size: int = 400, seed: int = 0):
    """A 2-layer LLaMA with random weights (hidden 32, GQA 4 heads / 2 KV heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()
