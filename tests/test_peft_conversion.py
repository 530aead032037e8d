"""Saving a LoRA adapter that PEFT (transformers 5) would load without some of its layers says so: on mixtures of
experts transformers converts, PEFT reads expert-projection names as the fused experts' parameters."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers
from tiny_models import logits, tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM

import slimtune


def _moe_with_a_dense_layer():
    """A Qwen3-MoE whose first layer has a dense MLP (gate_proj / up_proj / down_proj modules), the second experts."""
    config = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=8,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                  num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[0])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _saved(base, tmp_path, targets):
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=4, target_modules=targets,
                                                                          init_lora_weights=False))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        slimtune.save_adapter(model, tmp_path)
    return model.eval(), [str(w.message) for w in seen if "PEFT reads those names" in str(w.message)]


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="PEFT converts mixture-of-experts targets only under transformers 5")
def test_an_adapter_peft_would_load_without_its_dense_layers_is_saved_with_a_warning(tmp_path):
    base = _moe_with_a_dense_layer()
    ours, said = _saved(base, tmp_path / "mlp", ["q_proj", "down_proj"])
    assert len(said) == 1 and "1 layers named ['down_proj'] (e.g. model.layers.0.mlp.down_proj)" in said[0]
    assert "qwen3_moe" in said[0]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mlp").eval()  # what it warns of
    inputs = {"input_ids": torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))}
    assert (logits(ours, inputs) - logits(theirs, inputs)).abs().max() > 1e-3
    assert slimtune.load_adapter(copy.deepcopy(base), tmp_path / "mlp") is not None  # slimtune reads it whole

    ours, said = _saved(base, tmp_path / "attention", ["q_proj", "v_proj"])
    assert said == []
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "attention").eval()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs))


@pytest.mark.parametrize("targets", [["down_proj", "gate_proj"], "all-linear"])
def test_models_peft_converts_nothing_of_save_without_a_warning(tmp_path, targets):
    _, said = _saved(tiny_llama(), tmp_path, targets)
    assert said == []
