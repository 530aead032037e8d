"""8-bit AdamW: state quantization and whole trajectories bit for bit against bitsandbytes on CPU,
and close to (not equal to) torch.optim.AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import bitsandbytes_oracle

from slimtune.optim import AdamW8bit, make_optimizer, state_bytes
from slimtune.optim.adamw_8bit import dequantize_state, quantize_state


@pytest.fixture(scope="module")
def bnb():
    return bitsandbytes_oracle()


def _params(*shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(*s, generator=g) * 0.1).to(dtype)) for s in shapes]


def _set_grads(groups, seed):
    g = torch.Generator().manual_seed(seed)
    for params in zip(*groups):
        grad = torch.randn(params[0].shape, generator=g) * 0.01
        for p in params:
            p.grad = grad.to(p.dtype).clone()


@pytest.mark.parametrize("signed", [True, False])
def test_state_quantization_is_bitsandbytes_bit_for_bit(bnb, signed):
    F = bnb.functional
    x = torch.randn(70_001, generator=torch.Generator().manual_seed(1)) * 1e-3
    x[1000:1256] = 0.0  # an all-zero block
    if not signed:
        x = x.square()  # second moments are non-negative
    codes, absmax = quantize_state(x, signed)
    ref_codes, ref_state = F.quantize_blockwise(x, code=F.create_dynamic_map(signed=signed), blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)
    assert torch.equal(dequantize_state(codes, absmax, signed), F.dequantize_blockwise(ref_codes, ref_state))


def test_trajectory_is_bitsandbytes_adamw8bit_bit_for_bit(bnb):
    ours = _params((130, 70), (5000,))  # both ≥ 4096 elements: 8-bit states; one has a short last block
    theirs = copy.deepcopy(ours)
    opt = AdamW8bit(ours, lr=1e-2, weight_decay=0.1)
    ref = bnb.optim.AdamW8bit(theirs, lr=1e-2, weight_decay=0.1)
    for step in range(6):
        _set_grads([ours, theirs], step)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_codes"], ref.state[q]["state1"])
        assert torch.equal(opt.state[p]["exp_avg_sq_codes"], ref.state[q]["state2"])
        assert torch.equal(opt.state[p]["exp_avg_absmax"], ref.state[q]["absmax1"])


def test_close_to_fp32_adamw_but_not_equal():
    ours = _params((64, 128))
    exact = copy.deepcopy(ours)
    opt = make_optimizer("adamw_8bit", ours, lr=1e-3)
    ref = torch.optim.AdamW(exact, lr=1e-3)
    for step in range(20):
        _set_grads([ours, exact], step)
        opt.step()
        ref.step()
    moved = (exact[0] - _params((64, 128))[0]).abs().mean()
    error = (ours[0] - exact[0]).abs().mean()
    assert opt.state[ours[0]]["exp_avg_codes"].dtype == torch.uint8
    assert 0 < error < 0.05 * moved, (error, moved)  # quantization is felt, and small (1.5% here)


def test_small_tensors_keep_fp32_states_and_torch_arithmetic():
    ours = _params((10, 20), (7,))
    exact = copy.deepcopy(ours)
    opt = AdamW8bit(ours, lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW(exact, lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(4):
        _set_grads([ours, exact], step)
        opt.step()
        ref.step()
    for p, q in zip(ours, exact):
        assert torch.equal(p, q)
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_state_bytes_are_a_quarter_of_fp32():
    ours = _params((256, 1024))
    exact = copy.deepcopy(ours)
    opt, ref = AdamW8bit(ours), torch.optim.AdamW(exact)
    _set_grads([ours, exact], 0)
    opt.step()
    ref.step()
    n = 256 * 1024
    assert state_bytes(opt) == 2 * (n + 4 * n // 256)  # codes + one fp32 absmax per 256
    assert state_bytes(ref) == 2 * 4 * n
    assert state_bytes(ref) / state_bytes(opt) > 3.9


def test_state_dict_round_trip_keeps_dtypes_and_continues_identically():
    ours = _params((64, 96), dtype=torch.bfloat16)
    opt = AdamW8bit(ours, lr=1e-2)
    _set_grads([ours], 0)
    opt.step()
    twin = copy.deepcopy(ours)
    loaded = AdamW8bit(twin, lr=1e-2)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    state = loaded.state[twin[0]]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32
    _set_grads([ours, twin], 1)
    opt.step()
    loaded.step()
    assert torch.equal(ours[0], twin[0]) and ours[0].dtype == torch.bfloat16


def test_make_optimizer_names_and_errors():
    p = _params((4, 4))
    assert type(make_optimizer("adamw_torch", p, lr=1e-3)) is torch.optim.AdamW
    assert isinstance(make_optimizer("adamw_bnb_8bit", p, lr=1e-3), AdamW8bit)
    paged = make_optimizer("paged_adamw_8bit", p, lr=1e-3, min_8bit_size=16)
    assert isinstance(paged, AdamW8bit) and paged.paged and paged.min_8bit_size == 16
    with pytest.raises(ValueError, match="unknown optimizer 'adam8'"):
        make_optimizer("adam8", p, lr=1e-3)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['foreach'\]"):
        make_optimizer("adamw_8bit", p, lr=1e-3, foreach=True)
    with pytest.raises(ValueError, match="betas"):
        make_optimizer("adamw_8bit", p, lr=1e-3, betas=(0.9, 1.0))


def test_steps_reuse_one_table_per_map_and_device(monkeypatch):
    """On a GPU, a table built (or moved) per call means a device-to-host sync and a 64 KiB upload per moment,
    parameter and step: every quantization reuses one table per map and device."""
    from slimtune.optim import adamw_8bit

    tables = []
    real = adamw_8bit.quantize_blockwise

    def spy(x, code=None, blocksize=256, lut=None):
        tables.append(None if lut is None or code is not None else id(lut))
        return real(x, code, blocksize, lut)

    monkeypatch.setattr(adamw_8bit, "quantize_blockwise", spy)
    params = [torch.nn.Parameter(torch.randn(64, 128)) for _ in range(3)]
    optimizer = AdamW8bit(params, lr=1e-3)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    assert len(tables) == 3 * 3 * 2 and None not in tables and len(set(tables)) == 2
