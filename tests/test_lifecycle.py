"""Several adapters on one base: switching, merging one, deleting, and the errors users hit."""


import copy
import warnings

import pytest
import torch
from multi_adapter_cases import _two_lora_adapters
from tiny_models import logits, sample_inputs, tiny_llama

import slimtune
from slimtune.methods.contract import tuner_layers
from slimtune.methods.layers import TunerLayer


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
