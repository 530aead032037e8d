"""Triton kernel: 4-bit matrix-vector product for batch-1 generation, ``y = W x`` with W ``(out, in)`` packed.

Generation at batch 1 is bound by reading the weight, so the kernel reads every packed byte exactly once
and never writes a dequantized copy: one program owns ``BN`` output rows and walks ``in`` in chunks of
``BKH`` bytes (``2·BKH`` weights)::

    byte = packed[o · in/2 + j]          # weights (o, 2j) in the high nibble, (o, 2j + 1) in the low one
    y[o] += Σ_block scale[block] · Σ_(j in block) (code[byte >> 4] · x[2j] + code[byte & 15] · x[2j + 1])

in fp32, with the double-quantized scales decoded in place (1/blocksize byte per weight instead of
4/blocksize): when ``in`` is a multiple of the block size, each block's scale is decoded once per row
and applied to the block's partial sum (two code look-ups per byte, not two plus three for its scale).
Traffic: 0.5 + 1/64 byte per weight for NF4 + DQ at blocksize 64, against 2 bytes for a
bf16 weight, so the bandwidth limit is ~3.9× a bf16 GEMV. ``in_features`` must be even (a byte never
straddles two rows) and there may be up to 16 rows of x (the second grid axis).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.perf.kernels.nf4_dequant import block_scale, interpreting, kernel_dtype, scale_args, wide
from slimtune.quant.nf4 import NESTED_BLOCKSIZE


@triton.jit
def _gemv_4bit_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, y_ptr,
                      N, K, stride_xm, stride_ym,
                      BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
                      ALIGNED: tl.constexpr, WIDE: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)  # row of x
    o = pid_n * BN + tl.arange(0, BN)  # (BN,) output features
    if WIDE:  # 64-bit offsets only for tensors of 2^31 elements or more
        o, row = o.to(tl.int64), row.to(tl.int64)
    half_k = K // 2
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per quantization block
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j0 in range(0, half_k, BKH):
        j = j0 + tl.arange(0, BKH)  # (BKH,) byte column
        mask = (o[:, None] < N) & (j[None, :] < half_k)
        packed = tl.load(packed_ptr + o[:, None] * half_k + j[None, :], mask=mask, other=0).to(tl.int32)
        x_even = tl.load(x_ptr + row * stride_xm + 2 * j, mask=j < half_k, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row * stride_xm + 2 * j + 1, mask=j < half_k, other=0.0).to(tl.float32)
        part = tl.load(code_ptr + (packed >> 4)) * x_even[None, :] + tl.load(code_ptr + (packed & 15)) * x_odd[None, :]
        if ALIGNED and HALF >= BKH:  # the step's bytes of a row lie in one block: one scale per row
            blk = (o * K + 2 * j0) // BLOCKSIZE
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, o < N,
                                DOUBLE_QUANT, NESTED)
            acc += tl.sum(part, axis=1) * scale
        elif ALIGNED:  # BKH / HALF whole blocks per row: one scale per block
            KB: tl.constexpr = BKH // HALF
            kb = tl.arange(0, KB)[None, :]
            blk = (o[:, None] * K + 2 * j0) // BLOCKSIZE + kb  # (BN, KB)
            # a last step's blocks past the row's end are the next row's, or past the last scale: not read
            inside = (o[:, None] < N) & (2 * j0 + kb * BLOCKSIZE < K)
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, blk, inside,
                                DOUBLE_QUANT, NESTED)
            acc += tl.sum(tl.sum(tl.reshape(part, (BN, KB, HALF)), axis=2) * scale, axis=1)
        else:  # rows not made of whole blocks: the scale of each byte
            b = o[:, None] * half_k + j[None, :]
            scale = block_scale(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, (2 * b) // BLOCKSIZE,
                                mask, DOUBLE_QUANT, NESTED)
            acc += tl.sum(part * scale, axis=1)
    tl.store(y_ptr + row * stride_ym + o, acc.to(y_ptr.dtype.element_ty), mask=o < N)


def gemv_4bit_triton(x: torch.Tensor, w) -> torch.Tensor:
    """Kernel version of :func:`slimtune.perf.kernels.gemv_4bit` (same arguments)."""
    out_f, in_f = w.shape
    xs = x.reshape(-1, in_f)
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    rows = xs.shape[0]
    out = torch.empty((*x.shape[:-1], out_f), dtype=kernel_dtype(x.dtype), device=x.device)  # never a view
    y = out.view(rows, out_f)
    absmax, nested_absmax, nested_code, offset = scale_args(w)
    bn, bkh = (16, 128) if interpreting() else (8, 256)
    grid = (triton.cdiv(out_f, bn), rows)
    if rows and out_f:
        _gemv_4bit_kernel[grid](xs, w.packed, w.code.float(), absmax, nested_absmax, nested_code, offset, y,
                                out_f, in_f, xs.stride(0), y.stride(0), BLOCKSIZE=w.blocksize,
                                DOUBLE_QUANT=w.double_quant, NESTED=NESTED_BLOCKSIZE, ALIGNED=in_f % w.blocksize == 0,
                                WIDE=wide(out_f * in_f, xs.numel(), y.numel()), BN=bn, BKH=bkh)
    return out.to(x.dtype)
