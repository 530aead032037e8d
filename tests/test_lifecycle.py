"""Several adapters on one base: switching, merging one, deleting, and the errors users hit."""


import copy
import warnings

import pytest
import torch
from multi_adapter_cases import _two_lora_adapters
from tiny_models import logits, sample_inputs, tiny_gpt2, tiny_llama

import slimtune
from slimtune.core.state import get_state
from slimtune.methods.contract import tuner_layers
from slimtune.methods.layers import TunerLayer
from slimtune.quant import QuantConfig, quantize


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


def test_bad_names_and_requests_are_clear_errors(family):
    _, _, multi = family
    slimtune.set_adapter(multi, "lora")
    for call in (lambda: slimtune.set_adapter(multi, "nope"), lambda: slimtune.delete_adapter(multi, "nope"),
                 lambda: slimtune.merge_adapter(multi, "nope"),
                 lambda: slimtune.mixed_batch(multi, ["nope"]).__enter__(),
                 lambda: slimtune.combine_adapters(multi, ["lora", "nope"], [1, 1], "x")):
        with pytest.raises(ValueError, match="unknown adapter.*'nope'"):
            call()
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


def test_deleting_the_active_adapter_switches_to_another_as_peft():
    model = _two_lora_adapters()
    inputs = sample_inputs("llama")
    slimtune.set_adapter(model, "b")
    only_b = logits(model, inputs)
    slimtune.set_adapter(model, ["a", "b"])
    slimtune.delete_adapter(model, "a")  # another active adapter remains: it stays active, silently
    torch.testing.assert_close(logits(model, inputs), only_b, atol=1e-6, rtol=0)
    model = _two_lora_adapters()
    slimtune.set_adapter(model, "a")
    with pytest.warns(UserWarning, match="adapter 'a' was active and is deleted; 'b' is active now"):
        slimtune.delete_adapter(model, "a")
    assert slimtune.list_adapters(model) == ["b"]
    torch.testing.assert_close(logits(model, inputs), only_b, atol=1e-6, rtol=0)


def test_merge_one_then_delete():
    model = _two_lora_adapters()
    inputs = sample_inputs("llama")
    slimtune.set_adapter(model, "a")
    expected = logits(model, inputs)
    with slimtune.disable_adapters(model):
        base = logits(model, inputs)
    slimtune.merge_adapter(model, "a")
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    assert model.model.layers[0].self_attn.q_proj.merged_adapters == ["a"]
    with pytest.raises(ValueError, match="merged"):
        with slimtune.mixed_batch(model, ["a", "b"]):
            pass
    slimtune.unmerge_adapter(model)
    slimtune.set_adapter(model, "b")
    slimtune.delete_adapter(model, "a")
    assert slimtune.list_adapters(model) == ["b"]
    assert not isinstance(model.model.layers[0].self_attn.v_proj, TunerLayer)
    slimtune.delete_adapter(model, "b")  # the last one, as PEFT: the base model is left
    assert not any(isinstance(m, TunerLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, inputs), base, atol=1e-5, rtol=0)  # (a merge and unmerge ago)


def test_second_all_linear_adapter_joins_the_wrappers_instead_of_wrapping_their_insides():
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=2, target_modules="all-linear"), "a")
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules="all-linear"), "b")
    layers = dict(tuner_layers(model))
    assert len(layers) == 14 and all(layer.adapter_names == ["a", "b"] for layer in layers.values())
    assert not any(".lora_A.a." in n or "base_layer.base_layer" in n for n, _ in model.named_modules())


def test_modules_to_save_matching_nothing_names_the_top_level_modules():
    model = tiny_llama()
    config = slimtune.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["no_such_head"])
    with pytest.raises(ValueError, match=r"modules_to_save=\['no_such_head'\] matched no module; top-level modules "
                                         r"are: \['model', 'lm_head'\]"):
        slimtune.add_adapter(model, config)


