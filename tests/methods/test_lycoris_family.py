"""What LoHa and LoKr share, each checked the same way: PEFT parity of outputs and of files both ways, merging
(GPT-2's Conv1D in its own layout), and module dropout."""


import pytest
import torch
from lycoris_cases import KINDS, lycoris_pair
from oracles import check_files_move_both_ways
from tiny_models import logits, one_thread, sample_inputs, tiny_gpt2  # noqa: F401 (one_thread: a fixture)

import slimtune

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forward_matches_peft(kind, family):
    base, theirs, ours = lycoris_pair(kind, family, alpha=24)  # a strong adapter: the outputs move clearly
    inputs = sample_inputs(family)
    expected = logits(theirs, inputs)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    assert (expected - logits(base, inputs)).abs().max() > 0.01 * expected.abs().max()  # the adapter matters


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_files_move_both_ways(kind, family, tmp_path):
    base, theirs, ours = lycoris_pair(kind, family)
    check_files_move_both_ways(base, theirs, ours, sample_inputs(family), tmp_path, TOL, logits)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merge_unmerge_and_unload_keep_the_outputs(kind):
    base, _, ours = lycoris_pair(kind, "llama")
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
    assert not any(isinstance(m, KINDS[kind][2]) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gpt2_conv1d_merges_in_its_own_layout(kind):
    model = slimtune.add_adapter(tiny_gpt2(), KINDS[kind][1](r=2, target_modules=["c_attn"], init_weights=False))
    inputs = sample_inputs("gpt2")
    expected = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_module_dropout_skips_the_whole_adapter_sometimes_in_training_only(kind):
    _, _, ours = lycoris_pair(kind, "llama", module_dropout=0.5)
    layer = ours.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    base_out = layer.base_layer(x)
    layer.train()
    torch.manual_seed(0)
    skipped = sum(torch.equal(layer(x), base_out) for _ in range(40))
    assert 5 < skipped < 35  # about half the calls
    layer.eval()
    assert all(not torch.equal(layer(x), base_out) for _ in range(5))
