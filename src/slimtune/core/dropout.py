"""Dropout that keeps less for backward: seeded masks (regenerated from a seed in backward instead of
stored), and dropout followed by a linear layer that keeps a one-byte mask (:func:`dropout_then_linear`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def draw_seed() -> int:
    """A mask seed from the global RNG, so ``torch.manual_seed`` reproduces it."""
    return int(torch.randint(1 << 62, ()))


# A counter-based generator: element i of a mask hashes (i·φ + seed) mod 2³² with murmur3's 32-bit
# finaliser, in int32 tensor arithmetic (wrapping), so a mask costs a few vectorized passes and no RNG
# state, and is the same on every device. On a CPU it is about 3× cheaper than ``bernoulli_``, which matters
# where a mask is drawn again in backward (LoRA-FA, the fused LoRA node).
_PHI = -1640531535  # 0x9E3779B1, the 32-bit golden-ratio constant, as a signed int32
_M1, _M2 = -2048144789, -1028477387  # murmur3's finaliser multipliers 0x85EBCA6B and 0xC2B2AE35, signed
_CHUNK = 1 << 30  # counters per int32 arange


def _signed32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _xor_shift(h: torch.Tensor, k: int) -> torch.Tensor:
    """``h ^= h >>> k`` (a logical shift: the arithmetic shift's copies of the sign bit masked off)."""
    return h.bitwise_xor_((h >> k) & ((1 << (32 - k)) - 1))


def uniform_bits(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``n`` int32 values, each uniform over all 2³² bit patterns, the i-th a function of (seed, i) only."""
    key = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    parts = []
    for start in range(0, n, _CHUNK):
        h = torch.arange(min(_CHUNK, n - start), dtype=torch.int32, device=device)
        h.mul_(_PHI).add_(_signed32(start * _PHI + key))  # (i·φ + key) mod 2³² for i = start, start + 1, ...
        _xor_shift(h, 16).mul_(_M1)
        _xor_shift(h, 13).mul_(_M2)
        parts.append(_xor_shift(h, 16))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dropout_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Inverted-dropout multiplier shaped like ``like`` (its dtype and device), from ``seed``: each element is
    0 with probability ``p`` (0 ≤ p < 1) and ``1 / (1 - p)`` otherwise, independently."""
    bits = uniform_bits(like.numel(), seed, like.device)
    # read as unsigned u = bits + 2³¹, P(u < p·2³²) = p: keep the rest
    keep = bits >= int(p * (1 << 32)) - (1 << 31)
    return keep.view(like.shape).to(like.dtype).div_(1 - p)


class _DropoutLinear(torch.autograd.Function):
    """``linear(dropout(x), W)`` keeping ``x`` and a one-byte keep mask for backward (see
    :func:`dropout_then_linear`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        if x.device.type == "cpu":  # torch's CPU dropout, draw for draw: a float noise tensor, then x · noise
            noise = torch.empty_like(x).bernoulli_(1 - p)
            keep = noise.bool()
            dropped = x * noise.div_(1 - p)
            del noise
        else:  # the fused kernel torch's dropout uses on GPUs
            dropped, keep = torch.native_dropout(x, p, True)
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.p = p
        ctx.save_for_backward(x, keep, weight)
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, keep, weight = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        grad_x = grad_w = None
        with torch.autocast(kind, dtype=dtype, enabled=enabled):  # the forward's matmul dtypes
            if ctx.needs_input_grad[0]:  # as torch: dL/d(dropped) = g W, then the dropout's backward
                grad_x = _dropped(grad @ weight, keep, ctx.p).to(x.dtype)
            if ctx.needs_input_grad[1]:  # as torch's linear: gᵀ dropped over the flattened rows
                dropped = _dropped(x, keep, ctx.p)
                grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(dropped.reshape(-1, dropped.shape[-1]))
                grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None


def _dropped(t: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """``t`` times the dropout multiplier that ``keep`` encodes, with the same arithmetic as torch's dropout."""
    if t.device.type == "cpu":
        return t * keep.to(t.dtype).div_(1 - p)
    return torch.ops.aten.native_dropout_backward(t, keep, 1.0 / (1 - p))


def dropout_then_linear(x: torch.Tensor, linear: nn.Module, dropout: nn.Module) -> torch.Tensor:
    """``linear(dropout(x))`` with the same values and random draws, but what backward keeps is ``x`` (shared
    by every adapter reading the same input, and often kept by the model anyway) and a one-byte mask, not
    ``dropout(x)`` plus torch's float multiplier: 1 byte per element and adapter instead of 8 (fp32).
    Anything else (no dropout, eval mode, a custom layer, hooks) runs the two modules as they are."""
    if (isinstance(dropout, nn.Dropout) and dropout.training and 0 < dropout.p < 1 and not dropout.inplace
            and type(linear) is nn.Linear and linear.bias is None and torch.is_grad_enabled()
            and not (linear._forward_hooks or linear._forward_pre_hooks) and x.device.type in ("cpu", "cuda")):
        return _DropoutLinear.apply(x, linear.weight, dropout.p)
    return linear(dropout(x))