def test_two_active_adapters_with_copies_of_one_module_are_refused_as_in_peft():
    model = tiny_llama()
    for name in ("a", "b"):
        slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                             adapter_name=name)
    with pytest.raises(ValueError, match=r"lm_head has a trained copy \(modules_to_save\) in each of \['a', 'b'\]: "
                                         r"only one can run at a time"):
        slimtune.set_adapter(model, ["a", "b"])
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="c")
    slimtune.set_adapter(model, ["a", "c"])  # one head copy among them: fine


@pytest.mark.parametrize("config", [
    slimtune.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                        init_lora_weights=False),
    slimtune.LohaConfig(r=4, rank_dropout=0.5, module_dropout=0.5, target_modules=["q_proj"], init_weights=False),
    slimtune.VeraConfig(r=8, vera_dropout=0.5, target_modules=["o_proj"], init_weights=False),
], ids=["lora", "loha", "vera"])
def test_an_adapter_added_to_a_model_in_eval_mode_runs_no_dropout(tmp_path, config):
    """New wrappers, dropouts and head copies take the mode of the module they are put in (PEFT's
    from_pretrained evaluates the model); train() turns their dropout on."""
    trained = slimtune.add_adapter(tiny_llama().train(), config)
    assert all(m.training for m in trained.modules())
    slimtune.save_adapter(trained, tmp_path)
    model = slimtune.load_adapter(tiny_llama().eval(), tmp_path)
    assert not any(m.training for m in model.modules())
    ids = sample_inputs("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        model.train()
        assert (model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-4


@pytest.mark.parametrize("target, twin", [("lm_head", "model.embed_tokens"), ("model.embed_tokens", "lm_head")])
def test_an_adapter_on_a_tied_layer_warns_when_added_and_when_merged(target, twin):
    """With tie_word_embeddings the embedding and lm_head hold one tensor: merging into one changes the other, so
    the merged model differs from the unmerged one (as in PEFT, which warns too). Untied as the warning says, the
    merge is exact and nothing is said."""
    model = tiny_llama(tie_word_embeddings=True)
    config = slimtune.LoraConfig(r=4, target_modules=[target], init_lora_weights=False)
    with pytest.warns(UserWarning, match=rf"adapts {target}, whose weight is shared with \['{twin}'\] \(tied "
                                         "embeddings\\).*merged model will differ from the unmerged one"):
        slimtune.add_adapter(model, config)
    inputs = sample_inputs("llama")
    unmerged = logits(model, inputs)
    with pytest.warns(UserWarning, match=rf"merging \['default'\] into {target} also changes \['{twin}'\]"):
        merged = slimtune.merge_and_unload(copy.deepcopy(model))
    assert (logits(merged, inputs) - unmerged).abs().max() > 0.1  # what the warnings are about
    with pytest.warns(UserWarning, match=rf"trains a copy of {target} \(modules_to_save\), whose weight is "
                                         rf"shared with \['{twin}'\]"):
        slimtune.add_adapter(tiny_llama(tie_word_embeddings=True), slimtune.LoraConfig(
            target_modules=["q_proj"], modules_to_save=[target]))

    untied = tiny_llama(tie_word_embeddings=True)
    layer = untied.get_submodule(target)
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    untied.config.tie_word_embeddings = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slimtune.add_adapter(untied, config)
        unmerged = logits(untied, inputs)
        merged = logits(slimtune.merge_and_unload(untied), inputs)
    assert not [w for w in caught if "tied" in str(w.message)]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def _peft_two_adapters(tmp_path, targets_a, targets_b, **kwargs):
    """PEFT's model with adapters "a" (active) and "b" of random weights, and slimtune's loaded from its folders."""
    import peft  # the oracle
    config = lambda targets: peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False, **kwargs)  # noqa: E731
    theirs = peft.get_peft_model(tiny_llama(), config(targets_a), adapter_name="a")
    theirs.add_adapter("b", config(targets_b))
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    slimtune.load_adapter(ours, tmp_path / "a", "a")
    slimtune.load_adapter(ours, tmp_path / "b", "b")
    return theirs.eval(), ours.eval()


def _merged(model):
    return {name.removeprefix("base_model.model."): list(layer.merged_adapters) for name, layer in model.named_modules()
            if hasattr(layer, "merged_adapters") and hasattr(layer, "base_layer")}


def test_merging_named_adapters_merges_exactly_those_as_peft(tmp_path):
    """``merge_adapter(model, ["b"])`` folds in "b" alone: the layers "b" does not adapt keep "a" unmerged."""
    theirs, ours = _peft_two_adapters(tmp_path, ["q_proj", "v_proj"], ["q_proj", "k_proj"])
    inputs = sample_inputs("llama")
    slimtune.set_adapter(ours, ["a", "b"])
    both = logits(ours, inputs)
    slimtune.set_adapter(ours, "a")
    slimtune.merge_adapter(ours, [])  # nothing named: nothing merged (as in PEFT)
    assert not any(_merged(ours).values())
    theirs.base_model.merge_adapter(["b"])
    slimtune.merge_adapter(ours, ["b"])
    assert _merged(ours) == _merged(theirs) and _merged(ours)["model.layers.0.self_attn.v_proj"] == []
    torch.testing.assert_close(logits(ours, inputs), both, atol=1e-5, rtol=0)  # "b" merged, "a" still running
    slimtune.unmerge_adapter(ours)
    slimtune.delete_adapter(ours, "a")  # "a" was never merged
    assert slimtune.list_adapters(ours) == ["b"]


@pytest.mark.parametrize("config, tensor", [
    (slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "lora_B.default.weight"),
    (slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, use_dora=True),
     "lora_B.default.weight"),
    (slimtune.IA3Config(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights=False), "ia3_l.default"),
], ids=["lora", "dora", "ia3"])
def test_a_merge_is_exactly_the_adapters_named_and_never_writes_inf_or_nan(config, tensor):
    """An empty list merges nothing (None: the active adapters). A merged weight that would hold inf/NaN (a
    diverged adapter) is refused, naming the adapter and the layer; the layers merged before it are unmerged
    again, and with ``safe_merge`` (PEFT's check before any change) the base stays bit-identical."""
    model = slimtune.add_adapter(tiny_llama(), config)
    first, broken = (model.model.layers[i].self_attn.q_proj for i in (0, 1))
    weights = [first.base_layer.weight.detach().clone(), broken.base_layer.weight.detach().clone()]
    broken.merge([])
    slimtune.merge_adapter(model, [])
    assert not any(_merged(model).values()) and torch.equal(broken.base_layer.weight, weights[1])
    with torch.no_grad():
        broken.get_parameter(tensor).view(-1)[0] = float("inf")
    for safe_merge in (False, True):
        just_before = first.base_layer.weight.detach().clone()
        with pytest.raises(ValueError, match=r"merging adapter 'default' into model\.layers\.1\.self_attn\.q_proj "
                                             r"gives inf/NaN weights"):
            slimtune.merge_adapter(model, safe_merge=safe_merge)
        assert not any(_merged(model).values()) and torch.equal(broken.base_layer.weight, weights[1])
        torch.testing.assert_close(first.base_layer.weight, weights[0], atol=1e-6, rtol=0)
        assert torch.equal(first.base_layer.weight, just_before) or not safe_merge  # checked before any change
    model = slimtune.add_adapter(tiny_llama(), config)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.get_parameter(tensor).view(-1)[0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="gives inf/NaN weights"):
        slimtune.merge_and_unload(model, safe_merge=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "ia3" not in k and "lora" not in k)
    assert slimtune.list_adapters(model) == ["default"]


