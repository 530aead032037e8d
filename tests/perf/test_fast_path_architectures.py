"""The fast path on architectures other than Llama: the fused LoRA node and the chunked loss give the model's
own loss and gradients (Falcon adds into its projections' outputs in place, GPT-2 and GPT-BigCode use Conv1D
or fused q/k/v layers, OPT and BLOOM have biases, Gemma 2 soft-caps its logits, 4-bit bases included)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import slimtune
from slimtune.perf.fast_path import enable_fast_path
from slimtune.perf.losses import causal_lm_loss
from slimtune.quant import QuantConfig, quantize

SHAPES = {
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}


def _batch():
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("model_type", list(SHAPES))
def test_fast_path_gives_the_models_own_loss_and_gradients(model_type, quantized):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=128, **SHAPES[model_type]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)  # transformers starts biases at zero: make them count
    if quantized:
        quantize(model, QuantConfig(compute_dtype="float32", blocksize=32))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    model.train()
    model.config.use_cache = False
    fast = copy.deepcopy(model)
    assert enable_fast_path(fast, "auto").fused_lora_layers > 0
    batch = _batch()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    results = []
    for m, chunked in ((model, False), (fast, True)):
        torch.manual_seed(0)
        loss = causal_lm_loss(m, batch, reduction="mean") if chunked else m(**batch).loss
        params = dict(m.named_parameters())
        results.append((loss, torch.autograd.grad(loss, [params[n] for n in trainable])))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(trainable, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
