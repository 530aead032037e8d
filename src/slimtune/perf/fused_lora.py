"""One autograd function for a LoRA-wrapped (quantized) linear layer: base + LoRA, forward and backward.

Forward (x ``(M, in)``, W ``(out, in)`` frozen, A ``(r, in)``, B ``(out, r)``, mask m of inverted dropout)::

    xa = (x ⊙ m) Aᵀ                      (M, r)    kept for backward (``A x`` is computed once)
    h  = x Wᵀ + b + s · xa Bᵀ             (M, out)  one matmul + one addmm, no (M, out) temporaries

Backward (g = dL/dh)::

    dB = s · gᵀ xa                       dA = (s · g B)ᵀ (x ⊙ m)          db = Σ_rows g
    dx = g W + ((s · g B) A) ⊙ m

What is kept for backward: x (only when A trains — LoRA-FA keeps nothing of size ``in``) and xa. Not
kept: the dequantized W (rebuilt from the 4-bit storage in backward, as QLoRA does, unless the layer's
``keep_dequantized`` asks to keep it, recipes' ``training.keep_dequantized``), the dropped-out
input (the mask is regenerated from a seed, as in :mod:`slimtune.methods.lora_fa`), the base output.
Since q/k/v (and gate/up) share their input x, keeping x instead of a per-layer ``dropout(x)`` copy
saves activation memory whenever dropout is on. A 4-bit base on CUDA uses the Triton kernels of
:mod:`slimtune.perf.kernels` (W decoded inside the matmul; the batch-1 GEMV in generation); elsewhere W is
dequantized for the duration of one matmul (on a CPU by the C++ kernel of :mod:`slimtune.quant.cpu_decode`; with no
gradient to record and at most 8 rows, generation, by its GEMV, which decodes W on the fly).

Dtypes follow :class:`~slimtune.methods.lora.LoraLinear` exactly: under autocast every matmul runs in
the autocast dtype; otherwise the base runs in its compute dtype (quantized) or the weight's dtype and
the LoRA branch in the adapter's dtype. :func:`use_fused_lora` switches a model's LoRA linear layers
to this function; layers it cannot serve (several active adapters, GPT-2 ``Conv1D``, a trainable base
weight, extra forward arguments) keep the original forward call by call.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TypeGuard

import torch
from torch import nn

from slimtune.core.dropout import draw_seed, dropout_mask
from slimtune.core.modules import weight_of
from slimtune.methods.lora_layers import LoraLinear
from slimtune.perf import kernels
from slimtune.quant.linear import Linear4bit, QuantizedLinear

__all__ = ["fused_lora_linear", "dropout_mask", "use_fused_lora", "fusable", "fused_forward", "fallback_reason",
           "is_fused", "prepare_for_compile"]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it would return ``t`` (a dispatch per tensor, per layer, per step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _base_matmul(t: torch.Tensor, base: nn.Module, transpose: bool) -> torch.Tensor:
    """``t Wᵀ`` (forward) or ``t W`` (backward) for the frozen base weight, in ``t``'s dtype: through the
    quantized layer's own matmul backend when it has one (the fast path's kernels)."""
    if isinstance(base, QuantizedLinear) and base.matmul_backend is not None:
        return base.matmul_backend(t, base, transpose)
    if isinstance(base, Linear4bit) and kernels.use_triton_for(t.device, None):
        return kernels.matmul_4bit(t, kernels.weight_4bit(base), transpose)
    weight = (base.transient_weight(t.dtype, backward=not transpose) if isinstance(base, QuantizedLinear)
              else _as(weight_of(base), t.dtype))
    return t @ (weight.T if transpose else weight)  # a dequantized W lives for this matmul only


def _few_rows_matmul(x: torch.Tensor, base: nn.Module, grad: bool) -> torch.Tensor | None:
    """The quantized base's kernel for a few rows (see QuantizedLinear.few_rows_matmul), when no gradient is
    recorded (generation, evaluation); training keeps decode + matmul, as its backward does."""
    if grad or not isinstance(base, QuantizedLinear) or base.matmul_backend is not None:
        return None
    return base.few_rows_matmul(x)


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, base, scaling, p, seed, dtypes, grad):
        mm_dtype, out_dtype, lora_dtype = dtypes
        ctx.kept = None
        xb = _as(x, mm_dtype)  # x (M, in): fused_lora_linear flattens the leading dimensions outside the node
        if (isinstance(base, Linear4bit) and base.matmul_backend is None and xb.shape[0] == 1
                and base.in_features % 2 == 0 and kernels.use_triton_for(xb.device, None)):
            out = kernels.gemv_4bit(xb, kernels.weight_4bit(base))  # batch-1 generation
        elif (isinstance(base, QuantizedLinear) and base.keep_dequantized and base.matmul_backend is None
              and ctx.needs_input_grad[0]):
            ctx.kept = base.dequantize(mm_dtype)  # decoded once per step: backward's g W reuses it
            out = xb @ ctx.kept.T
        elif (few := _few_rows_matmul(xb, base, grad)) is not None:
            out = few  # generation on a CPU: W decoded on the fly
        else:
            out = _base_matmul(xb, base, transpose=True)  # (M, out)
        if bias is not None:
            out = out + _as(bias, out.dtype)
        out = _as(out, out_dtype)
        xl = _as(x, lora_dtype)
        if p:
            xl = xl * dropout_mask(xl, p, seed)
        xa = xl @ _as(lora_A, lora_dtype).T  # (M, r)
        if lora_dtype == out.dtype:
            out.addmm_(xa, _as(lora_B, lora_dtype).T, alpha=scaling)
        else:  # LoraLinear's rounding: the LoRA term in its own dtype, then cast
            out = out + (xa @ _as(lora_B, lora_dtype).T * scaling).to(out.dtype)
        ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.dtypes = base, scaling, p, seed, dtypes
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x if lora_A.requires_grad else None, xa if lora_B.requires_grad else None,
                              lora_A, lora_B)
        return out  # a tensor of its own, never a view: callers may modify it in place (see fused_lora_linear)

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, lora_A, lora_B = ctx.saved_tensors
        mm_dtype, _, lora_dtype = ctx.dtypes
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (M, out)
        grad_x = grad_A = grad_B = grad_bias = None
        gl = _as(g, lora_dtype)
        if ctx.needs_input_grad[2]:  # (out, r), from xaᵀ g (BLAS's faster order for this shape), made contiguous
            grad_B = _as((xa.T @ gl).T.contiguous().mul_(s), lora_B.dtype)
        need_x, need_A = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if need_x or need_A:
            g_xa = (gl @ _as(lora_B, lora_dtype)).mul_(s)  # (M, r) = dL/d(xa)
            mask = dropout_mask(g_xa.new_empty(g.shape[0], lora_A.shape[1]), ctx.p, ctx.seed) if ctx.p else None
            if need_A:
                xl = _as(x2, lora_dtype)
                grad_A = _as(g_xa.T @ (xl * mask if mask is not None else xl), lora_A.dtype)  # (r, in)
            if need_x:
                gb = _as(g, mm_dtype)
                base_x = gb @ ctx.kept if ctx.kept is not None else _base_matmul(gb, ctx.base, transpose=False)
                grad_x = _as(base_x, ctx.x_dtype)  # (M, in)
                if mask is None and grad_x.dtype == lora_dtype:
                    grad_x.addmm_(g_xa, _as(lora_A, lora_dtype))  # accumulated in place: no (M, in) temporary
                elif mask is not None and grad_x.dtype == lora_dtype:
                    grad_x.addcmul_(g_xa @ _as(lora_A, lora_dtype), mask)  # the masked term in one pass
                else:
                    lora_x = g_xa @ _as(lora_A, lora_dtype)
                    grad_x += (lora_x * mask if mask is not None else lora_x).to(ctx.x_dtype)
        ctx.kept = None
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0).to(ctx.base.bias.dtype)
        return grad_x, grad_A, grad_B, grad_bias, None, None, None, None, None, None


def _dtypes(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(base matmul dtype, output dtype, LoRA-branch dtype), as LoraLinear's forward would produce them."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    auto = torch.get_autocast_dtype(device_type) if autocast else None
    if isinstance(base, QuantizedLinear):
        mm = auto or base.compute_dtype
        return mm, x.dtype, auto or lora_A.dtype
    mm = auto or x.dtype
    return mm, mm, auto or lora_A.dtype


def fused_lora_linear(x: torch.Tensor, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float, dropout_p: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """``base(x) + scaling · dropout(x) Aᵀ Bᵀ`` in one autograd node (see the module docstring).

    ``base``: an ``nn.Linear`` or a slimtune :class:`~slimtune.quant.QuantizedLinear` whose weight is
    frozen (its bias may train). ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``. ``seed`` fixes the
    dropout mask (drawn from the global RNG when None).
    """
    if isinstance(base, nn.Linear) and base.weight.requires_grad:
        raise ValueError("fused_lora_linear needs a frozen base weight (LoRA freezes it); this nn.Linear's weight "
                         "requires grad. Freeze it (weight.requires_grad_(False)) or use the unfused layer.")
    if not isinstance(base, (nn.Linear, QuantizedLinear)):
        raise TypeError(f"fused_lora_linear wraps nn.Linear or a slimtune QuantizedLinear, not {type(base).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    if dropout_p and seed is None:
        seed = draw_seed()
    # The leading dimensions are flattened and restored outside the node: a view made inside a custom
    # autograd function may not be modified in place (Falcon adds into its projections' outputs), one made
    # here may.
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B, base.bias))
    out = _FusedLoraLinear.apply(x.reshape(-1, x.shape[-1]), lora_A, lora_B, base.bias, base, float(scaling),
                                 float(dropout_p), seed, _dtypes(x, base, lora_A), grad)
    return out.view(*x.shape[:-1], out.shape[-1])


# With dropout the node draws its mask's seed from the global RNG (torch.manual_seed reproduces it), which
# torch.compile cannot trace: a compiled block runs those layers eagerly (a graph break each), the rest compiled.
# The wrapper is made by prepare_for_compile (slimtune.perf.compilation), as making it imports torch._dynamo:
# seconds that a run which compiles nothing does not pay.
_WITH_DROPOUT: dict[str, Callable[..., torch.Tensor]] = {}


def prepare_for_compile() -> None:
    """Have layers with dropout run the fused node outside compiled graphs (see above); idempotent."""
    _WITH_DROPOUT.setdefault("run", torch.compiler.disable(fused_lora_linear))


def fallback_reason(layer: LoraLinear, args: tuple = (), kwargs: dict | None = None,
                    active: list[str] | None = None) -> str | None:
    """Why a call of ``layer`` with these extra arguments runs the class's forward (None: the fused node serves it);
    ``active``: the layer's ``unmerged_active()`` when the caller has it."""
    base = layer.base_layer
    if args or kwargs:
        return "extra forward arguments"
    active = layer.unmerged_active() if active is None else active
    if len(active) != 1:
        return "not exactly one active unmerged adapter"
    if not isinstance(base, (nn.Linear, QuantizedLinear)):
        return f"base layer {type(base).__name__}"
    if isinstance(base, nn.Linear) and base.weight.requires_grad:
        return "trainable base weight"
    dropout = layer.lora_dropout[active[0]]
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        return f"dropout module {type(dropout).__name__}"
    return None