def test_merging_while_the_adapters_are_disabled_is_refused_and_the_base_runs():
    """A disabled model runs the base model alone: a merge then would leak the adapter into its outputs."""
    model = _two_lora_adapters()
    inputs = sample_inputs("llama")
    with slimtune.disable_adapters(model):
        base = logits(model, inputs)
        with pytest.raises(ValueError, match=r"cannot merge \['a'\]: the adapters are disabled.*enable_adapter_layers"):
            slimtune.merge_adapter(model)
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    slimtune.disable_adapter_layers(model)
    for merge in (lambda: slimtune.merge_adapter(model, "b"), lambda: slimtune.merge_and_unload(model)):
        with pytest.raises(ValueError, match="the adapters are disabled"):
            merge()
        torch.testing.assert_close(logits(model, inputs), base, atol=0, rtol=0)
    assert not any(_merged(model).values())
    slimtune.enable_adapter_layers(model)
    slimtune.merge_adapter(model)
    assert _merged(model)["model.layers.0.self_attn.q_proj"] == ["a"]


def test_a_second_adapter_that_trains_biases_is_refused_as_in_peft():
    """Biases are the base model's own tensors: a second adapter training them would change the first (PEFT: "supports
    only 1 adapter with bias"). The refusal changes nothing; a first adapter with biases and others without is fine."""
    import peft  # the oracle
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn"], bias="all")).add_adapter(
            "b", peft.LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    for first in ("all", "none"):
        model = slimtune.add_adapter(tiny_gpt2(), slimtune.LoraConfig(r=2, target_modules=["c_attn"], bias=first), "a")
        before = ({n: type(m) for n, m in model.named_modules()}, copy.deepcopy(model.state_dict()),
                  {n: p.requires_grad for n, p in model.named_parameters()})
        for bias in ("all", "lora_only"):
            with pytest.raises(ValueError, match=rf"adapter 'b' trains biases \(bias='{bias}'\), but the model already "
                                                 r"has adapters \['a'\].*use bias='none'"):
                slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["c_attn"], bias=bias), "b")
        assert {n: type(m) for n, m in model.named_modules()} == before[0]
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before[2]
        assert model.state_dict().keys() == before[1].keys()
        assert all(torch.equal(v, before[1][k]) for k, v in model.state_dict().items())
        slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["c_attn"]), "b")
        assert slimtune.list_adapters(model) == ["a", "b"]


