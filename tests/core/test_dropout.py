"""The seeded inverted-dropout mask (a counter-based hash) that LoRA-FA and the fused LoRA node regenerate in
backward, and the dropout + linear node LoRA layers use (same draws and values as the two modules, less kept)."""

import copy

import pytest
import torch
from torch import nn

from slimtune.core.dropout import draw_seed, dropout_mask, dropout_then_linear


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
def test_mask_is_inverted_dropout(p):
    mask = dropout_mask(torch.empty(200, 300), p, seed=3)
    values = mask.unique().tolist()
    assert values == [0.0, pytest.approx(1 / (1 - p))]  # kept values are rescaled by 1 / (1 - p)
    assert float((mask == 0).float().mean()) == pytest.approx(p, abs=0.02)
    assert float(mask.mean()) == pytest.approx(1.0, abs=0.03)  # the expectation of x ⊙ mask is x


def _fmix32_reference(i: int, key: int) -> int:
    """murmur3's 32-bit finaliser of (i·0x9E3779B1 + key) mod 2³², in Python integers."""
    h = (i * 0x9E3779B1 + key) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@pytest.mark.parametrize("seed", [0, 7, 2**61 + 12345])
def test_mask_bits_are_the_murmur3_finaliser_of_the_counter_in_any_chunking(seed, monkeypatch):
    from slimtune.core import dropout

    key = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    bits = dropout.uniform_bits(3000, seed, torch.device("cpu"))
    assert bits.dtype == torch.int32
    assert [b & 0xFFFFFFFF for b in bits.tolist()] == [_fmix32_reference(i, key) for i in range(3000)]
    monkeypatch.setattr(dropout, "_CHUNK", 64)  # counters made in pieces (int32 aranges past 2³¹ elements)
    assert torch.equal(dropout.uniform_bits(3000, seed, torch.device("cpu")), bits)


def test_mask_elements_are_independent_of_their_neighbours():
    mask = dropout_mask(torch.empty(1000, 1000), 0.3, seed=11) == 0
    both = (mask[:, 1:] & mask[:, :-1]).float().mean()  # pairs of neighbours both dropped: p² if independent
    rows = (mask[1:] & mask[:-1]).float().mean()
    assert float(both) == pytest.approx(0.09, abs=0.003) and float(rows) == pytest.approx(0.09, abs=0.003)
    other = dropout_mask(torch.empty(1000, 1000), 0.3, seed=12) == 0
    assert float((mask & other).float().mean()) == pytest.approx(0.09, abs=0.003)  # the next seed: unrelated


def test_same_seed_same_mask_and_seeds_follow_the_global_rng():
    like = torch.empty(64, 64)
    assert torch.equal(dropout_mask(like, 0.3, 7), dropout_mask(like, 0.3, 7))
    assert not torch.equal(dropout_mask(like, 0.3, 7), dropout_mask(like, 0.3, 8))
    torch.manual_seed(0)
    first = draw_seed()
    torch.manual_seed(0)
    assert draw_seed() == first


def _linear_step(fn, x0, linear, seed=5):
    """Output and gradients of ``fn(x, linear)`` with the RNG at ``seed`` and a fixed output gradient."""
    x = x0.detach().clone().requires_grad_(x0.requires_grad)
    layer = copy.deepcopy(linear)
    torch.manual_seed(seed)
    y = fn(x, layer)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y, x.grad, layer.weight.grad


@pytest.mark.parametrize("shape,needs_x_grad", [((2, 37, 24), True), ((50, 24), True), ((3, 5, 24), False)])
def test_dropout_then_linear_is_bitwise_the_two_modules(shape, needs_x_grad):
    torch.manual_seed(0)
    x0 = torch.randn(shape).requires_grad_(needs_x_grad)
    linear, dropout = nn.Linear(24, 8, bias=False), nn.Dropout(0.3)
    plain = _linear_step(lambda x, lin: lin(dropout(x)), x0, linear)
    ours = _linear_step(lambda x, lin: dropout_then_linear(x, lin, dropout), x0, linear)
    for a, b in zip(plain, ours):
        assert (a is None and b is None) or torch.equal(a, b)


def _kept_bytes(run):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def test_three_adapters_on_one_input_keep_the_input_once_and_byte_masks():
    """q/k/v-style: three adapters read one input; backward keeps x once plus a 1-byte mask each (plus the
    tiny weights), where the two modules keep dropout(x) and torch's fp32 multiplier per adapter."""
    x = torch.randn(64, 256, requires_grad=True)
    layers = [nn.Linear(256, 4, bias=False) for _ in range(3)]
    dropout = nn.Dropout(0.1)
    weights = sum(layer.weight.numel() * 4 for layer in layers)
    ours = _kept_bytes(lambda: [dropout_then_linear(x, layer, dropout) for layer in layers]) - weights
    plain = _kept_bytes(lambda: [layer(dropout(x)) for layer in layers]) - weights
    assert ours == x.numel() * (4 + 3 * 1)
    assert plain >= 3 * x.numel() * 8


def test_dropout_then_linear_falls_back_where_it_must():
    x = torch.randn(4, 8, requires_grad=True)
    linear = nn.Linear(8, 3, bias=False)
    for dropout in (nn.Dropout(0.0), nn.Dropout(0.2).eval(), nn.Identity()):
        torch.manual_seed(0)
        assert torch.equal(dropout_then_linear(x, linear, dropout), linear(dropout(x)))
    hooked = nn.Linear(8, 3, bias=False)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    torch.manual_seed(0)
    got = dropout_then_linear(x, hooked, nn.Dropout(0.2))
    torch.manual_seed(0)
    assert torch.equal(got, 2 * (nn.functional.linear(nn.functional.dropout(x, 0.2), hooked.weight)))