def fused_forward(layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The ``forward`` :func:`use_fused_lora` binds to each layer (an instance attribute); the class's forward runs
    what the fused node does not cover. One function bound to every layer, not a callable object per layer:
    torch.compile guards an object by identity, so a compiled decoder block would be recompiled for each block."""
    active = layer.unmerged_active()
    if fallback_reason(layer, args, kwargs, active) is not None:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = active[0]
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and layer.training else 0.0
    A, B = layer.lora_parameters(name)
    run = _WITH_DROPOUT.get("run", fused_lora_linear) if p else fused_lora_linear
    return run(x, layer.base_layer, A, B, layer.scaling[name], p)


def is_fused(module: nn.Module) -> bool:
    """Whether :func:`use_fused_lora` routed ``module`` through the fused node."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is fused_forward


def fusable(module: nn.Module) -> TypeGuard[LoraLinear]:
    """Whether ``module`` is a LoRA layer the fused node can run: its equation is LoRA's (not DoRA's, LoRA-FA's)
    and its base weight is ours (quantized or not) or a floating-point one. A layer over another library's
    packed weights (bitsandbytes' ``Linear4bit``/``Linear8bitLt``: ``nn.Linear`` over integer bytes) runs its
    own forward."""
    if not isinstance(module, LoraLinear) or not module.fusable:
        return False
    base = module.base_layer
    return isinstance(base, QuantizedLinear) or weight_of(base).is_floating_point()


def use_fused_lora(model: nn.Module, enabled: bool = True) -> int:
    """Route every :class:`LoraLinear` of ``model`` (and subclasses keeping its forward, e.g. Delta-LoRA)
    through :func:`fused_lora_linear`, or back with ``enabled=False``. Returns the number of layers changed.

    Layers whose equation differs (DoRA, LoRA-FA: ``fusable`` is False) and layers over another library's packed
    weights are left alone.
    """
    changed = 0
    for module in model.modules():
        if not fusable(module):
            continue
        installed = is_fused(module)
        layer: nn.Module = module  # nn.Module types forward as an attribute: the instance's shadows the class's
        if enabled and not installed:
            layer.forward = types.MethodType(fused_forward, module)
            changed += 1
        elif not enabled and installed:
            del layer.forward
            changed += 1
    if enabled and not changed and not any(is_fused(m) for m in model.modules()):
        raise ValueError("use_fused_lora found no LoRA linear layer to fuse; add a LoRA adapter first "
                         "(slimtune.add_adapter(model, LoraConfig(...))). DoRA and LoRA-FA layers, and layers over "
                         "another library's packed weights, keep their own forward.")
    return changed
