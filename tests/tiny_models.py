"""Tiny transformer models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BartConfig,
    BartForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """``tie_word_embeddings``: lm_head and the input embedding hold one weight tensor."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval()


def tiny_llama_cls(seed: int = 0, num_labels: int = 3) -> LlamaForSequenceClassification:
    """A decoder model with a classification head (``score``), pooled at the last non-pad token."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=num_labels)
    return LlamaForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_bart_cls(seed: int = 0, num_labels: int = 3) -> BartForSequenceClassification:
    """An encoder-decoder classifier whose head is named ``classification_head`` (not classifier/score); it pools
    at the last end-of-sequence token (id 2), which its inputs must hold."""
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, num_labels=num_labels)
    return BartForSequenceClassification(config).eval()


def sample_inputs(family: str, seed: int = 0, batch: int = 2, seq: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (batch, 6), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: two threads on a busy 2-core machine spin ~100x longer.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (and import it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# family -> (builder, LoRA targets, extra LoraConfig kwargs)
FAMILIES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"], {}),
    "gpt2": (tiny_gpt2, ["c_attn"], {}),
    "t5": (tiny_t5, ["q", "v"], {}),
    "bert": (tiny_bert_cls, ["query", "value"], {"modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}),
}


def train_losses(model, batch: dict, steps: int, lr: float) -> list[float]:
    """A few AdamW steps on ``batch`` (labels = input ids) over the trainable parameters; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_base_unchanged(model, before: dict) -> None:
    """Every base weight (``before``: name → tensor taken before injection) is bit-identical."""
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in before:
            assert torch.equal(p, before[plain]), name
