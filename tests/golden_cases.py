"""Adapter folders saved for each method on a tiny model, kept as golden files: a refactoring that changes
one byte of what slimtune writes fails tests/test_golden_files.py. Regenerate (only for an intended format
change, and say so in the commit) with ``.venv/bin/python tests/fixtures/golden/write.py``.

The base weights are drawn here from a seeded generator (not by transformers' initialisers, which change
between releases), the adapter is injected under a fixed seed, and every trainable tensor is then moved
off its initial value, so the files hold non-trivial numbers for every method.
"""

from __future__ import annotations

import torch
from tiny_models import tiny_gpt2, tiny_llama

import slimtune

GOLDEN = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "golden"

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
CASES = {
    "lora": (tiny_llama, lambda: slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                     task_type="CAUSAL_LM")),
    "lora_all_linear_rslora_bias": (tiny_gpt2, lambda: slimtune.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, bias="lora_only",
        rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 4}, task_type="CAUSAL_LM")),
    "lora_embedding": (tiny_llama, lambda: slimtune.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"],
                                                               modules_to_save=["lm_head"])),
    "dora": (tiny_llama, lambda: slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)),
    "lora_fa": (tiny_llama, lambda: slimtune.LoraFAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "delta_lora": (tiny_llama, lambda: slimtune.DeltaLoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                delta_start_step=1)),
    "lora_plus": (tiny_llama, lambda: slimtune.LoraPlusConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "vera": (tiny_llama, lambda: slimtune.VeraConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "ia3": (tiny_llama, lambda: slimtune.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"])),
    "bottleneck_houlsby": (tiny_llama, lambda: slimtune.BottleneckConfig(adapter_type="houlsby", reduction_factor=8)),
    "bottleneck_pfeiffer": (tiny_gpt2, lambda: slimtune.BottleneckConfig(adapter_type="pfeiffer", reduction_factor=4)),
    "prompt_tuning": (tiny_llama, lambda: slimtune.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "p_tuning": (tiny_llama, lambda: slimtune.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8,
                                                                  task_type="CAUSAL_LM")),
    "prefix_tuning": (tiny_llama, lambda: slimtune.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                                      encoder_hidden_size=8, task_type="CAUSAL_LM")),
    "bitfit": (tiny_gpt2, lambda: slimtune.BitFitConfig()),
    "selective": (tiny_llama, lambda: slimtune.SelectiveConfig(target_parameters=["post_attention_layernorm.weight"],
                                                               layers_to_transform=[1])),
}

# Cases whose saved tensors are computed at save time (the prompt encoder's output, PEFT's format): their values
# are compared to fp32 rounding, the rest of their files byte for byte.
COMPUTED = {"p_tuning", "prefix_tuning"}


@torch.no_grad()
def seeded_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter of ``model`` redrawn from one seeded generator, in name order (tied ones once)."""
    generator = torch.Generator().manual_seed(1234)
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@torch.no_grad()
def trained(model: torch.nn.Module, steps: int = 3) -> torch.nn.Module:
    """Stand-in for training: each step moves every trainable tensor by a seeded amount, then runs the
    methods' after-step work (Delta-LoRA's W update), as the trainer does after an optimizer step."""
    generator = torch.Generator().manual_seed(99)
    for _ in range(steps):
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        slimtune.after_optimizer_step(model)
    return model


def build(case: str) -> torch.nn.Module:
    make_model, make_config = CASES[case]
    model = seeded_weights(make_model())
    torch.manual_seed(7)
    slimtune.add_adapter(model, make_config())
    return trained(model)
