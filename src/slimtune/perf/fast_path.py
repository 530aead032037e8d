"""One switch for slimtune's fast paths: ``kernels: auto | triton | torch`` (recipes' ``training.kernels``,
the CLI's ``--kernels``, :func:`enable_fast_path` for library users).

- ``auto``: on CUDA (with triton), the Triton kernels for the 4-bit base (W decoded inside the matmul, the
  batch-1 GEMV in generation) and the fused LoRA autograd node; on CPUs the 4-bit weight decoded by the C++
  kernel of :mod:`slimtune.quant.cpu_decode` (built on first use; the pure-torch gather where it cannot be) and
  the fused LoRA node.
- ``triton``: the kernels and fused LoRA, or a clear error where Triton cannot run.
- ``torch``: the pure-torch reference everywhere.

The chunked cross-entropy (no full-vocabulary logits) is the trainer's ``training.loss: auto``, used on every
device where the model allows it. On CPUs the 4-bit weight is decoded into a reused buffer for each matmul
and the fused LoRA node adds the LoRA terms into the base matmul's output and input gradient in place
(``addmm_``), where the plain layers write and add two more activation-sized tensors per layer in each direction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.perf import kernels
from slimtune.perf.fused_lora import fusable, is_fused, use_fused_lora
from slimtune.quant import cpu_decode
from slimtune.quant.linear import Linear4bit, QuantizedLinear

KERNEL_MODES = ("auto", "triton", "torch")
# Measured on the development CPU (bench/lora_step.py, bench/qlora_step.py): the fused LoRA node's step is
# 7-9% faster than the plain layers' there; with lora_dropout 0.05, 7% (its masks, drawn again in backward,
# come from a counter-based hash about 3× cheaper than the plain layers' bernoulli_ draws).
FUSE_ON_CPU = True


@dataclass(frozen=True)
class FastPath:
    """What :func:`enable_fast_path` switched on."""

    mode: str
    triton: bool  # the 4-bit base's matmuls run in the Triton kernels
    fused_lora_layers: int  # LoRA layers routed through the fused autograd node
    quantized_layers: int = 0  # 4-bit layers in the model (none: a full-precision base)
    other_quantized_layers: int = 0  # 8-bit ones, or another library's packed layers (their own matmuls)
    compiled_blocks: int = 0  # transformer blocks torch.compile'd (slimtune.perf.compilation; recipes' compile)
    decode: str = "pure-torch dequantize"  # how the 4-bit weight is decoded when the Triton kernels do not run

    def __str__(self) -> str:
        if self.quantized_layers:
            how = "Triton kernels" if self.triton else f"{self.decode} + matmul"
            base = f"4-bit base ({self.quantized_layers} layers) via {how}"
        elif self.other_quantized_layers:
            base = f"8-bit or packed base ({self.other_quantized_layers} layers, each runs its own matmul)"
        else:
            base = "full-precision base (torch matmuls)"
        compiled = f"; torch.compile on {self.compiled_blocks} blocks" if self.compiled_blocks else ""
        return (f"kernels={self.mode}: {base}; fused LoRA on {self.fused_lora_layers} layers; "
                f"chunked cross-entropy where the model allows it{compiled}")


def plan_fast_path(mode: str, device: torch.device, triton_reason: str | None) -> tuple[bool, bool]:
    """``(use the Triton kernels, fuse the LoRA layers)`` for ``mode`` on ``device``; ``triton_reason`` is why
    Triton cannot run there (None: it can)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not a kernel mode; use one of {list(KERNEL_MODES)}.")
    if mode == "triton" and triton_reason is not None:
        raise ValueError(f"kernels='triton' but the Triton kernels cannot run on {device.type}: {triton_reason}. "
                         "Use kernels='auto' (the fastest available path) or 'torch'.")
    triton = mode == "triton" or (mode == "auto" and device.type == "cuda" and triton_reason is None)
    return triton, triton or (mode == "auto" and device.type == "cpu" and FUSE_ON_CPU)


def enable_fast_path(model: nn.Module, mode: str = "auto") -> FastPath:
    """Route ``model``'s 4-bit layers and LoRA layers through the fastest path for its device (see above)."""
    tensor = next(iter(model.parameters()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    triton, fuse = plan_fast_path(mode, device, kernels.triton_status(device))
    backend = functools.partial(kernels.linear_4bit, use_triton=True) if triton else None
    quantized, on_cpu = 0, False
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.matmul_backend = backend
            module.cpu_kernel = mode != "torch"
            quantized += 1
            on_cpu = on_cpu or module.weight.device.type == "cpu"
    if any(fusable(m) for m in model.modules()):
        use_fused_lora(model, enabled=fuse)
    fused = sum(is_fused(m) for m in model.modules())
    other = sum(isinstance(m, QuantizedLinear) and not isinstance(m, Linear4bit) or isinstance(m, nn.Linear)
                and not m.weight.is_floating_point() for m in model.modules())
    return FastPath(mode, triton, fused, quantized, other, decode=_decode_path(mode, on_cpu))


def _decode_path(mode: str, on_cpu: bool) -> str:
    """How :func:`enable_fast_path` has a model's 4-bit weights decoded outside the Triton kernels (builds the CPU
    kernel on first use)."""
    if not on_cpu or mode == "torch":
        return "pure-torch dequantize"
    reason = cpu_decode.status()
    if reason is not None:
        return f"pure-torch dequantize (the C++ decode kernel is unavailable: {reason})"
    return f"C++ decode kernel ({cpu_decode.isa()})"
