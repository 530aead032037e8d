"""Target matching follows PEFT: names/suffixes, full-match regex, all-linear, excludes, layer indexes."""

import re

import pytest
import torch
from tiny_models import tiny_bert_cls, tiny_llama

import slimtune
from slimtune.methods.targets import find_targets, layer_index, name_matches, pattern_value


def test_name_matches_suffix_not_substring():
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", r".*\.0\..*q_proj")
    assert not name_matches("model.layers.0.self_attn.q_proj", r"q_proj")  # regex must match whole name


def test_layers_to_transform_and_exclude():
    model = tiny_llama(layers=3)
    names = find_targets(model, ["q_proj", "v_proj"], exclude_modules=["v_proj"], layers_to_transform=[0, 2])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert layer_index("model.layers.12.mlp.up_proj", None) == 12
    assert layer_index("encoder.layer.3.attention.self.query", "layer") == 3


def test_layer_selection_follows_peft():
    """A module named in full is wrapped whatever its layer; a regex selects layers itself (PEFT refuses both)."""
    import slimtune

    names = find_targets(tiny_llama(layers=3), ["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    for config in (slimtune.LoraConfig, slimtune.LohaConfig, slimtune.VeraConfig):
        with pytest.raises(ValueError, match=r"layers_to_transform=1 cannot be used when target_modules is a re"):
            config(target_modules=r".*\.q_proj", layers_to_transform=1)
        with pytest.raises(ValueError, match=r"layers_pattern='layers' needs layers_to_transform"):
            config(target_modules=["q_proj"], layers_pattern="layers")
    assert slimtune.LoraConfig(target_modules="all-linear", layers_to_transform=1).layers_to_transform == [1]


def test_pattern_value_uses_dotted_suffix():
    assert pattern_value({"v_proj": 2}, "model.layers.0.self_attn.v_proj", 8) == 2
    assert pattern_value({"v_proj": 2}, "model.layers.0.self_attn.q_proj", 8) == 8


def test_nothing_matched_lists_existing_layers():
    with pytest.raises(ValueError) as err:
        find_targets(tiny_llama(), ["qkv"])
    message = str(err.value)
    assert "'qkv'" in message and "q_proj" in message and "down_proj" in message


def test_an_entry_that_matches_nothing_is_warned_about():
    """PEFT skips it silently: a typo (v_prj) adapts only the other layers."""
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"entries \['v_prj'\] match no module .*spelling.*q_proj"):
        names = find_targets(model, ["q_proj", "v_prj"])
    assert names and all(n.endswith("q_proj") for n in names)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_targets(model, ["q_proj", "v_proj"])
        find_targets(model, r".*q_proj")


def test_modules_to_save_are_never_targets():
    names = find_targets(tiny_bert_cls(), "all-linear", modules_to_save=["classifier"])
    assert not any("classifier" in n for n in names) and any(n.endswith("query") for n in names)


def _tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                        conv_kernel=4, time_step_rank=4))


def test_lora_refuses_the_layers_mamba_kernels_read_as_tensors_as_peft_does():
    for targets in ("all-linear", ["out_proj", "in_proj"]):
        with pytest.raises(ValueError, match=r"target_modules: \['out_proj'\] of a mamba model cannot take LoRA"):
            slimtune.add_adapter(_tiny_mamba(), slimtune.LoraConfig(r=2, target_modules=targets))
    model = slimtune.add_adapter(_tiny_mamba(), slimtune.LoraConfig(r=2, target_modules="all-linear",
                                                                    exclude_modules=["out_proj"]))
    mixer = model.backbone.layers[0].mixer
    assert hasattr(mixer.in_proj, "base_layer") and not hasattr(mixer.out_proj, "base_layer")
    model(torch.tensor([[1, 2, 3]]))


def test_an_empty_layers_to_transform_is_every_layer_as_in_peft():
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(
        target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[]))
    assert sorted(n for n, _ in slimtune.lifecycle.tuner_layers(model)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_pattern_keys_that_match_no_layer_warn_and_all_linear_ignores_case():
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['q_prj'\] match no adapted layer"):
        model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(
            target_modules="ALL-LINEAR", rank_pattern={"q_prj": 4, "v_proj": 2}, alpha_pattern={"o_proj": 3}))
    assert model.model.layers[0].self_attn.v_proj.lora_A["default"].weight.shape[0] == 2
    assert model.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape[0] == 8  # all-linear, as PEFT reads it


def test_targets_taken_whole_by_modules_to_save_are_named_in_the_error():
    with pytest.raises(ValueError, match=r"matched no module outside modules_to_save=\['self_attn'\]"):
        slimtune.add_adapter(tiny_llama(),
                             slimtune.LoraConfig(target_modules=["q_proj"], modules_to_save=["self_attn"]))


@pytest.mark.parametrize("field, value", [("use_rslora", "yes"), ("use_dora", 1), ("fan_in_fan_out", "no"),
                                          ("init_lora_weights", 0), ("layers_to_transform", [0, "1"])])
def test_a_config_value_of_the_wrong_type_is_refused_before_it_is_saved(field, value):
    # it would act (use_rslora="yes" scales as True) and be saved, and no loader would read the file back
    model = tiny_llama()
    with pytest.raises(TypeError, match="^" + re.escape(f"LoraConfig: {field}={value!r} must be of type")):
        slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj"], **{field: value}))
    assert not hasattr(model, "slimtune_state")
