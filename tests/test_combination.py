"""Combining LoRA adapters: exact concatenation, SVD truncation, saved files, and refusals."""


import json
from functools import partial

import peft
import pytest
import torch
from multi_adapter_cases import _two_lora_adapters
from tiny_models import logits, sample_inputs, tiny_gpt2, tiny_llama
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
    with pytest.raises(ValueError, match=r"'linear' merges the factors themselves, so every adapter needs the same"):
        slimtune.add_adapter(ours, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "c")
        slimtune.add_weighted_adapter(ours, ["a", "c"], [1, 1], "bad", combination_type="linear")


def test_combined_factors_are_laid_out_as_peft_lays_them_so_combining_again_matches(tmp_path):
    """'cat' puts each wᵢsᵢ into A as PEFT does (the product alone agreed before: a later 'linear' of the result
    split the scale differently and gave other logits); the combination keeps the first adapter's dropout."""
    torch.manual_seed(7)
    options = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**options, lora_alpha=8, lora_dropout=0.1), "a")
    theirs.add_adapter("b", peft.LoraConfig(**options, lora_alpha=2))
    theirs.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    ours = slimtune.load_adapter(tiny_llama(), tmp_path / "a", "a")
    slimtune.load_adapter(ours, tmp_path / "b", "b")
    for combine in (theirs.add_weighted_adapter, partial(slimtune.add_weighted_adapter, ours)):
        combine(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
        combine(["b", "a"], [1.5, 0.3], "ba", combination_type="cat")
        combine(["ab", "ba"], [0.5, 2.0], "again", combination_type="linear")  # equal ranks: 8
    ours_q, theirs_q = ours.model.layers[0].self_attn.q_proj, theirs.base_model.model.model.layers[0].self_attn.q_proj
    for name in ("ab", "again"):
        for factor in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(ours_q, factor)[name].weight, getattr(theirs_q, factor)[name].weight)
    assert ours.slimtune_state.configs["ab"].lora_dropout == theirs.peft_config["ab"].lora_dropout == 0.1
    # an initialisation's rules do not bind the combination's factors (orthogonal needs an even rank; 4 + 3 = 7)
    slimtune.add_adapter(ours, slimtune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal"), "o")
    slimtune.add_adapter(ours, slimtune.LoraConfig(r=3, target_modules=["q_proj"]), "three")
    slimtune.combine_adapters(ours, ["o", "three"], [1.0, 1.0], "seven")
    assert ours.slimtune_state.configs["seven"].init_lora_weights is True
    theirs.set_adapter("again")
    slimtune.set_adapter(ours, "again")
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours.eval(), inputs), logits(theirs.eval(), inputs), atol=1e-5, rtol=0)


def test_add_weighted_adapter_names_what_is_wrong_before_the_combination_type(recwarn):
    """A non-LoRA source or no source said "combination_type='svd' needs rank=…" (the default type); a weight that is
    not a finite number made a NaN adapter; options PEFT ignores for a type warn rather than fail PEFT's calls."""
    model = slimtune.add_adapter(tiny_llama(), slimtune.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
                                 "x")
    slimtune.add_adapter(model, slimtune.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "y")
    with pytest.raises(ValueError, match="adapter 'x' is IA3: only plain LoRA adapters"):
        slimtune.add_weighted_adapter(model, ["x", "y"], [1, 1], "xy")
    with pytest.raises(ValueError, match=r"give one weight per adapter: 0 adapters"):
        slimtune.add_weighted_adapter(model, [], [], "none")
    model = _two_lora_adapters()
    for bad in (float("nan"), float("inf"), "0.5x"):
        with pytest.raises(ValueError, match=f"weight {bad!r} of adapter 'b' is not a finite number"):
            slimtune.add_weighted_adapter(model, ["a", "b"], [0.5, bad], "ab", combination_type="cat")
    assert "ab" not in slimtune.list_adapters(model)
    with pytest.warns(UserWarning, match=r"\{'density': 0.5\} do nothing for combination_type='svd'"):
        slimtune.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", density=0.5)
    assert "ab" in slimtune.list_adapters(model)


def _counted_bernoulli(monkeypatch):
    """torch.bernoulli drawing from a generator seeded by its call count: the same masks for PEFT and slimtune
    when both prune the same tensors in the same order, whatever else each draws from the global generator."""
    calls, real = [], torch.bernoulli

    def bernoulli(p, *args, **kwargs):
        calls.append(p.shape)
        return real(p, generator=torch.Generator().manual_seed(len(calls)))
    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    return calls


