"""Unset target_modules: PEFT's default layers for the architecture, written into the saved config, and the same
modules PEFT adapts for the same config."""

import copy
import json

import peft
import pytest
import torch
from tiny_models import logits, sample_inputs, tiny_gpt2, tiny_llama, tiny_t5

import slimtune
from slimtune.methods.default_targets import IA3_TARGETS, LOW_RANK_TARGETS, VERA_TARGETS


def _adapted(model):
    return sorted(n for n, m in model.named_modules() if hasattr(m, "base_layer") and not n.endswith("base_layer"))


CASES = [
    ("lora", slimtune.LoraConfig(r=4, init_lora_weights=False), peft.LoraConfig(r=4, init_lora_weights=False)),
    ("loha", slimtune.LohaConfig(r=4, init_weights=False), peft.LoHaConfig(r=4, init_weights=False)),
    ("vera", slimtune.VeraConfig(r=4), peft.VeraConfig(r=4)),
    ("ia3", slimtune.IA3Config(init_ia3_weights=False), peft.IA3Config(init_ia3_weights=False)),
]


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_t5], ids=["llama", "gpt2", "t5"])
@pytest.mark.parametrize("name,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_unset_targets_are_peft_defaults(builder, name, ours, theirs, tmp_path):
    if name in ("loha", "vera") and builder is tiny_gpt2:
        pytest.skip("PEFT's LoHa and VeRA do not wrap GPT-2's Conv1D")
    base = builder()
    model = slimtune.add_adapter(copy.deepcopy(base), copy.deepcopy(ours))
    reference = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(theirs))
    assert _adapted(model) and _adapted(model) == _adapted(reference.base_model.model)
    slimtune.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    table = {"ia3": {k: v[0] for k, v in IA3_TARGETS.items()}, "vera": VERA_TARGETS}.get(name, LOW_RANK_TARGETS)
    assert saved["target_modules"] == table[base.config.model_type]
    if name == "ia3":
        assert saved["feedforward_modules"] == IA3_TARGETS[base.config.model_type][1]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # the file alone says what to wrap
    family = {tiny_llama: "llama", tiny_gpt2: "gpt2", tiny_t5: "t5"}[builder]
    inputs = sample_inputs(family)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_an_architecture_without_defaults_needs_explicit_targets():
    model = tiny_llama()
    model.config.model_type = "some_new_arch"
    with pytest.raises(ValueError, match="no default layers for model_type 'some_new_arch'.*q_proj"):
        slimtune.add_adapter(model, slimtune.LoraConfig(r=4))


def test_the_callers_config_is_left_as_it_was_and_serves_other_architectures():
    config = slimtune.LoraConfig(r=4)
    llama = slimtune.add_adapter(tiny_llama(), config)
    gpt2 = slimtune.add_adapter(tiny_gpt2(), config)
    assert config.target_modules is None
    assert {n.rpartition(".")[2] for n in _adapted(llama)} == {"q_proj", "v_proj"}
    assert {n.rpartition(".")[2] for n in _adapted(gpt2)} == {"c_attn"}


def test_the_low_rank_table_is_peft_s_for_every_architecture_both_list():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA

    shared = set(PEFT_LORA) & set(LOW_RANK_TARGETS)
    assert {"rwkv", "nemotron_h", "gemma4", "llama", "gpt2"} <= shared
    assert {k: LOW_RANK_TARGETS[k] for k in shared} == {k: PEFT_LORA[k] for k in shared}


def test_rwkvs_defaults_and_all_linear_take_its_blocks_output_layers():
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    base = RwkvForCausalLM(RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                      intermediate_size=64, context_length=32))
    for ours, theirs in ((slimtune.LoraConfig(r=2), peft.LoraConfig(r=2)),
                         (slimtune.LoraConfig(r=2, target_modules="all-linear"),
                          peft.LoraConfig(r=2, target_modules="all-linear"))):
        model = slimtune.add_adapter(copy.deepcopy(base), ours)
        reference = peft.get_peft_model(copy.deepcopy(base), theirs)
        assert "rwkv.blocks.0.attention.output" in _adapted(model)  # a block's `output`, not the model's head
        assert _adapted(model) == _adapted(reference.base_model.model)