def test_switching_adapters_unmerges_merged_ones_with_a_warning_as_peft(tmp_path):
    theirs, ours = _peft_two_adapters(tmp_path, ["q_proj", "v_proj"], ["q_proj", "v_proj"])
    inputs = sample_inputs("llama")
    theirs.base_model.merge_adapter()
    slimtune.merge_adapter(ours)
    theirs.set_adapter("b")
    with pytest.warns(UserWarning, match=r"adapter\(s\) \['a'\] are merged into the base weights; unmerging them "
                                         r"before switching to \['b'\]"):
        slimtune.set_adapter(ours, "b")
    assert _merged(ours) == _merged(theirs) and not any(_merged(ours).values())
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)


def test_merge_and_unload_merges_the_adapters_named_as_peft(tmp_path):
    theirs, ours = _peft_two_adapters(tmp_path, ["q_proj", "v_proj"], ["q_proj", "k_proj"])
    inputs = sample_inputs("llama")
    expected = logits(theirs.merge_and_unload(adapter_names=["b"]), inputs)
    plain = slimtune.merge_and_unload(ours, adapter_names=["b"])
    assert not any(isinstance(m, TunerLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_takes_one_name_as_merge_adapter_does():
    model = tiny_llama()
    for name in ("code", "chat"):
        slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                             name)
    inputs = sample_inputs("llama")
    expected = logits(slimtune.merge_and_unload(copy.deepcopy(model), adapter_names=["code"]), inputs)
    torch.testing.assert_close(logits(slimtune.merge_and_unload(model, adapter_names="code"), inputs), expected)


def test_bad_adapter_names_are_clear_errors():
    model = _two_lora_adapters()
    with pytest.raises(TypeError, match=r"delete_adapter takes one adapter name \(a string\), got \['a'\]"):
        slimtune.delete_adapter(model, ["a"])
    for name in ("", "x.y", None):
        with pytest.raises(ValueError, match=rf"adapter name {name!r} is not valid"):
            slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"]), name)
    assert slimtune.list_adapters(model) == ["a", "b"]


_ROUNDING_CASES = {
    "lora": slimtune.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False),
    "dora": slimtune.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False, use_dora=True),
    "ia3": slimtune.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"],
                              init_ia3_weights=False),
    "vera": slimtune.VeraConfig(r=4, target_modules=["q_proj"]),
    "loha": slimtune.LohaConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False),
    "lokr": slimtune.LokrConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False),
}