PRUNING_CASES = [("ties", {}), ("ties", {"majority_sign_method": "frequency"}), ("magnitude_prune", {}),
                 ("dare_linear", {}), ("dare_ties", {}), ("ties_svd", {"svd_clamp": 0.9}),
                 ("dare_linear_svd", {}), ("dare_ties_svd", {"majority_sign_method": "frequency"}),
                 ("magnitude_prune_svd", {"svd_rank": 3}), ("svd", {"svd_clamp": 0.8})]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruning_combinations_match_peft(tmp_path, monkeypatch, family):
    """TIES, DARE and magnitude pruning, on the factors and on the updates (_svd), as PEFT's add_weighted_adapter
    computes them: on linear layers, an embedding and GPT-2's Conv1D (pruned in PEFT's (in, out) layout)."""
    build, targets = {"llama": (tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
                      "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "wte"])}[family]
    torch.manual_seed(7)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                           init_lora_weights=False), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets[:2], init_lora_weights=False))
    for name in ("a", "b"):
        theirs.save_pretrained(tmp_path, selected_adapters=[name])
    ours = slimtune.load_adapter(build(), tmp_path / "a", "a")
    slimtune.load_adapter(ours, tmp_path / "b", "b")
    calls = _counted_bernoulli(monkeypatch)
    inputs = sample_inputs(family)
    for case, (kind, options) in enumerate(PRUNING_CASES):
        name = f"{kind}-{case}"
        for model, add in ((theirs, theirs.add_weighted_adapter), (ours, partial(slimtune.add_weighted_adapter, ours))):
            calls.clear()
            add(["a", "b"], [0.8, -0.5], name, combination_type=kind, density=None if kind == "svd" else 0.4,
                **options)
            slimtune.set_adapter(ours, name) if model is ours else theirs.set_adapter(name)
            drawn = list(calls)
        assert bool(drawn) == kind.startswith("dare")
        got, want = logits(ours, inputs), logits(theirs, inputs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=kind)
        assert (got - logits(build(), inputs)).abs().max() > 1e-3  # the combination changes the model


def test_pruning_rules_keep_what_they_say():
    """The rules themselves: magnitude keeps the largest entries; DARE keeps about `density` of them, rescaled;
    TIES drops the entries whose sign disagrees with the elected one and averages the rest."""
    from slimtune.core.task_arithmetic import merge_task_tensors, prune_at_random, prune_by_magnitude
    t = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    assert prune_by_magnitude(t, 0.5).tolist() == [[0.0, -3.0, 0.0], [2.0, 0.0, 1.0]]
    big = torch.ones(100_000)
    torch.manual_seed(0)
    dropped = prune_at_random(big, 0.25)
    assert abs((dropped != 0).float().mean().item() - 0.25) < 0.01 and set(dropped.unique().tolist()) == {0.0, 4.0}
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-4.0, -1.0, 1.0])
    # signs elected by the sums (-3, -3, 4): a's 1.0 and b's... only agreeing entries are averaged
    assert merge_task_tensors("ties", [a, b], [1.0, 1.0], density=1.0).tolist() == [-4.0, -1.5, 2.0]
    assert merge_task_tensors("ties", [a, b], [1.0, 1.0], density=1.0,
                              majority_sign_method="frequency").tolist() == [1.0, -1.5, 2.0]
    assert merge_task_tensors("magnitude_prune", [a, b], [2.0, 1.0], density=0.34).tolist() == [-4.0, 0.0, 6.0]


@pytest.mark.parametrize("options, message", [
    ({"combination_type": "ties"}, r"prunes the adapters: give density=<fraction of entries kept, in \(0, 1\]> "
                                   r"\(got density=None\)"),
    ({"combination_type": "dare_linear", "density": 0}, r"got density=0\)"),
    ({"combination_type": "dare_ties", "density": 1.5}, r"got density=1.5\)"),
    ({"combination_type": "cat", "density": 0.5}, r"density=0.5 only applies to the pruning types"),
    ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "most"}, r"majority_sign_method='most'"),
    ({"combination_type": "cat", "svd_clamp": 0.9}, r"svd_clamp=0.9: a quantile in \(0, 1\], for the SVD types"),
    ({"combination_type": "ties_svd", "density": 0.5}, r"'ties_svd' needs rank=<positive int>"),
    ({"combination_type": "dare"}, r"combination_type='dare' is not supported"),
])
def test_bad_combination_options_are_refused_by_name(options, message):
    model = _two_lora_adapters()
    with pytest.raises(ValueError, match=message):
        slimtune.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", **options)
    assert "ab" not in slimtune.list_adapters(model)


