"""Optional Triton kernels for 4-bit (NF4 / FP4) weights, with the pure-torch path as reference and fallback.

- :func:`dequantize_4bit` — ``W[i] = code[q_i] · absmax[i // blocksize]`` with the double-quantized
  scales ``absmax = dmap[c] · absmax2[j // 256] + offset`` decoded in the same pass (bandwidth bound).
- :func:`matmul_4bit` — ``x Wᵀ`` (forward) or ``x W`` (backward) with W dequantized tile by tile inside
  the matmul, never materialized (training shapes).
- :func:`gemv_4bit` — ``x Wᵀ`` for a handful of rows (batch-1 generation): reads each packed byte once.

Every function takes ``use_triton``: ``None`` picks Triton on a CUDA device when ``triton`` imports and the
pure-torch reference (:mod:`slimtune.quant.nf4`) otherwise; ``True`` demands Triton (on CPU tensors only
under Triton's interpreter, ``TRITON_INTERPRET=1`` set before the first kernel call) and raises if it
cannot run; ``False`` forces the reference. ``triton`` itself is imported only inside these functions.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple

import torch

from slimtune.quant import nf4
from slimtune.quant.linear import Linear4bit

__all__ = [
    "Weight4bit",
    "weight_4bit",
    "triton_status",
    "use_triton_for",
    "set_default_use_triton",
    "dequantize_4bit",
    "matmul_4bit",
    "gemv_4bit",
    "linear_4bit",
]


class Weight4bit(NamedTuple):
    """The tensors of a 4-bit weight ``(out_features, in_features)`` as :class:`~slimtune.quant.Linear4bit` stores them.

    ``absmax`` is fp32 ``(nblocks,)`` without double quantization, uint8 codes with it; then
    ``nested_absmax`` (fp32 per 256 codes), ``nested_offset`` (0-d fp32) and ``nested_code`` (256 fp32).
    """

    packed: torch.Tensor  # uint8 ((n + 1) // 2, 1), first element in the high nibble
    absmax: torch.Tensor
    code: torch.Tensor  # (16,) fp32
    shape: tuple[int, int]
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def block_scales(self) -> torch.Tensor:
        """The fp32 per-block scales (pure torch; ``nblocks`` values, 1/64 of the weight)."""
        if self.nested_absmax is None:  # no double quantization
            return self.absmax.float()
        assert self.nested_offset is not None  # stored with nested_absmax
        return nf4.double_dequantize(self.absmax, self.nested_absmax, self.nested_offset, self.nested_code)


def weight_4bit(layer: Linear4bit) -> Weight4bit:
    """The :class:`Weight4bit` view of a :class:`slimtune.quant.Linear4bit` (no copies)."""
    return Weight4bit(layer.weight, layer.absmax, layer.quant_map, (layer.out_features, layer.in_features),
                      layer.blocksize, layer.nested_absmax, layer.nested_offset, layer.nested_quant_map)


@functools.cache
def _triton_importable() -> str | None:
    """None when ``import triton`` works, else the reason it does not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; CUDA builds of torch ship it)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install raises anything from ImportError to RuntimeError
        return f"import triton failed: {exc}"
    return None