def _adapted(config, dtype):
    torch.manual_seed(0)
    model = slimtune.add_adapter(tiny_llama().to(dtype), copy.deepcopy(config))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:  # an adapter that changes the weights by more than a rounding unit
                p.add_(torch.randn_like(p) * 0.3)
                if "ia3_l" in n:  # (IA)³ scales within [0.5, 2]: an unmerge divides by them
                    p.clamp_(0.5, 2.0)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(_ROUNDING_CASES))
def test_a_merge_into_a_half_precision_base_rounds_once(name, dtype):
    """W' = round(W + ΔW): the adapter term is added in fp32 and the sum rounded once to W's dtype (as PEFT's
    merge), where rounding ΔW first left a third of LoRA's bf16 weights a unit off; unmerging restores W within
    that one rounding."""
    model = _adapted(_ROUNDING_CASES[name], dtype)
    wide = copy.deepcopy(model).float()  # the same weights and adapter, exactly, in fp32
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    slimtune.merge_adapter(model)
    slimtune.merge_adapter(wide)
    merged = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    reference = {n: p for n, p in wide.named_parameters() if "base_layer" in n}
    assert any(not torch.equal(before[n], merged[n]) for n in merged)
    for n in merged:  # DoRA's row norms are computed from W's own dtype: a few weights round the other way
        off = int((merged[n] != reference[n].to(dtype)).sum())
        assert off <= (merged[n].numel() // 100 if name == "dora" else 0), (n, off)
    bits = 7 if dtype == torch.bfloat16 else 10  # a rounding unit is at most 2^-bits of the value
    units = {n: (p.detach().float().abs() * 2 + before[n].float().abs()) * 2.0 ** -bits for n, p in merged.items()}
    slimtune.unmerge_adapter(model)
    for n, p in merged.items():  # W' lost what is below its unit (divided by l ≥ 0.5 for (IA)³), no more
        if name == "dora":
            break  # its unmerge divides by the rows' scale G, which multiplies that loss (≈16× here)
        assert bool(((p.float() - before[n].float()).abs() <= units[n] + 1e-6).all()), n


def test_unmerging_an_ia3_vector_with_a_zero_leaves_no_nan_in_fp16():
    """PEFT's guard against l = 0 (dividing by l + 1e-8) is applied in fp32: in fp16 1e-8 is 0, and 0/0 was NaN."""
    model = _adapted(_ROUNDING_CASES["ia3"], torch.float16)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.ia3_l["default"][..., :3] = 0.0
    slimtune.merge_adapter(model)
    slimtune.unmerge_adapter(model)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_merge_for_export_to_bf16_rounds_each_merged_weight_once(name):
    """``slimtune merge --dtype bfloat16`` of an fp32 fine-tune: merged in fp32, then rounded (the adapter factors
    were rounded to bf16 before the merge)."""
    from slimtune.export import merge_for_export

    model = _adapted(_ROUNDING_CASES[name], torch.float32)
    exported, _ = merge_for_export(model, dtype=torch.bfloat16)
    reference, _ = merge_for_export(model, dtype=torch.float32)
    for (n, p), (m, q) in zip(exported.named_parameters(), reference.named_parameters()):
        assert n == m and p.dtype == torch.bfloat16
        assert torch.equal(p, q.to(torch.bfloat16)), n


def _state_of(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_refused_switches_and_merges_change_nothing():
    model = _two_lora_adapters()
    slimtune.add_adapter(model, slimtune.PromptTuningConfig(num_virtual_tokens=2), "p1")
    slimtune.add_adapter(model, slimtune.PromptTuningConfig(num_virtual_tokens=2), "p2")
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["model.norm.weight"]), "s")
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # "s" trained (its values go aside while it is inactive)
    slimtune.set_adapter(model, "a")
    slimtune.merge_adapter(model, ["a"])
    before = _state_of(model)
    with pytest.raises(ValueError, match="only one prompt-learning adapter"):
        slimtune.set_adapter(model, ["p1", "p2", "b"])  # it had switched the layers to "b" and unmerged "a"
    with pytest.raises(slimtune.NotMergeableError):
        slimtune.merge_adapter(model, ["s", "p1"], safe_merge=True)  # it had merged "s"
    after = _state_of(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert slimtune.lifecycle._merged_names(model, model.slimtune_state) == ["a"]


@pytest.mark.parametrize("build", ["bottleneck", "quantized"])
def test_a_merge_a_layer_can_never_take_changes_no_weight(build):
    """Refused before any layer merges, even without safe_merge (the layers merged first were unmerged again:
    W + ΔW - ΔW, not bit-identical)."""
    model = tiny_llama()
    if build == "quantized":  # the embedding merges, the 4-bit q_proj cannot
        quantize(model, QuantConfig())
        targets, names = ["embed_tokens", "q_proj"], ["a"]
    else:
        targets, names = ["q_proj", "o_proj"], ["a", "n"]
    torch.manual_seed(0)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, init_lora_weights=False), "a")
    if build == "bottleneck":
        slimtune.add_adapter(model, slimtune.BottleneckConfig(target_modules=["down_proj"]), "n")
    before = _state_of(model)
    with pytest.raises(slimtune.NotMergeableError):
        slimtune.merge_adapter(model, names)
    after = _state_of(model)
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert slimtune.lifecycle._merged_names(model, model.slimtune_state) == []


