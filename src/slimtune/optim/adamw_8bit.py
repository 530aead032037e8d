"""8-bit AdamW: the two Adam moments stored block-wise quantized with dynamic maps (1 byte + 4/256 per weight).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (arXiv:2110.02861), as bitsandbytes'
``AdamW8bit`` implements it:

- each moment is cut into blocks of 256 contiguous values with one fp32 absmax per block;
  m (signed) uses the signed 8-bit dynamic map, v (non-negative) the unsigned one, so small values keep
  relative precision (dynamic exponent) and an outlier only costs precision in its own block;
- a step dequantizes, applies the fp32 AdamW update and quantizes again::

      m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
      p ← p·(1 − lr·λ) − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
      (codes, absmax) ← quantize_blockwise(m, signed map), quantize_blockwise(v, unsigned map)

  in bitsandbytes' CPU arithmetic, so states and parameters follow ``bnb.optim.AdamW8bit`` on CPU bit for
  bit; the quantizer is :func:`slimtune.quant.nf4.quantize_blockwise` (bit-identical to bitsandbytes');
- tensors with fewer than ``min_8bit_size`` (4096) elements keep fp32 moments and torch.optim.AdamW's
  exact update (biases, norms: negligible memory, quantization would only add noise).

State memory: 2 × (1 + 4/256) = 2.03 bytes per weight instead of 8 for fp32 moments (3.9× less).
``paged=True`` additionally keeps the states in pinned CPU memory (see :mod:`.paged_adamw`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from slimtune.optim.paged_adamw import MIN_PAGED_SIZE, PagedStateOptimizer, adamw_step_, check_hyperparameters
from slimtune.quant.codebooks import dynamic_map_on
from slimtune.quant.nf4 import dynamic_lut, quantize_blockwise

__all__ = ["AdamW8bit", "BLOCK_SIZE", "MIN_8BIT_SIZE", "quantize_state", "dequantize_state"]

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


def quantize_state(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 like x, absmax fp32 (ceil(n / 256),))`` with the (un)signed dynamic map (its tables
    are built once per device: no host round trip per step)."""
    return quantize_blockwise(x, blocksize=BLOCK_SIZE, lut=dynamic_lut(signed, str(x.device)))


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """``map[code] · absmax[i // 256]`` in fp32, shaped like ``codes``."""
    values = torch.index_select(dynamic_map_on(signed, str(codes.device)), 0, codes.reshape(-1).int())
    n = values.numel()
    full = n - n % BLOCK_SIZE
    values[:full].view(-1, BLOCK_SIZE).mul_(absmax[: full // BLOCK_SIZE, None])
    if full < n:
        values[full:].mul_(absmax[-1])
    return values.view(codes.shape)


class AdamW8bit(PagedStateOptimizer):
    """AdamW with block-wise 8-bit moments (see the module docstring). Defaults as torch.optim.AdamW /
    bitsandbytes (``weight_decay=1e-2``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE, paged: bool = False,
                 min_paged_size: int = MIN_PAGED_SIZE, full_precision: Iterable[torch.Tensor] = ()) -> None:
        check_hyperparameters(lr, betas, eps, weight_decay)
        self.full_precision = {id(p) for p in full_precision}  # fp32 moments whatever the size (embeddings)
        if min_8bit_size < 0:
            raise ValueError(f"min_8bit_size={min_8bit_size!r} must be ≥ 0 elements (bitsandbytes uses 4096)")
        self.min_8bit_size = int(min_8bit_size)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), paged,
                         min_paged_size)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        if p.numel() < self.min_8bit_size or id(p) in self.full_precision:
            state["exp_avg"] = self.new_state(p, p.shape, torch.float32)
            state["exp_avg_sq"] = self.new_state(p, p.shape, torch.float32)
            return
        blocks = -(-p.numel() // BLOCK_SIZE)
        for name in ("exp_avg", "exp_avg_sq"):
            state[f"{name}_codes"] = self.new_state(p, p.shape, torch.uint8)
            state[f"{name}_absmax"] = self.new_state(p, (blocks,), torch.float32)

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, state: dict, step: float) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        p32 = p if p.dtype == torch.float32 else p.float()
        if "exp_avg" in state:  # small tensor: fp32 moments, torch's update
            m, v = self.fetch(p, state["exp_avg"]), self.fetch(p, state["exp_avg_sq"])
            adamw_step_(p32, grad.float(), m, v, step, lr, beta1, beta2, eps, wd)
            self.put_back(p, state["exp_avg"], m)
            self.put_back(p, state["exp_avg_sq"], v)
        else:
            self._step_8bit(p, state, p32, grad.float(), step, lr, beta1, beta2, eps, wd)
        if p32 is not p:
            p.copy_(p32)

    def _step_8bit(self, param: torch.Tensor, state: dict, p: torch.Tensor, g: torch.Tensor, step: float,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
        """``p`` is ``param`` in fp32 (the same tensor when it already is)."""
        fetched = {k: self.fetch(param, state[k]) for k in
                   ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")}
        m = dequantize_state(fetched["exp_avg_codes"], fetched["exp_avg_absmax"], signed=True)
        v = dequantize_state(fetched["exp_avg_sq_codes"], fetched["exp_avg_sq_absmax"], signed=False)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        correction1 = 1 - beta1**step
        correction2 = math.sqrt(1 - beta2**step)
        denom = (v.sqrt() / correction2).add_(eps)
        if weight_decay > 0:
            p.mul_(1 - lr * weight_decay)
        p.addcdiv_(m, denom, value=-lr / correction1)
        for name, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            codes, absmax = quantize_state(value, signed)
            self.store(param, state, f"{name}_codes", codes)
            self.store(param, state, f"{name}_absmax", absmax)
