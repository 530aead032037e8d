"""VeRA: PEFT's seeded projections, output and file parity both ways, sharing, merging, removal."""

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import logits, sample_inputs, tiny_gpt2, tiny_llama, train_losses

import slimtune
from slimtune.methods.vera import HOLDER, VeraLinear

TOL = 1e-5
TARGETS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_proj"])}


def _pair(family: str, seed: int = 7, save_projection: bool = True):
    builder, targets = TARGETS[family]
    base = builder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False and Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(
            r=8, target_modules=targets, projection_prng_key=seed, save_projection=save_projection))
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.VeraConfig(
        r=8, target_modules=targets, projection_prng_key=seed, save_projection=save_projection))
    torch.manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter: random λ_b, λ_d in both
        for name, p in theirs.named_parameters():
            if "vera_lambda" in name:
                p.normal_(0, 0.5)
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict({k: state[k] for k in ours.state_dict() if "vera_lambda" in k}, strict=False)
    return base, theirs, ours


@pytest.mark.parametrize("family", list(TARGETS))
def test_projections_are_peft_draws_and_outputs_match(family):
    base, theirs, ours = _pair(family)
    projection = getattr(ours, HOLDER)["default"]
    assert torch.equal(projection.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(projection.vera_B, theirs.base_model.vera_B["default"])
    inputs = sample_inputs(family)
    expected = logits(theirs, inputs)
    assert (expected - logits(base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_move_both_ways(save_projection, tmp_path):
    base, theirs, ours = _pair("llama", save_projection=save_projection)
    inputs = sample_inputs("llama")
    slimtune.save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == save_projection and ("base_model.vera_B" in keys) == save_projection
    assert any(k.endswith("q_proj.vera_lambda_b") for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    back = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(back, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


def test_saved_projection_wins_over_the_seed(tmp_path):
    _, _, ours = _pair("llama", seed=3)
    with torch.no_grad():
        getattr(ours, HOLDER)["default"].vera_A.mul_(2)  # the file, not the seed, must be what loads
    slimtune.save_adapter(ours, tmp_path)
    back = slimtune.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(getattr(back, HOLDER)["default"].vera_A, getattr(ours, HOLDER)["default"].vera_A)


def test_new_adapter_is_a_no_op_with_out_plus_r_trainables_per_layer():
    base = tiny_llama()
    inputs = sample_inputs("llama")
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.VeraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("vera_lambda" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * ((32 + 16) + (16 + 16))  # q: out 32, v: out 16
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.all(layer.vera_lambda_d["default"] == 0.1) and torch.all(layer.vera_lambda_b["default"] == 0)


def test_one_projection_pair_is_shared_and_not_in_the_state_dict():
    model = slimtune.add_adapter(tiny_llama(),
                                 slimtune.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) == 6 and len({id(m.vera_projection["default"]) for m in layers}) == 1
    projection = layers[0].vera_projection["default"]
    assert projection.vera_A.shape == (8, 64) and projection.vera_B.shape == (32, 8)  # max in, max out
    assert not any("vera_A" in k or "vera_B" in k for k in model.state_dict())
    copied = copy.deepcopy(model)
    copied_layers = [m for m in copied.modules() if isinstance(m, VeraLinear)]
    assert copied_layers[0].vera_projection["default"] is getattr(copied, HOLDER)["default"]


@pytest.mark.parametrize("family", list(TARGETS))
def test_merge_unmerge_round_trip(family):
    _, _, model = _pair(family)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    inputs = sample_inputs(family)
    unmerged = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    slimtune.unmerge_adapter(model)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)


def test_removal_and_unload_drop_the_projections():
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    slimtune.add_adapter(model, slimtune.VeraConfig(r=8, target_modules=["q_proj"]), "a")
    slimtune.add_adapter(model, slimtune.VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=5), "b")
    assert set(getattr(model, HOLDER).keys()) == {"a", "b"}
    slimtune.delete_adapter(model, "b")
    assert set(getattr(model, HOLDER).keys()) == {"a"}
    slimtune.unload(model)
    assert not hasattr(model, HOLDER) and {n: type(m) for n, m in model.named_modules()} == before


def test_training_touches_only_the_scaling_vectors():
    model = slimtune.add_adapter(tiny_llama().train(), slimtune.VeraConfig(r=16, target_modules="all-linear",
                                                                     bias="vera_only"))
    projection = getattr(model, HOLDER)["default"].vera_A.clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("vera_lambda" in n or n.endswith("bias") for n in trainable)
    losses = train_losses(model, sample_inputs("llama", batch=2, seq=12), steps=4, lr=1e-2)
    assert losses[-1] < losses[0]
    assert torch.equal(getattr(model, HOLDER)["default"].vera_A, projection)


def test_bad_config_values_are_named():
    for kwargs, fragment in (({"r": 0}, "r=0"), ({"vera_dropout": 1.0}, "vera_dropout=1.0"),
                             ({"bias": "lora_only"}, "bias='lora_only'"),
                             ({"layers_pattern": "layers"}, "layers_pattern")):
        with pytest.raises(ValueError, match=fragment):
            slimtune.VeraConfig(**kwargs)
    with pytest.raises(TypeError, match="VeRA wraps linear layers"):
        slimtune.add_adapter(tiny_llama(), slimtune.VeraConfig(target_modules=["embed_tokens"]))