def test_an_adapter_loaded_frozen_stays_frozen_when_others_come_and_go(tmp_path):
    model = _two_lora_adapters()
    slimtune.save_adapter(model, tmp_path, "a")
    fresh = tiny_llama()
    slimtune.load_adapter(fresh, tmp_path, "a")  # frozen, active
    slimtune.add_adapter(fresh, slimtune.LoraConfig(r=2, target_modules=["k_proj"]), "b")
    slimtune.delete_adapter(fresh, "b")
    assert not [n for n, p in fresh.named_parameters() if p.requires_grad]  # as in PEFT
    slimtune.set_adapter(model, "b")
    slimtune.delete_adapter(model, "b")  # its successor becomes active and trains (as in PEFT)
    assert [n for n, p in model.named_parameters() if p.requires_grad] and model.slimtune_state.active == ["a"]


def test_sparse_adapters_and_merged_layers_never_write_over_each_other():
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "l")
    slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=["layers.0.self_attn.q_proj.weight"]), "s")
    slimtune.set_adapter(model, ["l", "s"])  # the name as the base model has it, through LoRA's wrapper
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
    with pytest.raises(ValueError, match="already trained in place by adapter 's'"):  # one weight, one owner
        slimtune.add_adapter(model, slimtune.SelectiveConfig(target_modules=["layers.0.self_attn.q_proj"]), "t")
    with pytest.raises(ValueError, match="q_proj's weight is trained in place by adapter 's'"):
        slimtune.merge_adapter(model, ["l"])  # switching "s" would overwrite the merge
    both = copy.deepcopy(model)
    inputs = sample_inputs("llama")
    expected = logits(both, inputs)
    torch.testing.assert_close(logits(slimtune.merge_and_unload(both), inputs), expected, atol=1e-5, rtol=0)
    slimtune.delete_adapter(model, "s")  # (merged together, nothing switches "s" after)
    slimtune.merge_adapter(model, ["l"])
    with pytest.raises(ValueError, match=r"q_proj holds merged adapters \['l'\]; a sparse adapter"):
        slimtune.add_adapter(model, slimtune.SelectiveConfig(target_modules=["layers.0.self_attn.q_proj"]), "t")


