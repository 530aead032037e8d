"""LoKr: PEFT parity (outputs, shapes and files both ways, decomposition options, patterns), the structured forward,
merging, rank/module dropout, training, errors."""

import copy

import peft
import pytest
import torch
from lycoris_cases import lycoris_pair
from tiny_models import FAMILIES, logits, one_thread, sample_inputs, tiny_gpt2, tiny_llama, train_losses  # noqa: F401

import slimtune
from slimtune.methods.lokr import LokrLinear, split_dimension

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(family, **extra):
    return lycoris_pair("lokr", family, **extra)


def _shapes(layer):
    return {k: tuple(v.shape) for k, v in layer.adapter_tensors("default").items()}


def test_dimensions_split_as_lycoris_splits_them():
    from peft.tuners.lokr.layer import factorization

    for dimension in [1, 2, 7, 12, 32, 64, 96, 127, 128, 576, 1536, 3072, 4096, 11008, 14336]:
        for factor in [-1, 1, 3, 4, 8, 16, 100]:
            assert split_dimension(dimension, factor) == factorization(dimension, factor), (dimension, factor)
    assert split_dimension(576) == (24, 24) and split_dimension(12, 4) == (4, 3)


@pytest.mark.parametrize("options, q_shapes", [
    ({}, {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}),  # q_proj 32 → 32: 32 = 4 · 8, r = 4 ≥ 8 / 2: W2 full
    ({"r": 2}, {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
    ({"r": 1, "decompose_both": True}, {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1),
                                         "lokr_w2_b": (1, 8)}),
    ({"decompose_factor": 2}, {"lokr_w1": (2, 2), "lokr_w2_a": (16, 4), "lokr_w2_b": (4, 16)}),
])
def test_new_adapter_is_a_no_op_with_peft_shapes(options, q_shapes):
    base = tiny_llama()
    config = {"r": 4, "target_modules": ["q_proj", "down_proj"], **options}
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LokrConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**config))
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LokrLinear) and _shapes(layer) == q_shapes
    peft_shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in theirs.state_dict().items()
                   if "lokr_" in k}
    assert peft_shapes == {k: tuple(v.shape) for k, v in model.state_dict().items() if "lokr_" in k}
    assert slimtune.trainable_parameters(model).trainable == sum(
        v.numel() for k, v in theirs.named_parameters() if v.requires_grad)



@pytest.mark.parametrize("options", [{"r": 1, "decompose_both": True}, {"decompose_factor": 2, "r": 2},
                                     {"rank_pattern": {"v_proj": 1}, "alpha_pattern": {"down_proj": 12}}])
def test_decomposition_options_and_patterns_match_peft(options):
    _, theirs, ours = _pair("llama", **options)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


def test_forward_is_the_scaled_kronecker_product_without_building_it():
    _, _, ours = _pair("llama", r=2, decompose_both=True)
    layer = ours.model.layers[0].mlp.down_proj  # (out 32, in 64): 32 = 4 · 8, 64 = 8 · 8
    w1 = layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
    w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    expected = torch.kron(w1, w2) * (6 / 2)
    torch.testing.assert_close(layer.delta_weight("default"), expected, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 64, requires_grad=True)
    got = layer(x)
    torch.testing.assert_close(got, layer.base_layer(x) + x @ expected.T, atol=1e-5, rtol=0)
    got.square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    factors = [getattr(layer, k)["default"].detach().clone().requires_grad_(True)
               for k in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")]
    delta = torch.kron(factors[0] @ factors[1], factors[2] @ factors[3]) * 3
    (layer.base_layer(ref) + ref @ delta.T).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-4, rtol=1e-5)
    for name, reference in zip(("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"), factors):
        torch.testing.assert_close(getattr(layer, name)["default"].grad, reference.grad, atol=1e-4, rtol=1e-5)



def test_a_rank_no_tensor_has_still_loads(tmp_path):
    """r = 16 on 32-wide layers leaves both Kronecker factors full: no tensor in the file is 16 wide."""
    base, theirs, _ = _pair("llama", r=16)
    theirs.save_pretrained(tmp_path)
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), atol=TOL, rtol=0)




@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_drops_output_rows_rescaled_only_when_asked(scale):
    _, _, ours = _pair("llama", rank_dropout=0.5, rank_dropout_scale=scale)
    layer = ours.model.layers[0].self_attn.q_proj.train()
    x = torch.randn(3, 32)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    torch.rand(1)  # the module-dropout draw comes first
    keep = (torch.rand(32) > 0.5).float()
    delta = layer.delta_weight("default") * (keep / keep.mean() if scale else keep)[:, None]
    torch.testing.assert_close(got, layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=0)
    assert 0 < keep.sum() < 32 and keep.mean() != 1  # some rows dropped, some kept: the rescale is visible



@pytest.mark.parametrize("init", [True, "lycoris"])
def test_training_lowers_the_loss_and_trains_only_the_factors(init):
    model = slimtune.add_adapter(tiny_llama().train(), slimtune.LokrConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_weights=init))
    assert all("lokr_" in n for n, p in model.named_parameters() if p.requires_grad)
    zero = "lokr_w1" if init is True else "lokr_w2"
    assert not getattr(model.model.layers[0].self_attn.q_proj, zero)["default"].any()
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=12), steps=8, lr=0.05)
    assert losses[-1] < losses[0] - 0.05


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="r=0 must be a positive integer"):
        slimtune.LokrConfig(r=0)
    with pytest.raises(ValueError, match="rank_dropout=1.5 must be in"):
        slimtune.LokrConfig(rank_dropout=1.5)
    with pytest.raises(ValueError, match="init_weights='pissa' is not supported"):
        slimtune.LokrConfig(init_weights="pissa")
    with pytest.raises(ValueError, match="decompose_factor=0: use -1"):
        slimtune.LokrConfig(decompose_factor=0)
    with pytest.raises(TypeError, match="LoKr wraps linear layers"):
        slimtune.add_adapter(tiny_llama(), slimtune.LokrConfig(target_modules=["embed_tokens"]))
