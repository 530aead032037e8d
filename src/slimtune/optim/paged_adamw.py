"""Paged AdamW: optimizer states kept in pinned CPU memory and moved to the parameter's device per step.

AdamW (Loshchilov & Hutter, arXiv:1711.05101), exactly torch.optim.AdamW's single-tensor arithmetic::

    p ← p · (1 − lr·λ)
    m ← lerp(m, g, 1 − β1)                  v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)

Paging (the idea of bitsandbytes' paged optimizers, QLoRA §3): states of tensors with at least
``min_paged_size`` elements (bitsandbytes' 1e5) live in page-locked host memory; each step copies a
parameter's states to its GPU, updates, and copies them back asynchronously, so GPU memory holds one
parameter's states at a time instead of all of them (2 × 4 bytes per trainable weight in fp32).
Smaller states stay on the device. On a CPU-only machine nothing moves: this is plain AdamW, and its
updates equal ``torch.optim.AdamW(foreach=False)`` bit for bit.

:class:`PagedStateOptimizer` is the shared base (state placement, state_dict round trip) of this and of
:class:`slimtune.optim.adamw_8bit.AdamW8bit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["PagedStateOptimizer", "PagedAdamW", "adamw_step_"]

MIN_PAGED_SIZE = 100_000


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr={lr!r} must be a non-negative number")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999)")
    if eps < 0:
        raise ValueError(f"eps={eps!r} must be ≥ 0 (typically 1e-8)")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r} must be ≥ 0")


@torch.no_grad()
def adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: float, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of ``p``, ``m``, ``v`` in place, in torch.optim.AdamW's order of operations."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bias_correction1))


class PagedStateOptimizer(torch.optim.Optimizer):
    """Base of slimtune's optimizers: each state tensor has a home (the parameter's device, or pinned CPU
    memory when paged) and is fetched to the parameter's device for the update."""

    def __init__(self, params, defaults: dict[str, Any], paged: bool, min_paged_size: int) -> None:
        if min_paged_size < 0:
            raise ValueError(f"min_paged_size={min_paged_size!r} must be ≥ 0 elements")
        self.paged, self.min_paged_size = bool(paged), int(min_paged_size)
        super().__init__(params, defaults)

    @staticmethod
    def on_accelerator(p: torch.Tensor) -> bool:
        """Whether ``p`` lives in accelerator memory (the seam the CPU tests turn on to watch the paging)."""
        return p.device.type != "cpu"

    def pages(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s states live in host memory between steps and travel to ``p`` for each update."""
        return self.paged and self.on_accelerator(p) and p.numel() >= self.min_paged_size

    def state_home(self, p: torch.Tensor) -> torch.device:
        """Where ``p``'s states live between steps."""
        return torch.device("cpu") if self.pages(p) else p.device

    def new_state(self, p: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled state tensor at ``p``'s home (page-locked when it is host memory for a GPU tensor)."""
        home = self.state_home(p)
        pinned = home.type == "cpu" and p.device.type == "cuda"
        return torch.zeros(shape, dtype=dtype, device=home, pin_memory=pinned)

    def fetch(self, p: torch.Tensor, home: torch.Tensor) -> torch.Tensor:
        """The state ``home`` where ``p``'s update runs: a fresh working copy when paged, else ``home`` itself."""
        if not self.pages(p):
            return home
        return home.to(p.device, non_blocking=True, copy=True)

    def put_back(self, p: torch.Tensor, home: torch.Tensor, working: torch.Tensor) -> None:
        """Write an updated working copy back to its home (ordered before the next fetch on this stream)."""
        if working is not home:
            home.copy_(working, non_blocking=True)

    def store(self, p: torch.Tensor, state: dict, key: str, value: torch.Tensor) -> None:
        """Make ``value`` (a new tensor on ``p``'s device) the state ``key``, at the state's home."""
        if self.pages(p):
            state[key].copy_(value, non_blocking=True)
        else:
            state[key] = value

    def state_dict(self) -> dict[str, Any]:
        if self.paged and torch.cuda.is_available():
            torch.cuda.synchronize()  # asynchronous copies into host memory must land before it is read
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating-point states to the parameter's dtype and device; keep each state's own
        dtype (8-bit codes, fp32 scales) and home instead."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            p = params[index]
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    home = self.new_state(p, value.shape, value.dtype)
                    home.copy_(value)
                    self.state[p][key] = home

    def _grads(self) -> Iterable[tuple[dict, torch.Tensor, torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use "
                                       "torch.optim.SparseAdam for sparse embeddings")
                if torch.is_complex(p):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
                yield group, p, p.grad

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, grad in self._grads():
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                self._init_state(p, state)
            state["step"] += 1
            self._update(group, p, grad, state, state["step"].item())
        return loss

    def _init_state(self, p: torch.Tensor, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict, step: float) -> None:
        raise NotImplementedError  # pragma: no cover - abstract


class PagedAdamW(PagedStateOptimizer):
    """AdamW with states in pinned CPU memory (see the module docstring). torch.optim.AdamW's defaults."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, paged: bool = True, min_paged_size: int = MIN_PAGED_SIZE) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), paged,
                         min_paged_size)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        # fp32 moments whatever the parameter's dtype (bitsandbytes' PagedAdamW32bit, "paged_adamw_32bit")
        state["exp_avg"] = self.new_state(p, p.shape, torch.float32)
        state["exp_avg_sq"] = self.new_state(p, p.shape, torch.float32)

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict, step: float) -> None:
        m, v = self.fetch(p, state["exp_avg"]), self.fetch(p, state["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        p32 = p if p.dtype == torch.float32 else p.float()  # a bf16 weight is updated in fp32, then rounded
        adamw_step_(p32, grad.float(), m, v, step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        if p32 is not p:
            p.copy_(p32)
        self.put_back(p, state["exp_avg"], m)
        self.put_back(p, state["exp_avg_sq"], v)