def test_pruned_combination_of_saved_files_matches_the_live_one(tmp_path):
    model = _two_lora_adapters()
    for name in ("a", "b"):
        slimtune.save_adapter(model, tmp_path / name, adapter_name=name)
    options = {"combination_type": "ties_svd", "rank": 4, "density": 0.5, "svd_clamp": 0.95}
    slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "b"], [0.7, 0.6], tmp_path / "ab", **options)
    slimtune.combine_adapters(model, ["a", "b"], [0.7, 0.6], "ab", activate=True, **options)
    loaded = slimtune.load_adapter(tiny_llama(), tmp_path / "ab")
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_dare_on_conv1d_prunes_in_peft_layout(tmp_path, monkeypatch):
    """GPT-2's Conv1D updates are pruned as (in, out), as PEFT lays them out: live, and from files whose config
    says fan_in_fan_out (the files alone cannot tell a Conv1D from a Linear), as slimtune writes it for GPT-2 (with
    the config's default False, as PEFT does) and carries it into the combination."""
    model = tiny_gpt2()
    torch.manual_seed(2)
    for name in ("a", "b"):
        slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False), name)
        slimtune.save_adapter(model, tmp_path / name, adapter_name=name)
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    calls = _counted_bernoulli(monkeypatch)
    options = {"combination_type": "dare_linear_svd", "rank": 2, "density": 0.5}
    slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "ab", **options)
    from_files = sorted(calls)
    calls.clear()
    slimtune.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", **options)
    assert from_files == sorted(calls) == [torch.Size([32, 96])] * 4  # c_attn: in 32, out 96; 2 adapters × 2 blocks
    assert json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert model.slimtune_state.configs["ab"].fan_in_fan_out is True
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())  # as slimtune wrote it before
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    with pytest.raises(ValueError, match=r"configs disagree on fan_in_fan_out \(\[True, False\]\): DARE prunes"):
        slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "b"], [0.5, 0.5], tmp_path / "ab2", **options)


def test_a_single_adapter_is_combined_linearly_whatever_the_options(tmp_path):
    """PEFT combines one adapter 'linear' and ignores the SVD and pruning options; so does add_weighted_adapter."""
    base = tiny_llama()
    torch.manual_seed(4)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                                 adapter_name="a")
    theirs.save_pretrained(tmp_path, selected_adapters=["a"])
    ours = slimtune.load_adapter(base, tmp_path / "a", "a")
    inputs = sample_inputs("llama")
    for i, options in enumerate([{"combination_type": "svd", "svd_clamp": 0.8},
                                 {"combination_type": "ties_svd", "svd_clamp": 0.9, "density": 0.3}]):
        theirs.add_weighted_adapter(["a"], [0.7], f"x{i}", **options)
        theirs.set_adapter(f"x{i}")
        slimtune.add_weighted_adapter(ours, ["a"], [0.7], f"x{i}", **options)
        slimtune.set_adapter(ours, f"x{i}")
        torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)


def test_peft_files_with_saved_embedding_weights_combine(tmp_path):
    """PEFT saves the base embedding beside an adapter that targets it (save_embedding_layers="auto"): the copy is
    carried into the combination when the files agree on it, and refused when they do not."""
    from safetensors.torch import load_file, save_file

    config = {"r": 4, "target_modules": ["q_proj", "embed_tokens"], "init_lora_weights": False}
    torch.manual_seed(6)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**config))
    for name in ("a", "b"):
        theirs.save_pretrained(tmp_path, selected_adapters=[name])
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(tmp_path / "a" / "adapter_model.safetensors")  # what PEFT wrote
    slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "b"], [0.6, 0.4], tmp_path / "ab")
    assert key in load_file(tmp_path / "ab" / "adapter_model.safetensors")
    live = slimtune.load_adapter(tiny_llama(), tmp_path / "a", "a")
    slimtune.load_adapter(live, tmp_path / "b", "b")
    slimtune.combine_adapters(live, ["a", "b"], [0.6, 0.4], "ab", activate=True)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(slimtune.load_adapter(tiny_llama(), tmp_path / "ab"), inputs),
                               logits(live, inputs), atol=1e-5, rtol=0)
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    save_file({**tensors, key: tensors[key] + 1}, tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="hold different copies of the base weight model.embed_tokens.base_layer"):
        slimtune.combine_adapter_files([tmp_path / "a", tmp_path / "b"], [0.6, 0.4], tmp_path / "ab2")
