"""Row-wise absmax int8 weights (the storage of LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339).

``SCB_r = max_j |W_rj|`` (fp32, one per output row); ``CB = round(W * (127 / SCB_r))`` as int8;
``W ≈ CB * SCB_r / 127``. Same arithmetic as bitsandbytes' ``int8_vectorwise_quant`` /
``int8_vectorwise_dequant`` (no outlier threshold: weights are stored whole), applied to the weight as
given. bitsandbytes' ``Int8Params`` (what ``Linear8bitLt`` and transformers' 8-bit loading use) first
casts the weight to float16, so from a float32 or bfloat16 weight its codes can differ from ours by one
step (and its ``SCB`` by fp16 rounding); from a float16 weight, or ours from ``w.half()``, they are equal.
"""

from __future__ import annotations

import torch

from slimtune.quant.nf4 import QUANTIZABLE_DTYPES

__all__ = ["quantize_int8_rowwise", "dequantize_int8_rowwise"]

# bitsandbytes multiplies by this fp64 constant (≈ 1/127) rather than dividing by 127.
_INV_127 = 7.874015718698502e-3
_ROUND_MAGIC = 1.5 * 2 ** 23
# Rows per chunk hold < 32768 values: each op then runs on one thread (no OpenMP barrier per op,
# which stalls badly on a small CPU shared with other processes).
_ROW_CHUNK_ELEMS = 7 * 4096


def quantize_int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB int8 (out, in), SCB fp32 (out,))`` for a 2-D weight ``w`` (out, in)."""
    if w.dim() != 2:
        raise ValueError(f"int8 row-wise quantization needs a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if w.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"the weight to quantize must be float32, float16 or bfloat16, got {w.dtype}")
    w = w.detach()
    rows, cols = w.shape
    cb = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scb = torch.empty(rows, dtype=torch.float32, device=w.device)
    step = max(1, _ROW_CHUNK_ELEMS // max(cols, 1))  # rows per chunk: bounds the fp32 temporaries
    for r in range(0, rows, step):
        chunk = w[r: r + step].float()
        stats = chunk.abs().amax(dim=1)  # (rows_chunk,)
        # A zero row would give 0 * inf = NaN; its codes are 0 whatever the scale.
        scale = 127.0 / stats.clamp(min=torch.finfo(torch.float32).tiny)
        scaled = chunk * scale.unsqueeze(1)  # in [-127, 127]
        # round half to even like torch.round, via the fp32 "magic number" (exact for |x| < 2^22);
        # torch.round's CPU kernel splits even small tensors across threads, which stalls when
        # the cores are shared
        cb[r: r + step] = scaled.add_(_ROUND_MAGIC).sub_(_ROUND_MAGIC).to(torch.int8)
        scb[r: r + step] = stats
    return cb, scb


def dequantize_int8_rowwise(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32,
                            second: bool = False) -> torch.Tensor:
    """``CB * SCB / 127`` (as ``CB * SCB * (1/127)`` in fp32), cast to ``dtype``; shape (out, in).

    ``second=True``: the same values written as another expression (the product's factors swapped), for the
    backward's decode in a compiled graph, which the compiler would otherwise merge with the forward's and so
    keep the decoded weight alive from one to the other (see nf4.decode_4bit)."""
    if cb.dim() != 2 or scb.shape != (cb.shape[0],):
        raise ValueError(f"int8 weight {tuple(cb.shape)} needs one scale per row, got SCB of shape {tuple(scb.shape)}")
    scales = scb.float().view(-1, 1)
    return ((scales * cb if second else cb * scales) * _INV_127).to(dtype)