def test_unload_inside_disable_adapters_gives_back_the_base():
    base, inputs = tiny_llama(), sample_inputs("llama")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=2, target_modules=["q_proj"],
                                                                          init_lora_weights=False))
    slimtune.merge_adapter(model)
    with slimtune.disable_adapters(model):
        slimtune.unload(model)  # leaving the block merged the adapter into the plain layer again
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=1e-6, rtol=0)


def test_selective_takes_a_wrapped_weight_by_either_name():
    for name in ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.base_layer.weight"):
        model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=2, target_modules=["q_proj"]), "l")
        slimtune.add_adapter(model, slimtune.SelectiveConfig(target_parameters=[name]), "s", activate=True)
        assert model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad, name


def test_calls_that_cannot_mean_anything_are_refused_and_change_nothing(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = slimtune.LoraConfig(r=2, target_modules=["q_proj"])
    wrapped = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"holds PEFT's layers \(the model itself: PeftModel\).*unload"):
        slimtune.add_adapter(wrapped, config)
    from peft import IA3Config as PeftIA3Config

    theirs = PeftIA3Config(target_modules=["q_proj"], feedforward_modules=[])
    with pytest.raises(TypeError, match=r"got peft.IA3Config \(PEFT's\): use slimtune's, slimtune.config_from_dict"):
        slimtune.add_adapter(tiny_llama(), theirs)
    assert type(slimtune.config_from_dict(theirs.to_dict())) is slimtune.IA3Config  # (what the message says works)
    slimtune.save_adapter(slimtune.add_adapter(tiny_llama(), config), tmp_path)
    with pytest.raises(TypeError, match=r"holds PEFT's layers \(the model itself: PeftModel\).*unload"):
        slimtune.load_adapter(wrapped, tmp_path)  # (not the adapter file's fault)
    injected = tiny_llama()
    layer = get_peft_model(injected, PeftLoraConfig(r=2, target_modules=["v_proj"])).base_model.model
    with pytest.raises(TypeError, match=r"holds PEFT's layers \(model\.layers\.0\.self_attn\.v_proj: Linear\)"):
        slimtune.add_adapter(layer, config)
    model = slimtune.add_adapter(tiny_llama(), config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter name 'a/b' cannot name a file or folder"):
        slimtune.add_adapter(model, config, adapter_name="a/b")  # (save_adapter of several writes a folder each)
    with pytest.raises(ValueError, match=r"cannot name a file or folder.*at most 200 bytes in UTF-8"):
        slimtune.add_adapter(model, config, adapter_name="é" * 101)  # (101 characters, 202 bytes)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        slimtune.unload(model, adapter_names=["nope"])  # (it was ignored: every adapter was removed)
    with pytest.raises(ValueError, match="set_adapter needs at least one adapter name.*disable_adapters"):
        slimtune.set_adapter(model, [])
    assert get_state(model).active == ["default"] and list(get_state(model).configs) == ["default"]
    assert [n for n, _ in tuner_layers(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()
    longest = "é" * 100  # the longest name: saved as a folder of several adapters names it (SlimtuneCallback)
    slimtune.add_adapter(model, config, adapter_name=longest)
    slimtune.save_adapter(model, tmp_path / f"adapter-{longest}", longest)
