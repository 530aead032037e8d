"""(IA)³: init, shapes, PEFT parity (outputs and files both ways), merging, training, errors."""

import copy

import peft
import pytest
import torch
from tiny_models import (
    FAMILIES,
    logits,
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    sample_inputs,
    tiny_gpt2,
    tiny_llama,
    train_losses,
)

import slimtune
from slimtune.methods.ia3 import IA3Linear

TOL = 1e-5
# family -> (target_modules, feedforward_modules): PEFT's defaults for these architectures
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _configs(family, **extra):
    targets, ff = IA3_TARGETS[family]
    kwargs = {"target_modules": targets, "feedforward_modules": ff, **extra}
    if family == "bert":
        kwargs.update(task_type="SEQ_CLS", modules_to_save=["classifier"])
    return peft.IA3Config(init_ia3_weights=False, **kwargs), slimtune.IA3Config(**kwargs)


def _pair(family):
    """A base model, PEFT's (IA)³ with random vectors, and ours holding the same vectors."""
    base = FAMILIES[family][0]()
    theirs_config, ours_config = _configs(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_config)
    ours = slimtune.add_adapter(copy.deepcopy(base), ours_config)
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "ia3_l" in k}
    assert state and not ours.load_state_dict(state, strict=False).unexpected_keys
    return base, theirs, ours


def test_new_adapter_is_a_no_op_with_peft_shapes():
    base = tiny_llama()
    inputs = sample_inputs("llama")
    model = slimtune.add_adapter(copy.deepcopy(base), _configs("llama")[1])
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, IA3Linear)
    assert layer.self_attn.k_proj.ia3_l["default"].shape == (16, 1)  # (out, 1): rescales the keys
    assert layer.mlp.down_proj.ia3_l["default"].shape == (1, 64)  # (1, in): rescales the FFN activation
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "ia3_l" in n)


@pytest.mark.parametrize("family", list(IA3_TARGETS))
def test_forward_matches_peft(family):
    base, theirs, ours = _pair(family)
    inputs = sample_inputs(family)
    expected, plain = logits(theirs, inputs), logits(base, inputs)
    assert (expected - plain).abs().max() > 0.01 * plain.abs().max()  # the adapter is not a no-op
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(IA3_TARGETS))
def test_adapter_files_move_both_ways(family, tmp_path):
    base, theirs, ours = _pair(family)
    inputs = sample_inputs(family)
    slimtune.save_adapter(ours, tmp_path / "ours")
    loaded_in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded_in_peft, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded_in_ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


@pytest.mark.parametrize("builder, family", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2")])
def test_merge_unmerge_round_trip(builder, family):
    model = builder()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, _configs(family)[1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    inputs = sample_inputs(family)
    unmerged = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    slimtune.unmerge_adapter(model)
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in weights:
            torch.testing.assert_close(p, weights[plain], atol=1e-5, rtol=1e-5)
    merged_copy = slimtune.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, IA3Linear) for m in merged_copy.modules())
    torch.testing.assert_close(logits(merged_copy, inputs), unmerged, atol=1e-5, rtol=0)


def test_trainable_count_equals_the_formula_and_training_lowers_loss():
    model = tiny_llama()
    model.train()
    slimtune.add_adapter(model, _configs("llama")[1])
    # per layer: d_k + d_v (= 2 · kv_heads · head_dim = 16 each) + d_ff (64)
    assert slimtune.trainable_parameters(model).trainable == 2 * (16 + 16 + 64)
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=16), steps=8, lr=0.3)
    assert losses[-1] < losses[0] - 0.03


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    base = tiny_llama()
    model = slimtune.add_adapter(copy.deepcopy(base), _configs("llama")[1])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    slimtune.save_adapter(model, tmp_path)
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


def test_feedforward_module_outside_the_targets_is_rejected():
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not among target_modules"):
        slimtune.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="feedforward_modules=None"):
        slimtune.IA3Config(target_modules=["k_proj", "v_proj"])
    # a dotted suffix covered by a target is fine
    assert slimtune.IA3Config(target_modules=["c_proj"], feedforward_modules=["mlp.c_proj"])


def test_config_round_trips_through_peft_json():
    config = _configs("llama")[1]
    again = slimtune.config_from_dict(config.to_dict())
    assert isinstance(again, slimtune.IA3Config) and again == config


def test_feedforward_entries_match_name_endings_as_in_peft(tmp_path):
    """PEFT marks a target feed-forward when its name merely ends with a list entry: with T5, "o" marks the MLP's
    "wo" as well as attention's "o"; a regex string must match the whole name."""
    kwargs = {"task_type": "SEQ_2_SEQ_LM", "target_modules": ["o", "wo"], "feedforward_modules": ["o"]}
    ours = slimtune.add_adapter(FAMILIES["t5"][0](), slimtune.IA3Config(**kwargs))
    theirs = peft.get_peft_model(FAMILIES["t5"][0](), peft.IA3Config(**kwargs))
    wrapped = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert len(wrapped) == 10 and all(m.is_feedforward["default"] for m in wrapped.values())  # 2 + 2 + 3 + 3
    shapes = {k.removeprefix("base_model.model."): v.shape for k, v in theirs.state_dict().items() if "ia3_l" in k}
    assert shapes == {k: v.shape for k, v in ours.state_dict().items() if "ia3_l" in k}
    slimtune.save_adapter(ours, tmp_path)
    peft.PeftModel.from_pretrained(FAMILIES["t5"][0](), tmp_path)
    regex = slimtune.add_adapter(FAMILIES["t5"][0](), slimtune.IA3Config(**{**kwargs, "feedforward_modules": r".*\.o"}))
    assert sorted({m.is_feedforward["default"] for m in regex.modules() if isinstance(m, IA3Linear)}) == [False, True]
