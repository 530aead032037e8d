"""LoHa: PEFT parity (outputs and files both ways, patterns), merging, rank/module dropout, training, errors."""

import copy
import math

import peft
import pytest
import torch
from tiny_models import FAMILIES, logits, one_thread, sample_inputs, tiny_gpt2, tiny_llama, train_losses  # noqa: F401

import slimtune
from slimtune.methods.loha import LohaLinear

TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value"], "t5": ["q", "v", "wo"]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _kwargs(family, **extra):
    kwargs = {"r": 4, "alpha": 6, "target_modules": TARGETS[family], **extra}
    if family == "bert":
        kwargs.update(task_type="SEQ_CLS", modules_to_save=["classifier"])
    return kwargs


def _pair(family, **extra):
    """A base model, PEFT's LoHa with random factors (all four non-zero), and ours holding the same factors."""
    base = FAMILIES[family][0]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(init_weights=False, **_kwargs(family, **extra)))
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LohaConfig(**_kwargs(family, **extra)))
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
             if "hada_" in k or "modules_to_save" in k}
    assert state and not ours.load_state_dict(state, strict=False).unexpected_keys
    return base, theirs.eval(), ours.eval()


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


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_forward_matches_peft(family):
    base, theirs, ours = _pair(family, alpha=48)  # a strong adapter: the outputs differ from the base clearly
    inputs = sample_inputs(family)
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    assert (expected - logits(base, inputs)).abs().max() > 0.01 * expected.abs().max()  # the adapter matters


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


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_adapter_files_move_both_ways(family, tmp_path):
    base, theirs, ours = _pair(family)
    inputs = sample_inputs(family)
    slimtune.save_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(in_peft, inputs), logits(ours, inputs), atol=TOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(in_ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "theirs" / "adapter_model.safetensors"))


def test_merge_unmerge_and_unload_keep_the_outputs():
    base, _, ours = _pair("llama")
    inputs = sample_inputs("llama")
    expected = logits(ours, inputs)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    slimtune.merge_adapter(ours)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    slimtune.unmerge_adapter(ours)
    for name, param in ours.named_parameters():
        if name.replace(".base_layer", "") in before:
            torch.testing.assert_close(param, before[name.replace(".base_layer", "")], atol=1e-6, rtol=0)
    plain = slimtune.merge_and_unload(ours)
    assert not any(isinstance(m, LohaLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=TOL, rtol=0)


def test_gpt2_conv1d_merges_in_its_own_layout():
    model = slimtune.add_adapter(tiny_gpt2(), slimtune.LohaConfig(r=2, target_modules=["c_attn"], init_weights=False))
    inputs = sample_inputs("gpt2")
    expected = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), expected, atol=TOL, rtol=0)


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


def test_module_dropout_skips_the_whole_adapter_sometimes_in_training_only():
    _, _, ours = _pair("llama", module_dropout=0.5)
    layer = ours.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    base_out = layer.base_layer(x)
    layer.train()
    torch.manual_seed(0)
    skipped = sum(torch.equal(layer(x), base_out) for _ in range(40))
    assert 5 < skipped < 35  # about half the calls
    layer.eval()
    assert all(not torch.equal(layer(x), base_out) for _ in range(5))


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
