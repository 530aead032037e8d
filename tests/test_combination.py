"""Combining LoRA adapters: exact concatenation, SVD truncation, saved files, and refusals."""


import peft
import pytest
import torch
from multi_adapter_cases import _two_lora_adapters
from tiny_models import logits, sample_inputs, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune
from slimtune.methods.contract import tuner_layers


def _expected_delta(layer, weights):
    return sum(w * layer.delta_weight(n) for n, w in weights.items() if n in layer.adapter_names)


def test_exact_combination_equals_the_weighted_sum_of_deltas():
    model = _two_lora_adapters()
    weights = {"a": 0.7, "b": -0.3}
    slimtune.combine_adapters(model, list(weights), list(weights.values()), "ab")
    layers = [layer for _, layer in tuner_layers(model) if "ab" in layer.adapter_names]
    assert len(layers) == 7  # q, k, v in 2 blocks + the embedding: the union of a's and b's targets
    for layer in layers:
        torch.testing.assert_close(layer.delta_weight("ab"), _expected_delta(layer, weights), atol=1e-5, rtol=0)
    inputs = sample_inputs("llama")
    slimtune.set_adapter(model, "ab")
    combined = logits(model, inputs)
    slimtune.combine_adapters(model, ["a", "b"], [1.0, 1.0], "sum")  # = both adapters active at once
    slimtune.set_adapter(model, "sum")
    summed = logits(model, inputs)
    slimtune.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(summed, logits(model, inputs), atol=1e-5, rtol=0)
    assert (combined - summed).abs().max() > 1e-3


def test_svd_combination_is_the_best_low_rank_approximation():
    model = _two_lora_adapters()
    weights = {"a": 0.5, "b": 0.5}
    slimtune.combine_adapters(model, list(weights), list(weights.values()), "full", combination_type="svd", rank=6)
    slimtune.combine_adapters(model, list(weights), list(weights.values()), "low", combination_type="svd", rank=2)
    layer = model.model.layers[0].self_attn.q_proj  # both adapters: exact rank 6
    exact = _expected_delta(layer, weights)
    torch.testing.assert_close(layer.delta_weight("full"), exact, atol=1e-5, rtol=0)
    u, s, vh = torch.linalg.svd(exact)
    torch.testing.assert_close(layer.delta_weight("low"), u[:, :2] * s[:2] @ vh[:2], atol=1e-5, rtol=0)
    assert layer.lora_A["low"].weight.shape == (2, 32)


def test_combining_saved_files_gives_a_peft_loadable_adapter(tmp_path):
    model = _two_lora_adapters()
    for name in ("a", "b"):
        slimtune.save_adapter(model, tmp_path / name, adapter_name=name)
    slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "b"], [0.7, -0.3], tmp_path / "ab")
    slimtune.combine_adapters(model, ["a", "b"], [0.7, -0.3], "ab", activate=True)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab")
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_combining_adapters_of_different_shapes_or_bases_is_refused(tmp_path):
    model = _two_lora_adapters()
    slimtune.save_adapter(model, tmp_path / "a", adapter_name="a")
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    slimtune.add_adapter(wide, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.save_adapter(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match="different model shapes"):
        slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "wide"], [0.5, 0.5], tmp_path / "out")
    model.slimtune_state.configs["b"].base_model_name_or_path = "org/other-model"
    model.slimtune_state.configs["a"].base_model_name_or_path = "org/model"
    with pytest.raises(ValueError, match="different bases"):
        slimtune.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab")
    assert "ab" not in slimtune.list_adapters(model)


def test_linear_combination_and_add_weighted_adapter_match_peft(tmp_path):
    """PEFT's add_weighted_adapter: 'linear' sums √|w s|-weighted factors (cross terms included), 'svd' defaults to
    the largest rank; both applied to the same two adapters give PEFT's logits."""
    base = tiny_llama()
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj"],
                                            init_lora_weights=False))
    for name in ("a", "b"):
        theirs.save_pretrained(tmp_path, selected_adapters=[name])
    ours = slimtune.load_adapter(base, tmp_path / "a", "a")  # (PEFT saves a non-default adapter in its subfolder)
    slimtune.load_adapter(ours, tmp_path / "b", "b")
    inputs = sample_inputs("llama")
    for kind, extra in (("linear", {}), ("svd", {}), ("cat", {})):
        theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], f"mix-{kind}", combination_type=kind, **extra)
        theirs.set_adapter(f"mix-{kind}")
        slimtune.add_weighted_adapter(ours, ["a", "b"], [0.7, -0.4], f"mix-{kind}", combination_type=kind)
        slimtune.set_adapter(ours, f"mix-{kind}")
        torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)
    assert ours.model.layers[0].self_attn.q_proj.lora_A["mix-svd"].weight.shape[0] == 4  # the largest rank
    with pytest.raises(ValueError, match=r"'linear' adds the factors themselves, so every adapter needs the same rank"):
        slimtune.add_adapter(ours, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "c")
        slimtune.add_weighted_adapter(ours, ["a", "c"], [1, 1], "bad", combination_type="linear")