def _interpreter_mismatch() -> str | None:
    """triton.language's own helpers (tl.zeros …) are compiled-mode objects if triton was imported before
    TRITON_INTERPRET=1 was set, and then fail inside interpreted kernels."""
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a future layout: nothing to check
        return None
    helper = getattr(standard, "zeros", None)
    if helper is not None and not isinstance(helper, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set; set it before the first import of triton"
    return None


def triton_status(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on ``device``; otherwise why not (a sentence for users)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _triton_importable()
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
        return _triton_importable() or _interpreter_mismatch()
    return f"no Triton kernels for device type {device.type!r}; only 'cuda' (and 'cpu' under TRITON_INTERPRET=1)"


_default_use_triton: bool | None = None


def set_default_use_triton(use_triton: bool | None) -> bool | None:
    """What ``use_triton=None`` means from now on (None: auto); returns the previous setting.
    ``True`` routes every 4-bit matmul (e.g. inside :mod:`slimtune.fused_lora`) through the kernels."""
    global _default_use_triton
    if use_triton not in (None, True, False):
        raise ValueError(f"use_triton={use_triton!r} must be None (auto), True or False")
    previous, _default_use_triton = _default_use_triton, use_triton
    return previous


def use_triton_for(device: torch.device | str, use_triton: bool | None) -> bool:
    """Resolve ``use_triton`` (None = the default: auto, i.e. CUDA with triton installed) for ``device``."""
    if use_triton is None:
        use_triton = _default_use_triton
    if use_triton is False:
        return False
    reason = triton_status(device)
    if use_triton is None:
        return reason is None and torch.device(device).type == "cuda"
    if reason is not None:
        raise RuntimeError(f"use_triton=True but the Triton kernels cannot run: {reason}. "
                           "Pass use_triton=None to fall back to the pure-torch path.")
    return True


def _kernel_module(name: str) -> ModuleType:
    """Import a kernel module; refuse if TRITON_INTERPRET changed since the kernels were compiled."""
    module = importlib.import_module(f"slimtune.perf.kernels.{name}")
    from slimtune.perf.kernels.nf4_dequant import INTERPRETED

    if INTERPRETED != (os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(f"TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} but the kernels were loaded "
                           f"{'with' if INTERPRETED else 'without'} the interpreter; set it before the first kernel "
                           "call, in a fresh process")
    return module


def _check_operand(x: torch.Tensor, w: Weight4bit, dim: int, what: str) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{what}: x has {x.shape[-1]} features in its last dimension, the 4-bit weight "
                         f"{tuple(w.shape)} needs {dim}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: x must be float32, float16 or bfloat16, got {x.dtype}")


def dequantize_4bit(w: Weight4bit, dtype: torch.dtype = torch.float32, use_triton: bool | None = None) -> torch.Tensor:
    """The weight ``(out, in)`` in ``dtype``; bit-identical to :func:`slimtune.quant.nf4.dequantize_4bit`."""
    if use_triton_for(w.packed.device, use_triton):
        return _kernel_module("nf4_dequant").dequantize_4bit_triton(w, dtype)
    return nf4.dequantize_4bit(w.packed, w.block_scales(), w.shape, blocksize=w.blocksize, dtype=dtype, code=w.code)


def matmul_4bit(x: torch.Tensor, w: Weight4bit, transpose: bool = True, use_triton: bool | None = None) -> torch.Tensor:
    """``x Wᵀ`` (``transpose=True``: x (..., in) → (..., out)) or ``x W`` (x (..., out) → (..., in)), in x's dtype.

    The reference dequantizes W to x's dtype and calls torch's matmul; the kernel dequantizes tiles in
    registers and accumulates in fp32, so results agree to matmul rounding, not bit for bit.
    """
    out_f, in_f = w.shape
    _check_operand(x, w, in_f if transpose else out_f, "matmul_4bit")
    if use_triton_for(x.device, use_triton):
        return _kernel_module("nf4_matmul").matmul_4bit_triton(x, w, transpose)
    weight = dequantize_4bit(w, x.dtype, use_triton=False)
    return x @ (weight.T if transpose else weight)


def gemv_4bit(x: torch.Tensor, w: Weight4bit, use_triton: bool | None = None) -> torch.Tensor:
    """``x Wᵀ`` for x ``(..., in)`` with few rows (≤ 16; generation): fp32 accumulation, output in x's dtype."""
    out_f, in_f = w.shape
    _check_operand(x, w, in_f, "gemv_4bit")
    rows = x.numel() // max(in_f, 1)
    if use_triton_for(x.device, use_triton):
        if rows > 16 or in_f % 2:
            raise ValueError(f"gemv_4bit serves at most 16 rows of an even in_features; got {rows} rows, "
                             f"in_features={in_f}. Use matmul_4bit for larger batches.")
        return _kernel_module("gemv").gemv_4bit_triton(x, w)
    weight = dequantize_4bit(w, torch.float32, use_triton=False)
    return (x.float() @ weight.T).to(x.dtype)


def linear_4bit(x: torch.Tensor, layer: Linear4bit, transpose: bool, use_triton: bool | None = None) -> torch.Tensor:
    """A :class:`~slimtune.quant.Linear4bit`'s matmul through these kernels: ``x Wᵀ`` (``transpose``, its
    forward) or ``x W`` (its backward); a handful of rows (generation) takes the GEMV, reading W once."""
    w = weight_4bit(layer)
    rows = x.numel() // max(x.shape[-1], 1)
    if transpose and rows <= 16 and w.shape[1] % 2 == 0 and use_triton_for(x.device, use_triton):
        return gemv_4bit(x, w, use_triton)
    return matmul_4bit(x, w, transpose, use_triton)
