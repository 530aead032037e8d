"""Triton kernel: block-wise 4-bit dequantization with the double-quantized scales decoded in the same pass.

One program decodes ``NB`` whole quantization blocks (``NB · blocksize / 2`` packed bytes)::

    byte  = packed[b]                      # element 2b in the high nibble, 2b + 1 in the low one
    scale = dmap[c[blk]] · absmax2[blk // 256] + offset     (double quant; else absmax[blk], fp32)
    out[2b], out[2b + 1] = code[byte >> 4] · scale, code[byte & 15] · scale   (fp32, then cast)

Traffic per weight: 0.5 byte read + 1/blocksize byte of scale codes + the output (2 bytes in bf16), so the
effective bandwidth is ``(n/2 + n/blocksize + 2n) / time`` (the bench's figure; copy bandwidth is the limit).
The arithmetic is the reference's (fp32 multiply, then the offset add; FMA contraction disabled), so the
result is bit-identical to :func:`slimtune.quant.nf4.dequantize_4bit`.

Imported only by :mod:`slimtune.perf.kernels` once Triton is known to be usable.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from slimtune.quant.nf4 import NESTED_BLOCKSIZE

# Packed bytes per program: 4096 bytes = 8192 weights; large enough to amortize the scale loads,
# small enough for several programs per SM on a 14336 x 4096 weight (7168 programs).
BYTES_PER_PROGRAM = 4096


@triton.jit
def block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, mask,
                DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr):
    """fp32 scale of quantization block(s) ``blk``: ``absmax[blk]`` or its double-quantized decoding."""
    if DOUBLE_QUANT:
        c = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(nested_code_ptr + c, mask=mask, other=0.0) * tl.load(nested_absmax_ptr + blk // NESTED,
                                                                          mask=mask, other=0.0)
        s = s + tl.load(offset_ptr)
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def _dequant_kernel(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
                    n, n_bytes, n_blocks,
                    BLOCKSIZE: tl.constexpr, NB: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
                    WIDE: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2  # packed bytes per quantization block
    pid = tl.program_id(0)
    if WIDE:  # 64-bit offsets only for weights of 2^31 elements or more
        pid = pid.to(tl.int64)
    blk = pid * NB + tl.arange(0, NB)  # (NB,) quantization blocks of this program
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (NB, HALF)
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, blk < n_blocks,
                        DOUBLE_QUANT, NESTED)[:, None]  # (NB, 1)
    hi = tl.load(code_ptr + (packed >> 4)) * scale
    lo = tl.load(code_ptr + (packed & 15)) * scale
    values = tl.interleave(hi, lo)  # (NB, BLOCKSIZE): element 2j from hi[j], 2j + 1 from lo[j]
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, values.to(out_ptr.dtype.element_ty), mask=elem < n)


def scale_args(w) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(absmax, nested_absmax, nested_code, offset)`` for the kernels; dummies without double quantization."""
    if w.double_quant:
        offset = w.nested_offset.reshape(1).float()
        return w.absmax, w.nested_absmax.float(), w.nested_code.float(), offset
    dummy = w.absmax.new_zeros(1, dtype=torch.float32)
    return w.absmax.float(), dummy, dummy, dummy


# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# Offsets are 32-bit (cheaper address arithmetic) unless a tensor of the launch has this many elements.
WIDE_FROM = 2**31


def wide(*numels: int) -> bool:
    """Whether a launch over tensors of these sizes needs 64-bit offsets."""
    return max(numels) >= WIDE_FROM


def interpreting() -> bool:
    return INTERPRETED


def launch_options() -> dict:
    """Compile options: no FMA contraction (bit-exact scales); the interpreter takes none."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The interpreter truncates fp32 → bf16 (numpy has no bf16) where the GPU rounds to nearest even:
    under it, bf16 results are produced in fp32 and rounded by torch."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def dequantize_4bit_triton(w, dtype: torch.dtype) -> torch.Tensor:
    """Kernel version of :func:`slimtune.perf.kernels.dequantize_4bit` (same arguments, same bits)."""
    out_f, in_f = w.shape
    n = out_f * in_f
    n_blocks = -(-n // w.blocksize)
    if w.absmax.numel() != n_blocks or w.packed.numel() != (n + 1) // 2:
        raise ValueError(f"4-bit state does not fit shape {tuple(w.shape)} with blocksize {w.blocksize}: "
                         f"{w.packed.numel()} bytes, {w.absmax.numel()} scales")
    out = torch.empty(w.shape, dtype=kernel_dtype(dtype), device=w.packed.device)
    nb = max(1, BYTES_PER_PROGRAM // (w.blocksize // 2))  # blocksize ≤ 4096, so nb ≥ 2 and a power of two
    absmax, nested_absmax, nested_code, offset = scale_args(w)
    grid = (triton.cdiv(n_blocks, nb),)
    _dequant_kernel[grid](w.packed, w.code.float(), absmax, nested_absmax, nested_code, offset, out,
                          n, w.packed.numel(), n_blocks, BLOCKSIZE=w.blocksize, NB=nb,
                          DOUBLE_QUANT=w.double_quant, NESTED=NESTED_BLOCKSIZE, WIDE=wide(n), **launch_options())
    return out.to(dtype)
