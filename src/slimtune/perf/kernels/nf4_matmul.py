"""Triton kernel: matmul with a 4-bit weight dequantized tile by tile (the weight is never materialized).

``C = A · op(W)`` with W ``(out, in)`` stored packed (row-major, two codes per byte, first in the high
nibble) and ``op(W) = Wᵀ`` (forward, A ``(M, in)``) or ``W`` (backward's ``dL/dx = dL/dy · W``,
A ``(M, out)``). Both read the same storage: element ``(o, i)`` of W is code number ``e = o · in + i``::

    w[r, p] = code[nibble(packed[e // 2], e % 2)] · scale[e // blocksize]     e = r·stride_r + p·stride_p

with ``(stride_r, stride_p) = (1, in)`` for Wᵀ and ``(in, 1)`` for W. Each program owns a ``BM × BP``
tile of C and walks the reduction in ``BR`` steps: load the A tile, decode the W tile in registers,
``tl.dot`` with fp32 accumulation. Programs are ordered in groups of ``GROUP_M`` row tiles so the
W tiles they share stay in L2. The fp32 block scales (``nblocks`` values, double quantization
decoded once) come from :meth:`Weight4bit.block_scales`.

Cost model (training shapes, M = tokens): the matmul's ``2·M·in·out`` FLOPs dominate; the decode adds
a few integer ops per weight per row tile. The alternative, dequantize (bandwidth bound) + cuBLAS,
writes and reads W once in 16 bits; which wins depends on M and is measured by ``bench/kernels.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.perf.kernels.nf4_dequant import interpreting, kernel_dtype


@triton.jit
def _matmul_4bit_kernel(a_ptr, packed_ptr, code_ptr, scale_ptr, c_ptr, M, P, R,
                        stride_am, stride_ar, stride_cm, stride_cp, W_STRIDE_R, W_STRIDE_P,
                        BLOCKSIZE: tl.constexpr, PRECISION: tl.constexpr,
                        BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_p = tl.cdiv(P, BP)
    per_group = GROUP_M * tiles_p
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_p = (pid % per_group) // group_m

    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # (BM,) rows of A and C
    rp = (pid_p * BP + tl.arange(0, BP)).to(tl.int64)  # (BP,) columns of C
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = (r0 + tl.arange(0, BR)).to(tl.int64)  # (BR,) reduction index
        a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # (BM, BR)
        w_mask = (rr[:, None] < R) & (rp[None, :] < P)
        e = rr[:, None] * W_STRIDE_R + rp[None, :] * W_STRIDE_P  # (BR, BP) code number in W
        byte = tl.load(packed_ptr + e // 2, mask=w_mask, other=0).to(tl.int32)
        nibble = (byte >> (4 - 4 * (e % 2)).to(tl.int32)) & 15  # even e: high nibble
        w = tl.load(code_ptr + nibble) * tl.load(scale_ptr + e // BLOCKSIZE, mask=w_mask, other=0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    tl.store(c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rp[None, :] < P))


def _cuda_configs() -> list:
    shapes = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
              (32, 128, 64, 4, 4), (16, 128, 128, 4, 4)]
    return [triton.Config({"BM": bm, "BP": bp, "BR": br, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bp, br, w, s in shapes]


_tuned = None


def _kernel():
    """The autotuned kernel on a GPU; under the interpreter one small fixed tile (autotuning would run all)."""
    global _tuned
    if _tuned is None:
        _tuned = _matmul_4bit_kernel if interpreting() else triton.autotune(
            _cuda_configs(), key=["M", "P", "R", "W_STRIDE_R", "BLOCKSIZE"])(_matmul_4bit_kernel)
    return _tuned


def matmul_4bit_triton(x: torch.Tensor, w, transpose: bool) -> torch.Tensor:
    """Kernel version of :func:`slimtune.perf.kernels.matmul_4bit` (same arguments)."""
    out_f, in_f = w.shape
    a = x.reshape(-1, x.shape[-1])  # (M, R)
    if interpreting() and a.dtype == torch.bfloat16:
        a = a.float()  # the interpreter's tl.dot has no bf16 (numpy): check the indexing in fp32
    m, r = a.shape
    p = out_f if transpose else in_f
    strides = (1, in_f) if transpose else (in_f, 1)
    c = torch.empty((m, p), dtype=kernel_dtype(x.dtype), device=x.device)
    if m and p:
        scales = w.block_scales().contiguous()
        precision = "ieee" if a.dtype == torch.float32 else "tf32"  # fp32 stays fp32, like torch's default
        args = (a, w.packed, w.code.float(), scales, c, m, p, r, a.stride(0), a.stride(1), c.stride(0), c.stride(1),
                *strides)
        if interpreting():
            bm = 16 if m <= 16 else 32
            grid = (triton.cdiv(m, bm) * triton.cdiv(p, 32),)
            _kernel()[grid](*args, BLOCKSIZE=w.blocksize, PRECISION=precision, BM=bm, BP=32, BR=32, GROUP_M=4)
        else:
            def tuned_grid(meta):
                return (triton.cdiv(m, meta["BM"]) * triton.cdiv(p, meta["BP"]),)

            _kernel()[tuned_grid](*args, BLOCKSIZE=w.blocksize, PRECISION=precision)
    return c.to(x.dtype).reshape(*x.shape[:-1], p)
