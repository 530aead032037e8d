"""Frozen 4-bit and 8-bit linear layers: thin shells around the pure functions of ``nf4`` / ``int8``.

``y = x Wᵀ + b`` with ``W = dequantize(stored)`` rebuilt on the fly in ``compute_dtype``, in the
forward AND again in the backward (QLoRA, Dettmers et al. 2023): only the packed weight is kept
between the two, so the quantized base costs no activation memory beyond its input.

``state_dict()`` uses transformers+bitsandbytes' key layout, so checkpoints move both ways:
4-bit at prefix P: ``P.weight`` (uint8 packed), ``P.weight.absmax``, ``P.weight.quant_map``,
[``P.weight.nested_absmax``, ``P.weight.nested_quant_map``], ``P.weight.quant_state.bitsandbytes__nf4``
(UTF-8 JSON bytes); 8-bit: ``P.weight`` (int8), ``P.SCB``, ``P.weight_format``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.core.dtypes import default_compute_dtype, dtype_name
from slimtune.core.modules import bias_of, is_conv1d, is_dense_linear, weight_of
from slimtune.quant import cpu_decode, int8, nf4
from slimtune.quant.codebooks import check_quant_type, codebook, dynamic_map
from slimtune.quant.state import (
    is_bitsandbytes_quantized,
    read_4bit_state,
    read_8bit_state,
    write_4bit_state,
    write_8bit_state,
)

__all__ = ["QuantizedLinear", "Linear4bit", "Linear8bit", "linear_weight"]

_Layer = TypeVar("_Layer", bound="QuantizedLinear")


class _DequantLinear(torch.autograd.Function):
    """``x Wᵀ`` with ``W = layer.dequantize()`` computed in forward and recomputed in backward (or, with
    ``layer.keep_dequantized``, kept from the forward: one dequantization per step for the weight's memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer  # the packed state only; the dequantized weight is freed on return unless kept
        ctx.kept = None
        if layer.matmul_backend is not None:  # e.g. the Triton kernels: W decoded inside the matmul
            return layer.matmul_backend(x, layer, True)
        if layer.keep_dequantized and ctx.needs_input_grad[0]:
            ctx.kept = layer.dequantize(x.dtype)
            return F.linear(x, ctx.kept)
        few = None if ctx.needs_input_grad[0] else layer.few_rows_matmul(x)  # generation: a token at a time
        return few if few is not None else F.linear(x, layer.transient_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        if ctx.layer.matmul_backend is not None:
            return ctx.layer.matmul_backend(grad_out, ctx.layer, False), None
        w = ctx.kept if ctx.kept is not None else ctx.layer.transient_weight(grad_out.dtype, backward=True)
        ctx.kept = None
        return grad_out @ w, None  # dL/dx = dL/dy · W; the frozen weight gets no gradient


# One fp32 decode buffer per (device, size) for weights that live only during one matmul (CPU): no
# allocation, no page faults per layer and step. A forward or backward of one layer uses it at a time.
_SCRATCH: dict[tuple[str, int], torch.Tensor] = {}


def scratch_buffer(device: torch.device, numel: int) -> torch.Tensor:
    key = (str(device), numel)
    if key not in _SCRATCH:
        with torch.inference_mode(False):  # an ordinary tensor, whatever mode first asks for it
            _SCRATCH[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return _SCRATCH[key]


class QuantizedLinear(nn.Module):
    """Base of the frozen quantized linear layers (what LoRA wraps).

    Subclasses store ``in_features``, ``out_features``, ``weight`` (the packed storage), ``bias`` (frozen
    Parameter or None), ``dtype`` (the original weight's), ``compute_dtype`` and implement
    :meth:`quantize_`, :meth:`dequantize` and :meth:`storage_tensors`.
    """

    in_features: int
    out_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype
    compute_dtype: torch.dtype
    bits: int

    def quantize_(self, w: torch.Tensor) -> QuantizedLinear:
        """Fill this layer from the full-precision weight ``w`` (out, in), on ``w``'s device; returns it."""
        raise NotImplementedError

    @staticmethod
    def _check_scales(scales: torch.Tensor, what: str) -> None:
        """A non-finite scale means an inf or NaN weight: refused, since its whole block (its whole layer, once
        the scales are double-quantized) would decode as NaN."""
        bad = int((~torch.isfinite(scales)).sum())
        if bad:
            raise ValueError(f"the weight has inf or NaN values in {bad} {what}; a quantized layer cannot hold "
                             "them (they would decode as NaN). Check the checkpoint: a diverged or damaged weight?")

    # Keep the dequantized weight from the forward for the backward (costs its memory until then).
    keep_dequantized: bool = False
    # Made from transformers' Conv1D (GPT-2): dequantized for export, its weight is written (in, out) again.
    conv1d: bool = False
    # ``(x, layer, transpose) -> x Wᵀ (transpose) or x W``: set by slimtune.perf.fast_path.enable_fast_path to
    # run the matmuls elsewhere (the Triton kernels); None: dequantize in pure torch, then torch's matmul.
    matmul_backend: Callable[[torch.Tensor, QuantizedLinear, bool], torch.Tensor] | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out_features, in_features)`` in ``dtype`` (default: ``compute_dtype``)."""
        raise NotImplementedError

    def few_rows_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x Wᵀ`` for an ``x`` of a few rows by a kernel that decodes W on the fly (token-by-token generation), or
        None where there is none: the caller decodes W and multiplies."""
        return None

    def transient_weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        """The weight ``(out, in)`` for one matmul, which nothing may keep afterwards (it may live in a reused
        buffer). ``backward``: the decode in a backward pass, which a compiled graph must not merge with the
        forward's (it would keep the decoded weight from one to the other)."""
        return self.dequantize(dtype)

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that encode the weight (for memory accounting)."""
        raise NotImplementedError

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage_tensors().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantLinear.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the quantized state; ``.to(dtype)`` / ``.half()`` must not cast it
        (fp32 scales and code books in bf16 would change every weight), so only the bias follows."""
        state = {k: v for k, v in self._buffers.items() if v is not None}
        for k in state:
            self._buffers[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in state.items():
                moved = fn(t)
                self._buffers[k] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def _init_bias(self, bias: bool, device, dtype: torch.dtype) -> None:
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _load_bias(self, state_dict: dict, prefix: str, assign: bool, missing: list[str]) -> None:
        key = prefix + "bias"
        if self.bias is None:
            return
        if key not in state_dict:
            missing.append(key)
            return
        value = state_dict[key]
        if value.shape != self.bias.shape:
            raise ValueError(f"{key}: stored bias has shape {tuple(value.shape)}, "
                             f"the layer needs {tuple(self.bias.shape)}")
        if assign or self.bias.is_meta:
            device = None if self.bias.is_meta else self.bias.device
            self.bias = nn.Parameter(value.detach().to(device or value.device), requires_grad=False)
        else:
            with torch.no_grad():
                self.bias.copy_(value)

    def _target_device(self, tensor: torch.Tensor) -> torch.device:
        """Where loaded tensors go: the layer's current device, unless it is still on meta."""
        return tensor.device if getattr(self, "weight", None) is None or self.weight.is_meta else self.weight.device

    def _check_weight_shape(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit a {type(self).__name__} "
                             f"({self.out_features}, {self.in_features})")

    def _copy_bias(self: _Layer, linear: nn.Module) -> _Layer:
        """Take a frozen copy of ``linear``'s bias (the original module stays untouched)."""
        bias = bias_of(linear)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return self

    @staticmethod
    def _check_not_quantized(linear: nn.Module) -> None:
        if isinstance(linear, QuantizedLinear) or is_bitsandbytes_quantized(linear):
            raise ValueError(f"this layer is already quantized ({linear!r}); quantize the full-precision "
                             "weights, or call dequantize_model() first")


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or of transformers' GPT-2 ``Conv1D`` (stored (in, out))."""
    QuantizedLinear._check_not_quantized(linear)
    if not is_dense_linear(linear):
        raise ValueError(f"cannot quantize a {type(linear).__name__}: only nn.Linear and transformers' Conv1D "
                         "are supported")
    weight = weight_of(linear)
    return weight.T if is_conv1d(linear) else weight


class Linear4bit(QuantizedLinear):
    """Frozen linear layer with an NF4 / FP4 block-quantized weight (QLoRA).

    ``W[i] = code[q_i] * absmax[i // blocksize]`` over the row-major flattened weight, with
    ``absmax = dmap[c] * absmax2[j // 256] + offset`` under double quantization (~4.127 bits per
    weight for NF4 + DQ, blocksize 64). See :mod:`slimtune.quant.nf4` for the exact arithmetic.
    """

    bits = 4
    # On a CPU, decode with the C++ kernel of slimtune.quant.cpu_decode (the same bits, ~7x faster) when it can be
    # built; False: the pure-torch gather (enable_fast_path's kernels="torch").
    cpu_kernel: bool = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        check_quant_type(quant_type)
        nf4.check_blocksize(blocksize)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.quant_type, self.blocksize, self.dtype = quant_type, blocksize, dtype
        self.compute_dtype = compute_dtype or default_compute_dtype(device)
        n = self.in_features * self.out_features
        nb = -(-n // blocksize)
        packed = torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("quant_map", codebook(quant_type).to(device), persistent=False)
        if double_quant:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8, device=device), persistent=False)
            self.register_buffer("nested_absmax", torch.zeros(-(-nb // nf4.NESTED_BLOCKSIZE), device=device),
                                 persistent=False)
            self.register_buffer("nested_offset", torch.zeros((), device=device), persistent=False)
            self.register_buffer("nested_quant_map", dynamic_map(True).to(device), persistent=False)
        else:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32, device=device), persistent=False)
            for name in ("nested_absmax", "nested_offset", "nested_quant_map"):
                self.register_buffer(name, None, persistent=False)
        self._init_bias(bias, device, dtype)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize an ``nn.Linear`` (or GPT-2 ``Conv1D``); the original module is left untouched."""
        w = linear_weight(linear)  # (out, in)
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None, quant_type, blocksize, double_quant,
                    compute_dtype or default_compute_dtype(w.device), w.dtype, device="meta")
        return layer.quantize_(w)._copy_bias(linear)

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> Linear4bit:
        """Fill this layer from the full-precision weight ``w`` (out, in), on ``w``'s device."""
        self._check_weight_shape(w)
        self.dtype = w.dtype
        packed, absmax = nf4.quantize_4bit(w, self.quant_type, self.blocksize)
        self._check_scales(absmax, f"of its {absmax.numel()} blocks")
        self.weight, self.quant_map = packed, codebook(self.quant_type, w.device)
        if self.double_quant:
            self.absmax, self.nested_absmax, self.nested_offset = nf4.double_quantize(absmax)
            self.nested_quant_map = dynamic_map(True, w.device)
        else:
            self.absmax = absmax
        return self

    def block_absmax(self) -> torch.Tensor:
        """The fp32 per-block scales, decoding the double quantization if any."""
        if not self.double_quant:
            return self.absmax
        return nf4.double_dequantize(self.absmax, self.nested_absmax, self.nested_offset, self.nested_quant_map)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4.dequantize_4bit(self.weight, self.block_absmax(), (self.out_features, self.in_features),
                                   self.quant_type, self.blocksize, dtype or self.compute_dtype, code=self.quant_map,
                                   cpu_kernel=self.cpu_kernel)

    def few_rows_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """On a CPU, fp32 ``x`` with at most ``cpu_decode.GEMV_ROWS`` rows: the C++ GEMV (each packed byte read once,
        no fp32 weight written; within fp32 rounding of decode + matmul, summed in another order); in a graph
        torch.compile traces, its operator (``slimtune::gemv_4bit``)."""
        if not self.cpu_kernel:
            return None
        return cpu_decode.few_rows_matmul(x, self.weight, self.block_absmax(), self.quant_map, self.out_features,
                                          self.blocksize)

    def transient_weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the backward's decode written apart from the forward's (see decode_4bit)
            return nf4.decode_4bit(self.weight, self.block_absmax(), (self.out_features, self.in_features),
                                   self.quant_map.float(), self.blocksize, second=backward).to(dtype)
        if self.weight.device.type != "cpu":  # GPUs: the kernels path; no shared buffer across streams
            return self.dequantize(dtype)
        buffer = scratch_buffer(self.weight.device, 2 * self.weight.numel())
        return nf4.dequantize_4bit(self.weight, self.block_absmax(), (self.out_features, self.in_features),
                                   self.quant_type, self.blocksize, dtype, code=self.quant_map, out=buffer,
                                   cpu_kernel=self.cpu_kernel)

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        names = ("weight", "absmax", "nested_absmax", "nested_offset") if self.double_quant else ("weight", "absmax")
        return {name: getattr(self, name) for name in names}

    def extra_repr(self) -> str:
        dq = f", double_quant (offset {float(self.nested_offset):.4g})" if self.double_quant and \
            not self.nested_offset.is_meta else (", double_quant" if self.double_quant else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}, "
                f"compute_dtype={dtype_name(self.compute_dtype)}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        write_4bit_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            self._load_bias(state_dict, prefix, assign, missing_keys)
            return
        state = read_4bit_state(state_dict, prefix, (self.out_features, self.in_features), unexpected_keys)
        device = self._target_device(state["weight"])
        self.quant_type, self.blocksize, self.dtype = state["quant_type"], state["blocksize"], state["dtype"]
        for name in ("weight", "absmax", "quant_map", "nested_absmax", "nested_offset", "nested_quant_map"):
            value = state.get(name)
            setattr(self, name, None if value is None else value.to(device))
        self._load_bias(state_dict, prefix, assign, missing_keys)


class Linear8bit(QuantizedLinear):
    """Frozen linear layer with a row-wise absmax int8 weight (LLM.int8() storage, no outlier split).

    ``W = CB * SCB[:, None] / 127``; the matmul runs in ``compute_dtype`` on the dequantized weight.
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = int(in_features), int(out_features), dtype
        self.compute_dtype = compute_dtype or default_compute_dtype(device)
        self.register_buffer("weight", torch.zeros((self.out_features, self.in_features), dtype=torch.int8,
                                                   device=device), persistent=False)
        self.register_buffer("SCB", torch.zeros(self.out_features, device=device), persistent=False)
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None) -> Linear8bit:
        w = linear_weight(linear)
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None,
                    compute_dtype or default_compute_dtype(w.device), w.dtype, device="meta")
        return layer.quantize_(w)._copy_bias(linear)

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor) -> Linear8bit:
        self._check_weight_shape(w)
        self.dtype = w.dtype
        weight, scales = int8.quantize_int8_rowwise(w)
        self._check_scales(scales, f"of its {scales.numel()} rows")
        self.weight, self.SCB = weight, scales
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int8.dequantize_int8_rowwise(self.weight, self.SCB, dtype or self.compute_dtype)

    def transient_weight(self, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        second = backward and torch.compiler.is_compiling()
        return int8.dequantize_int8_rowwise(self.weight, self.SCB, dtype, second=second)

    def storage_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "SCB": self.SCB}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 row-wise, compute_dtype={dtype_name(self.compute_dtype)}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        write_8bit_state(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            self._load_bias(state_dict, prefix, assign, missing_keys)
            return
        weight, scb = read_8bit_state(state_dict, prefix, (self.out_features, self.in_features), unexpected_keys)
        device = self._target_device(weight)
        self.weight, self.SCB = weight.to(device), scb.to(device)
        self._load_bias(state_dict, prefix, assign, missing_keys)

