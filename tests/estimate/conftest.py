"""Tiny models for the estimate's tests: a config.json folder the estimate reads, and the same model built
for real so what slimtune allocates can be measured against the prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slimtune.estimate import DeviceProfile
from slimtune.train.recipe import Recipe, recipe_from_dict

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
GiB = 2**30

# A declared CPU (no calibration, no baseline subprocess): the numbers only need to be fixed.
TEST_CPU = DeviceProfile(name="test-cpu", kind="cpu", memory=8 * GiB, matmul_flops=5e10, bandwidth=1e10,
                         dequant_bandwidth=2e9, op_overhead=1e-5, context=300 * 2**20, heap_retention=0.35,
                         source="declared for tests")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(**TINY).save_pretrained(folder)
    return folder


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).train()


def make_recipe(folder: Path, method: dict[str, Any] | None = None, quantization: dict[str, Any] | None = None,
                **sections: dict[str, Any]) -> Recipe:
    """A recipe for the tiny model; ``sections`` (model=, data=, training=) update the defaults."""
    data: dict[str, Any] = {
        "model": {"name_or_path": str(folder), "device": "cpu", **sections.get("model", {})},
        "method": method or {"peft_type": "LORA", "r": 8, "target_modules": "all-linear"},
        "data": {"max_seq_length": 64, **sections.get("data", {})},
        "training": {"max_steps": 10, **sections.get("training", {})},
    }
    if quantization is not None:
        data["quantization"] = quantization
    return recipe_from_dict(data, name="tiny")
