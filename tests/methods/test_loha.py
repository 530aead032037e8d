"""LoHa: PEFT parity (outputs and files both ways, patterns), merging, rank/module dropout, training, errors."""

import copy
import math

import pytest
import torch
from lycoris_cases import lycoris_pair
from tiny_models import FAMILIES, logits, one_thread, sample_inputs, tiny_gpt2, tiny_llama, train_losses  # noqa: F401

import slimtune
from slimtune.methods.loha import LohaLinear

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(family, **extra):
    return lycoris_pair("loha", family, **extra)


def test_new_adapter_is_a_no_op_with_peft_shapes():
    base = tiny_llama()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LohaConfig(r=4, target_modules=["q_proj", "down_proj"]))
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    layer = model.model.layers[0].mlp.down_proj  # (out 32, in 64)
    assert isinstance(layer, LohaLinear)
    shapes = {k: tuple(v.shape) for k, v in layer.adapter_tensors("default").items()}
    assert shapes == {"hada_w1_a": (32, 4), "hada_w1_b": (4, 64), "hada_w2_a": (32, 4), "hada_w2_b": (4, 64)}
    assert not layer.hada_w2_b["default"].any() and layer.hada_w1_b["default"].abs().sum() > 0
    # trainable: 2r(in + out) per layer, nothing else
    per_layer = sum(2 * 4 * (i + o) for i, o in [(32, 32), (32, 64)])  # q_proj (32 → 32), down_proj (64 → 32)
    assert slimtune.trainable_parameters(model).trainable == 2 * per_layer



def test_delta_is_the_scaled_hadamard_product_of_two_low_rank_pairs():
    _, _, ours = _pair("llama")
    layer = ours.model.layers[0].self_attn.q_proj
    w1a, w1b, w2a, w2b = (getattr(layer, k)["default"] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    expected = (w1a @ w1b) * (w2a @ w2b) * (6 / 4)
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-6, rtol=0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-5, rtol=0)


def test_rank_and_alpha_patterns_match_peft():
    patterns = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 12}}
    _, theirs, ours = _pair("llama", **patterns)
    assert ours.model.layers[0].self_attn.v_proj.hada_w1_a["default"].shape == (16, 2)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)





def test_rank_dropout_drops_output_rows_and_rescales_by_the_kept_share():
    _, _, ours = _pair("llama", rank_dropout=0.5)
    layer = ours.model.layers[0].self_attn.q_proj.train()
    x = torch.randn(3, 32)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    torch.rand(1)  # the module-dropout draw comes first
    keep = (torch.rand(32) > 0.5).float()
    delta = layer.delta_weight("default") * (keep / keep.mean())[:, None]
    torch.testing.assert_close(got, layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=0)
    assert 0 < keep.sum() < 32  # some rows dropped, some kept: the rescale is visible



def test_training_lowers_the_loss_and_trains_only_the_factors():
    model = slimtune.add_adapter(tiny_llama().train(), slimtune.LohaConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert all("hada_" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=12), steps=8, lr=0.05)
    assert losses[-1] < losses[0] - 0.05


def test_hadamard_backward_equals_autograd_of_the_formula():
    torch.manual_seed(0)
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(5, 3), (3, 7), (5, 3), (3, 7)]]
    from slimtune.methods.loha import _HadamardDelta

    torch.autograd.gradcheck(lambda *f: _HadamardDelta.apply(*f, 0.7), factors)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="r=0 must be a positive integer"):
        slimtune.LohaConfig(r=0)
    with pytest.raises(ValueError, match="rank_dropout=1.5 must be in"):
        slimtune.LohaConfig(rank_dropout=1.5)
    with pytest.raises(TypeError, match="LoHa wraps linear layers"):
        slimtune.add_adapter(tiny_llama(), slimtune.LohaConfig(target_modules=["embed_tokens"]))
    assert math.isclose(slimtune.LohaConfig(r=4, alpha=8).alpha / 4, 2.0)
