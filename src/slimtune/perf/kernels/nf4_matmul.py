"""Triton kernel: matmul with a 4-bit weight dequantized tile by tile (the weight is never materialized).

``C = A · op(W)`` with W ``(out, in)`` stored packed (row-major, two codes per byte, first in the high
nibble) and ``op(W) = Wᵀ`` (forward, A ``(M, in)``) or ``W`` (backward's ``dL/dx = dL/dy · W``,
A ``(M, out)``). Both read the same storage: element ``(o, i)`` of W is code number ``e = o · in + i``::

    w[r, p] = code[nibble(packed[e // 2], e % 2)] · scale[e // blocksize]     e = r·stride_r + p·stride_p

with ``(stride_r, stride_p) = (1, in)`` for Wᵀ and ``(in, 1)`` for W. Each program owns a ``BM × BP``
tile of C and walks the reduction in ``BR`` steps: load the A tile, decode the W tile in registers,
``tl.dot`` with fp32 accumulation. Programs are ordered in groups of ``GROUP_M`` row tiles so the
W tiles they share stay in L2.

Decoding a W tile (``in`` even, the usual case): each packed byte is loaded once and yields both of
its codes, split and interleaved along W's contiguous dimension (``in``); with ``in`` a multiple of the
block size, a tile row along ``in`` lies inside one quantization block, so one scale per tile row is
loaded instead of one per element. Odd ``in`` falls back to per-element loads. Offsets are 32-bit
unless a tensor has 2³¹ elements or more.

Cost model (training shapes, M = tokens): the matmul's ``2·M·in·out`` FLOPs dominate; the decode adds
a few integer ops per weight per row tile. The alternative, dequantize (bandwidth bound) + cuBLAS,
writes and reads W once in 16 bits; which wins depends on M and is measured by ``bench/kernels.py``.
Autotuning is keyed on the weight's shape and M rounded up to a power of two, so a new batch shape
does not re-benchmark every configuration.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from slimtune.perf.kernels.nf4_dequant import interpreting, kernel_dtype, wide


@triton.jit
def _scaled(w, scale_ptr, first, lanes, valid, BLOCKSIZE: tl.constexpr, ALONG: tl.constexpr, ACROSS: tl.constexpr,
            COLUMNS: tl.constexpr):
    """``w`` (a tile whose ``ALONG``-long side runs along ``in``, block-aligned) times its block scales: one
    scale per ``BLOCKSIZE`` elements of each lane (``first``: the first code number of each lane; ``valid``:
    how many of a lane's elements lie in its row of W; the blocks past them are the next row's, or past the
    last scale: their scale is 0, so the tile's padding decodes to 0, never to a stray scale's NaN)."""
    if BLOCKSIZE >= ALONG:  # the whole lane lies in one block
        scale = tl.load(scale_ptr + first // BLOCKSIZE, mask=lanes, other=0.0)
        return w * (scale[None, :] if COLUMNS else scale[:, None])
    K: tl.constexpr = ALONG // BLOCKSIZE  # blocks per lane
    k = tl.arange(0, K)[:, None]
    blocks = first[None, :] // BLOCKSIZE + k  # (K, lanes)
    scale = tl.load(scale_ptr + blocks, mask=lanes[None, :] & (k * BLOCKSIZE < valid), other=0.0)
    if COLUMNS:  # w (ALONG, ACROSS): rows along ``in``
        return tl.reshape(tl.reshape(w, (K, BLOCKSIZE, ACROSS)) * scale[:, None, :], (ALONG, ACROSS))
    return tl.reshape(tl.reshape(w, (ACROSS, K, BLOCKSIZE)) * tl.trans(scale)[:, :, None], (ACROSS, ALONG))


@triton.jit
def _decode_tile(packed_ptr, code_ptr, scale_ptr, r0, p0, rr, rp, R, P, IN, BLOCKSIZE: tl.constexpr,
                 TRANSPOSE: tl.constexpr, PAIRS: tl.constexpr, ALIGNED: tl.constexpr,
                 BR: tl.constexpr, BP: tl.constexpr):
    """The fp32 ``(BR, BP)`` tile of op(W) at reduction rows ``rr = r0 + …`` and columns ``rp = p0 + …``."""
    if PAIRS and TRANSPOSE:  # op(W) = Wᵀ: r runs along ``in`` (contiguous): bytes (BP, BR / 2)
        j = r0 // 2 + tl.arange(0, BR // 2)
        mask = (rp[:, None] < P) & (j[None, :] < (R + 1) // 2)
        byte = tl.load(packed_ptr + rp[:, None] * (IN // 2) + j[None, :], mask=mask, other=0).to(tl.int32)
        w = tl.trans(tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15))))  # (BR, BP)
        if ALIGNED:
            return _scaled(w, scale_ptr, rp * IN + r0, rp < P, R - r0, BLOCKSIZE, BR, BP, True)
    elif PAIRS:  # op(W) = W: p runs along ``in`` (contiguous): bytes (BR, BP / 2)
        j = p0 // 2 + tl.arange(0, BP // 2)
        mask = (rr[:, None] < R) & (j[None, :] < (P + 1) // 2)
        byte = tl.load(packed_ptr + rr[:, None] * (IN // 2) + j[None, :], mask=mask, other=0).to(tl.int32)
        w = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15)))  # (BR, BP)
        if ALIGNED:
            return _scaled(w, scale_ptr, rr * IN + p0, rr < R, P - p0, BLOCKSIZE, BP, BR, False)
    else:  # odd ``in``: a byte's two codes may sit in two rows of W, decode element by element
        e = (rp[None, :] * IN + rr[:, None]) if TRANSPOSE else (rr[:, None] * IN + rp[None, :])  # (BR, BP)
        byte = tl.load(packed_ptr + e // 2, mask=(rr[:, None] < R) & (rp[None, :] < P), other=0).to(tl.int32)
        w = tl.load(code_ptr + ((byte >> (4 - 4 * (e % 2))) & 15))
    e = (rp[None, :] * IN + rr[:, None]) if TRANSPOSE else (rr[:, None] * IN + rp[None, :])
    return w * tl.load(scale_ptr + e // BLOCKSIZE, mask=(rr[:, None] < R) & (rp[None, :] < P), other=0.0)


@triton.jit
def _matmul_4bit_kernel(a_ptr, packed_ptr, code_ptr, scale_ptr, c_ptr, M, P, R, IN,
                        stride_am, stride_ar, stride_cm, stride_cp, M_BUCKET,
                        BLOCKSIZE: tl.constexpr, PRECISION: tl.constexpr, TRANSPOSE: tl.constexpr,
                        PAIRS: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
                        BM: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_p = tl.cdiv(P, BP)
    per_group = GROUP_M * tiles_p
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_p = (pid % per_group) // group_m

    rm = pid_m * BM + tl.arange(0, BM)  # (BM,) rows of A and C
    rp = pid_p * BP + tl.arange(0, BP)  # (BP,) columns of C
    if WIDE:
        rm = rm.to(tl.int64)
        rp = rp.to(tl.int64)
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)  # (BR,) reduction index
        if WIDE:
            rr = rr.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rr[None, :] * stride_ar,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # (BM, BR)
        w = _decode_tile(packed_ptr, code_ptr, scale_ptr, r0, pid_p * BP, rr, rp, R, P, IN, BLOCKSIZE, TRANSPOSE,
                         PAIRS, ALIGNED, BR, BP)  # (BR, BP)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    tl.store(c_ptr + rm[:, None] * stride_cm + rp[None, :] * stride_cp, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rp[None, :] < P))


def _cuda_configs() -> list[triton.Config]:
    shapes = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 4),
              (32, 128, 64, 4, 4), (16, 128, 128, 4, 4)]
    return [triton.Config({"BM": bm, "BP": bp, "BR": br, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bp, br, w, s in shapes]


# Tiles the interpreter runs (one small fixed configuration: autotuning would run every one).
INTERPRETER_TILE = {"BM": 16, "BP": 32, "BR": 32, "GROUP_M": 4}
_tuned: dict[str, Any] = {}


def _kernel() -> Any:
    """The autotuned kernel on a GPU (keyed on the weight's shape and M's power-of-two bucket); the plain
    kernel under the interpreter."""
    if "kernel" not in _tuned:
        _tuned["kernel"] = _matmul_4bit_kernel if interpreting() else triton.autotune(
            _cuda_configs(), key=["M_BUCKET", "P", "R", "TRANSPOSE", "BLOCKSIZE"])(_matmul_4bit_kernel)
    return _tuned["kernel"]


def launch_grid(m: int, p: int, meta: dict[str, int]) -> tuple[int]:
    """Programs for an ``m × p`` output: one per ``BM × BP`` tile, partial tiles included."""
    return (triton.cdiv(m, meta["BM"]) * triton.cdiv(p, meta["BP"]),)


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (at least 16): the autotuning key's token count."""
    return max(16, 1 << (max(m, 1) - 1).bit_length())


