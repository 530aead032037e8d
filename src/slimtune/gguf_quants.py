"""Tensor encodings for GGUF export: llama.cpp's q/k row order and the GGML block formats.

Pure functions over tensors and arrays; :mod:`slimtune.gguf_export` is the shell that writes files.

**Rotary layout.** HF's llama applies RoPE "rotate-half" style: in each head of size ``d`` it rotates
the pair ``(x[i], x[i + d/2])``. GGML's llama graph rotates adjacent pairs ``(x[2i], x[2i + 1])``.
llama.cpp's converter therefore reorders the output rows of ``q_proj`` and ``k_proj`` (weights and
biases) once, at conversion time, so that HF row ``i`` of a head lands at ``2i`` and row ``i + d/2`` at
``2i + 1``::

    W_gguf = W.reshape(n_head, 2, d/2, in).transpose(1, 2).reshape(out, in)

with ``n_head = num_attention_heads`` for q and ``num_key_value_heads`` for k. Since the permutation
acts on output rows only, a LoRA delta ``B A`` is permuted by permuting ``B``'s rows; ``A`` stays.

**Block formats** (``GGML_QUANT_SIZES``): a row is cut into blocks of 32 consecutive values, so the
row length (``in_features``) must be a multiple of 32.

- ``Q8_0``: 34 bytes per block: one fp16 scale ``d = max|x| / 127``, then 32 int8 ``q = round(x / d)``
  (halves away from zero). Decodes as ``x ≈ d · q``. 8.5 bits per weight.
- ``Q4_0``: 18 bytes per block: one fp16 scale ``d = m / -8`` where ``m`` is the value of largest
  magnitude *with its sign*, then 16 bytes of 4-bit codes ``q = clamp(trunc(x / d + 8.5), 0, 15)``.
  Byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble. Decodes
  as ``x ≈ d · (q − 8)``. 4.5 bits per weight; the extreme value maps exactly to ``-8 · d``.

The byte encoding itself is done by gguf-py's ``gguf.quants`` (llama.cpp's own Python package, bit
exact with ggml's reference C code); this module decides which tensor gets which format.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

# quant name -> (format of 2-D weights, general.file_type). Norms and other 1-D tensors stay F32.
QUANT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}


def check_quant(quant: str, allowed: tuple[str, ...] = tuple(QUANT_TYPES)) -> str:
    if not isinstance(quant, str) or quant.lower() not in allowed:
        raise ValueError(f"unknown GGUF quant {quant!r}; choose one of {list(allowed)}.")
    return quant.lower()


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> GGML adjacent-pair rows, per head. ``w``: ``(n_head·d, ...)``."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot split {w.shape[0]} rows into {n_head} heads of even size.")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk` (GGML rows back to HF rows)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_type(quant: str, shape: tuple[int, ...], is_output: bool = False) -> GGMLQuantizationType:
    """The GGML type llama.cpp's tools would give this tensor under ``quant``.

    1-D tensors (norms) stay F32, as in ``convert_hf_to_gguf.py``. A block format needs rows that are
    a multiple of its block size; other tensors fall back to F16, as the converter does. With
    ``q4_0`` the output projection (``output.weight``, or ``token_embd.weight`` when it is tied to
    the output) is stored as Q8_0: ``llama-quantize`` keeps that tensor at higher precision (Q6_K,
    which gguf-py cannot encode, falling back to Q8_0 itself when rows are not multiples of 256).
    """
    qtype = QUANT_TYPES[quant][0]
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    if quant == "q4_0" and is_output:
        qtype = GGMLQuantizationType.Q8_0
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return qtype
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else GGMLQuantizationType.F16


def encode(w: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """``w`` as the array GGUFWriter stores: float32/float16 values, or uint8 blocks ``(rows, bytes)``."""
    arr = w.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if qtype == GGMLQuantizationType.F32:
        return arr
    if qtype == GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf_quants.quantize(arr, qtype)


def decode(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values a GGUF tensor holds, shaped like the torch tensor it came from."""
    return torch.from_numpy(np.asarray(gguf_quants.dequantize(data, qtype), dtype=np.float32).reshape(shape).copy())
