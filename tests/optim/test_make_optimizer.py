"""``make_optimizer("adamw")``: torch's fused kernel where it applies (transformers' default too), the same
updates as the per-tensor loop, and the user's own choice kept."""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.optim import make_optimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((16, 8), (8,), (3, 5))]


def _run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 4) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


@pytest.mark.parametrize("name", ["adamw", "adamw_torch", "adamw_torch_fused"])
def test_plain_cpu_tensors_get_the_fused_kernel_with_the_loops_updates(name):
    ours, loop = _params(), _params()
    fused = make_optimizer(name, ours, lr=1e-2, weight_decay=0.1)
    assert fused.param_groups[0]["fused"] is True
    _run(fused, ours)
    _run(torch.optim.AdamW(loop, lr=1e-2, weight_decay=0.1, foreach=False), loop)
    for p, q in zip(ours, loop):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_groups_and_generators_are_read_once_and_all_fused():
    params = _params()
    groups = [{"params": (p for p in params[:2])}, {"params": params[2], "weight_decay": 0.0}]
    opt = make_optimizer("adamw", groups, lr=1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert all(g["fused"] for g in opt.param_groups)


def test_the_users_choice_and_unsupported_tensors_keep_torchs_default():
    assert not make_optimizer("adamw", _params(), lr=1e-3, foreach=False).param_groups[0]["fused"]
    assert not make_optimizer("adamw", _params(), lr=1e-3, fused=False).param_groups[0]["fused"]
    meta = [torch.nn.Parameter(torch.empty(4, device="meta"))]
    assert not make_optimizer("adamw", meta, lr=1e-3).param_groups[0]["fused"]
    mixed = _params() + meta  # one tensor the kernel cannot take: none fused
    assert not make_optimizer("adamw", copy.copy(mixed), lr=1e-3).param_groups[0]["fused"]