def matmul_4bit_triton(x: torch.Tensor, w, transpose: bool) -> torch.Tensor:
    """Kernel version of :func:`slimtune.perf.kernels.matmul_4bit` (same arguments)."""
    out_f, in_f = w.shape
    a = x.reshape(-1, x.shape[-1])  # (M, R)
    if interpreting() and a.dtype == torch.bfloat16:
        a = a.float()  # the interpreter's tl.dot has no bf16 (numpy): check the indexing in fp32
    m, r = a.shape
    p = out_f if transpose else in_f
    # allocated in the output's shape (the kernel writes a 2-D view of it), so what is returned is never a
    # view: an autograd function's output that is a view may not be modified in place
    out = torch.empty((*x.shape[:-1], p), dtype=kernel_dtype(x.dtype), device=x.device)
    c = out.view(m, p)
    if m and p:
        scales = w.block_scales().contiguous()
        precision = "ieee" if a.dtype == torch.float32 else "tf32"  # fp32 stays fp32, like torch's default
        pairs = in_f % 2 == 0
        # rows of W start on block boundaries: a tile's lanes along ``in`` hold whole blocks (or lie in one)
        aligned = pairs and in_f % w.blocksize == 0
        meta = dict(BLOCKSIZE=w.blocksize, PRECISION=precision, TRANSPOSE=transpose, PAIRS=pairs, ALIGNED=aligned,
                    WIDE=wide(a.numel(), c.numel(), out_f * in_f))
        args = (a, w.packed, w.code.float(), scales, c, m, p, r, in_f, a.stride(0), a.stride(1), c.stride(0),
                c.stride(1), m_bucket(m))
        if interpreting():
            tile = dict(INTERPRETER_TILE, BM=16 if m <= 16 else INTERPRETER_TILE["BM"] * 2)
            _kernel()[launch_grid(m, p, tile)](*args, **meta, **tile)
        else:
            _kernel()[lambda grid_meta: launch_grid(m, p, grid_meta)](*args, **meta)
    return out.to(x.dtype)
