"""Many adapters on one base: switching, mixed batches, exact/SVD combination, and clear errors."""

import copy

import peft
import pytest
import torch
from tiny_models import logits, sample_inputs, tiny_bert_cls, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune
from slimtune.inject import tuner_layers

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
        single = slimtune.inject(copy.deepcopy(base), config)
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


def test_switching_reproduces_each_adapters_own_outputs(family):
    base, singles, multi = family
    inputs = sample_inputs("llama")
    assert slimtune.list_adapters(multi) == ["dora", "lora", "vera"]
    for name in ["vera", "lora", "dora", "lora"]:
        slimtune.set_adapter(multi, name)
        expected = logits(singles[name], inputs)
        assert (expected - logits(base, inputs)).abs().max() > 1e-3
        torch.testing.assert_close(logits(multi, inputs), expected, atol=1e-5, rtol=0)
    slimtune.disable_adapter_layers(multi)
    torch.testing.assert_close(logits(multi, inputs), logits(base, inputs), atol=1e-6, rtol=0)
    slimtune.enable_adapter_layers(multi)
    torch.testing.assert_close(logits(multi, inputs), logits(singles["lora"], inputs), atol=1e-5, rtol=0)


def test_mixed_batch_equals_per_adapter_runs_row_by_row(family):
    base, singles, multi = family
    rows = ["lora", "dora", None, "vera", "lora", "__base__"]
    inputs = sample_inputs("llama", batch=len(rows))
    slimtune.set_adapter(multi, "lora")
    with slimtune.mixed_batch(multi, rows):
        mixed = logits(multi, inputs)
    for i, name in enumerate(rows):
        reference = base if name in (None, "__base__") else singles[name]
        torch.testing.assert_close(mixed[i], logits(reference, inputs)[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(multi, inputs), logits(singles["lora"], inputs), atol=1e-5, rtol=0)  # restored


def test_mixed_batch_generates_row_by_row(family):
    base, singles, multi = family
    rows = ["dora", "vera", None]
    ids = sample_inputs("llama", batch=3, seq=6)["input_ids"]
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=2, pad_token_id=0)
    with slimtune.mixed_batch(multi, rows):
        mixed = multi.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    for i, name in enumerate(rows):
        model = base if name is None else singles[name]
        alone = model.generate(ids[i: i + 1], attention_mask=torch.ones_like(ids[i: i + 1]), **settings)
        assert torch.equal(mixed[i], alone[0]), name


def test_mixed_batch_routes_head_copies():
    base = tiny_bert_cls()
    inputs = sample_inputs("bert", batch=3)
    config = dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False)
    model = copy.deepcopy(base)
    singles = {}
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        singles[name] = slimtune.inject(copy.deepcopy(base), slimtune.LoraConfig(**config))
        with torch.no_grad():
            singles[name].classifier.modules_to_save["default"].weight.add_(0.5)
        slimtune.add_adapter(model, slimtune.LoraConfig(**config), name)
        model.load_state_dict({k.replace(".default", f".{name}"): v for k, v in singles[name].state_dict().items()
                               if ".default" in k}, strict=False)
    with slimtune.mixed_batch(model, ["b", None, "a"]):
        mixed = logits(model, inputs)
    for i, reference in enumerate([singles["b"], base, singles["a"]]):
        torch.testing.assert_close(mixed[i], logits(reference, inputs)[i], atol=1e-5, rtol=0)


def _two_lora_adapters():
    model = tiny_llama()
    torch.manual_seed(3)
    slimtune.inject(model, slimtune.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                               init_lora_weights=False), "a")
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                                    target_modules=["q_proj", "k_proj"]), "b")
    return model


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
    slimtune.inject(wide, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    slimtune.save_adapter(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match="different model shapes"):
        slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "wide"], [0.5, 0.5], tmp_path / "out")
    model.slimtune_state.configs["b"].base_model_name_or_path = "org/other-model"
    model.slimtune_state.configs["a"].base_model_name_or_path = "org/model"
    with pytest.raises(ValueError, match="different bases"):
        slimtune.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab")
    assert "ab" not in slimtune.list_adapters(model)


def test_bad_names_and_requests_are_clear_errors(family):
    _, _, multi = family
    slimtune.set_adapter(multi, "lora")
    for call in (lambda: slimtune.set_adapter(multi, "nope"), lambda: slimtune.delete_adapter(multi, "nope"),
                 lambda: slimtune.merge_adapter(multi, "nope"),
                 lambda: slimtune.mixed_batch(multi, ["nope"]).__enter__(),
                 lambda: slimtune.combine_adapters(multi, ["lora", "nope"], [1, 1], "x")):
        with pytest.raises(ValueError, match="unknown adapter.*'nope'"):
            call()
    with pytest.raises(ValueError, match="'lora' is active.*set_adapter"):
        slimtune.delete_adapter(multi, "lora")
    with pytest.raises(ValueError, match="'dora' is DoRA"):
        slimtune.combine_adapters(multi, ["lora", "dora"], [1, 1], "x")
    with pytest.raises(ValueError, match="'vera' is VERA"):
        slimtune.combine_adapters(multi, ["lora", "vera"], [1, 1], "x")
    with pytest.raises(ValueError, match="needs rank"):
        slimtune.combine_adapters(multi, ["lora"], [1], "x", combination_type="svd")
    with pytest.raises(ValueError, match="one weight per adapter"):
        slimtune.combine_adapters(multi, ["lora"], [1, 2], "x")
    with pytest.raises(ValueError, match="one adapter name per row"):
        with slimtune.mixed_batch(multi, ["lora", "dora"]):
            multi(**sample_inputs("llama", batch=3))
    assert slimtune.list_adapters(multi) == ["dora", "lora", "vera"]


def test_merge_one_then_delete():
    model = _two_lora_adapters()
    inputs = sample_inputs("llama")
    slimtune.set_adapter(model, "a")
    expected = logits(model, inputs)
    slimtune.merge_adapter(model, "a")
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    assert model.model.layers[0].self_attn.q_proj.merged_adapters == ["a"]
    with pytest.raises(ValueError, match="merged"):
        with slimtune.mixed_batch(model, ["a", "b"]):
            pass
    slimtune.unmerge(model)
    slimtune.set_adapter(model, "b")
    slimtune.delete_adapter(model, "a")
    assert slimtune.list_adapters(model) == ["b"]
    assert not isinstance(model.model.layers[0].self_attn.v_proj, slimtune.methods.TunerLayer)
    with pytest.raises(ValueError, match="slimtune.unload"):
        slimtune.delete_adapter(model, "b")


def test_second_all_linear_adapter_joins_the_wrappers_instead_of_wrapping_their_insides():
    model = slimtune.inject(tiny_llama(), slimtune.LoraConfig(r=2, target_modules="all-linear"), "a")
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules="all-linear"), "b")
    layers = dict(tuner_layers(model))
    assert len(layers) == 14 and all(layer.adapter_names == ["a", "b"] for layer in layers.values())
    assert not any(".lora_A.a." in n or "base_layer.base_layer" in n for n, _ in model.named_modules())
