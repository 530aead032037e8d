"""Paged AdamW: torch.optim.AdamW's updates exactly; states in pinned host memory on a GPU machine."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from slimtune.optim import PagedAdamW, make_optimizer
from slimtune.optim.adamw_8bit import AdamW8bit


def _params(*shapes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(device)) for s in shapes]


def _steps(optimizers, groups, steps=5):
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for params in zip(*groups):
            grad = torch.randn(params[0].shape, generator=g).to(params[0].device)
            for p in params:
                p.grad = grad.clone()
        for opt in optimizers:
            opt.step()


@pytest.mark.parametrize("foreach", [False, None])
def test_updates_equal_torch_adamw_exactly(foreach):
    ours = _params((13, 7), (50,), (3, 3))
    exact = copy.deepcopy(ours)

    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:2], "weight_decay": 0.0}, {"params": ps[2:], "lr": 3e-2}]

    opt = make_optimizer("paged_adamw", groups(ours), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(groups(exact), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=foreach)
    _steps([opt, ref], [ours, exact], steps=6)
    for p, q in zip(ours, exact):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
        assert opt.state[p]["exp_avg"].device.type == "cpu"


def test_bf16_parameters_keep_fp32_moments_and_update_in_fp32():
    """As bitsandbytes' PagedAdamW32bit ("paged_adamw_32bit"): the moments of a bf16 weight are fp32 and the update
    is computed in fp32 from the fp32 copy of the weight, then rounded once."""
    ours = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params((16, 9))]
    exact = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt, ref = PagedAdamW(ours, lr=1e-2), torch.optim.AdamW(exact, lr=1e-2)
    for p, q in zip(ours, exact):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
        p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt.step()
    ref.step()
    assert opt.state[ours[0]]["exp_avg"].dtype == opt.state[ours[0]]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(opt.state[ours[0]]["exp_avg_sq"], ref.state[exact[0]]["exp_avg_sq"])
    assert torch.equal(ours[0], exact[0].to(torch.bfloat16))


def test_state_dict_round_trip_and_loading_torch_adamw_state():
    ours = _params((8, 8))
    opt = PagedAdamW(ours, lr=1e-2)
    _steps([opt], [ours], steps=2)
    twin = copy.deepcopy(ours)
    loaded = PagedAdamW(twin, lr=1e-2)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps([opt, loaded], [ours, twin], steps=2)
    assert torch.equal(ours[0], twin[0])
    exact = copy.deepcopy(ours)
    ref = torch.optim.AdamW(exact, lr=1e-2)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # same state names as torch's AdamW
    _steps([opt, ref], [ours, exact], steps=1)
    assert torch.equal(ours[0], exact[0])


def test_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="lr=-1"):
        PagedAdamW(_params((2,)), lr=-1)
    with pytest.raises(ValueError, match="min_paged_size=-5"):
        PagedAdamW(_params((2,)), min_paged_size=-5)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = PagedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.gpu
def test_gpu_states_live_in_pinned_host_memory_and_updates_match():
    big, small = _params((400, 300), (64,), device="cuda")  # 120,000 ≥ 100,000 elements: paged
    exact = [copy.deepcopy(big), copy.deepcopy(small)]
    opt = PagedAdamW([big, small], lr=1e-2)
    ref = torch.optim.AdamW(exact, lr=1e-2, foreach=False)
    _steps([opt, ref], [[big, small], exact], steps=3)
    torch.cuda.synchronize()
    assert opt.state[big]["exp_avg"].device.type == "cpu" and opt.state[big]["exp_avg"].is_pinned()
    assert opt.state[small]["exp_avg"].device.type == "cuda"
    assert torch.equal(big, exact[0]) and torch.equal(small, exact[1])
    eight = make_optimizer("paged_adamw_8bit", [copy.deepcopy(big)], lr=1e-2)
    _steps([eight], [list(eight.param_groups[0]["params"])], steps=1)
    assert next(iter(eight.state.values()))["exp_avg_codes"].is_pinned()


class _Watched(PagedAdamW):
    """PagedAdamW on a machine where the CPU parameters count as accelerator tensors: the real paging code
    runs (working copies fetched, updated and written back), and every working copy is recorded."""

    on_accelerator = staticmethod(lambda p: True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.working = []  # (parameter, weak reference to a fetched working copy)

    def fetch(self, p, home):
        working = super().fetch(p, home)
        if working is not home:
            # only one parameter's working states exist at a time: the previous parameter's are gone
            assert all(q is p or ref() is None for q, ref in self.working), "working copies outlive their update"
            self.working.append((p, weakref.ref(working)))
        return working


@pytest.mark.parametrize("cls", [_Watched, PagedAdamW])
def test_paged_states_live_at_home_and_travel_once_per_step(cls):
    """What paging must do, checked through the device-independent seam: big states stay in their home
    tensors (the same objects every step), each step fetches one working copy per state of each paged
    parameter, writes it back, and frees it before the next parameter; small states never move."""
    big, small = _params((400, 300), (64,))  # 120,000 ≥ 100,000 elements: paged
    exact = [copy.deepcopy(big), copy.deepcopy(small)]
    opt = cls([big, small], lr=1e-2)
    ref = torch.optim.AdamW(exact, lr=1e-2, foreach=False)
    _steps([opt, ref], [[big, small], exact], steps=1)
    homes = {k: opt.state[big][k] for k in ("exp_avg", "exp_avg_sq")}
    _steps([opt, ref], [[big, small], exact], steps=2)
    assert torch.equal(big, exact[0]) and torch.equal(small, exact[1])
    for key, home in homes.items():
        assert opt.state[big][key] is home  # updated in place through put_back, never replaced
        assert torch.equal(home, ref.state[exact[0]][key])
    if cls is _Watched:
        assert opt.pages(big) and not opt.pages(small)
        assert [p is big for p, _ in opt.working] == [True] * 6  # 2 states × 3 steps, none for the small one
        assert all(ref() is None for _, ref in opt.working)
    else:  # on the CPU nothing is paged: plain AdamW, no copies
        assert not opt.pages(big) and opt.state_home(big).type == "cpu"


def test_paged_8bit_states_are_written_back_into_their_homes():
    class Watched8bit(AdamW8bit):
        on_accelerator = staticmethod(lambda p: True)

    big = _params((400, 300))
    plain = copy.deepcopy(big)
    opt = Watched8bit(big, lr=1e-2, paged=True)
    ref = make_optimizer("adamw_8bit", plain, lr=1e-2)
    _steps([opt, ref], [big, plain], steps=1)
    homes = {k: v for k, v in opt.state[big[0]].items() if k != "step"}
    _steps([opt, ref], [big, plain], steps=2)
    assert torch.equal(big[0], plain[0])
    for key, home in homes.items():
        assert opt.state[big[0]][key] is home
        assert torch.equal(home, ref.state[plain[0]][key])
