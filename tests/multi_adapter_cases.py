"""Adapters shared by the multi-adapter tests (lifecycle, mixed batches, combination): three methods on one
base, each also on its own copy (the reference), and two LoRA adapters for combination."""

import copy

import pytest
import torch
from tiny_models import tiny_llama

import slimtune

CONFIGS = {  # DoRA first: its DoraLinear wrappers also hold the plain LoRA adapter on q/v
    "dora": slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
    "lora": slimtune.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "vera": slimtune.VeraConfig(r=8, target_modules=["o_proj", "down_proj"], init_weights=False),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """One model per adapter (the reference) and one model holding all three, loaded by name from files."""
    base = tiny_llama()
    singles = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(len(name))
        single = slimtune.add_adapter(copy.deepcopy(base), config)
        with torch.no_grad():
            for pname, p in single.named_parameters():
                if "magnitude" in pname:
                    p.mul_(1.3)
        folder = tmp_path_factory.mktemp(name)
        slimtune.save_adapter(single, folder)
        singles[name] = (single, folder)
    multi = copy.deepcopy(base)
    for name, (_, folder) in singles.items():
        slimtune.load_adapter(multi, folder, adapter_name=name, activate=False)
    return base, {n: s for n, (s, _) in singles.items()}, multi


def _two_lora_adapters():
    model = tiny_llama()
    torch.manual_seed(3)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, lora_alpha=8,
                                                    target_modules=["q_proj", "v_proj", "embed_tokens"],
                                               init_lora_weights=False), "a")
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                                    target_modules=["q_proj", "k_proj"]), "b")
    return model
