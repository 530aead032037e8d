"""``torch.compile`` one transformer block at a time (regional compilation): recipes' ``training.compile: true``.

Every block of a decoder runs the same code on its own weights, so the graph compiled for the first block serves
them all (torch.compile takes a module's parameters as inputs, not constants): compiling costs one block's
time, seconds, where compiling the whole decoder as one graph takes minutes. What breaks that sharing is state
that differs by block and that the compiler guards by identity, e.g. a per-layer callable object set as a
layer's ``forward`` (the fused LoRA layers are bound to one function for this reason). A block is compiled
again for evaluation (no gradients), for the first block when its input needs no gradient, and once for a
second sequence length (dynamic shapes from then on). Random ops (a model's own dropout) draw from torch's generator
as in eager mode (inductor's ``fallback_random``), so a compiled run trains as the eager one.

A quantized base (4-bit or 8-bit) is decoded inside the compiled graph (``nf4.decode_4bit``: one fused pass over
the packed bytes), and decoded again in backward as in eager mode: the backward's decode is written as a different
expression, since the compiler would otherwise merge the two and keep every decoded weight from forward to
backward (``training.keep_dequantized: true`` asks for that explicitly). The Triton 4-bit kernels (CUDA) are not
called from compiled blocks yet.

Measured on the development CPU: the LoRA step 0.83 × the eager one, after a first step of 12 s (30 blocks;
``bench/lora_step.py --compile``); the QLoRA step 0.81-0.91 × the eager one, first step 10 s (``bench/qlora_step.py
--compile``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from slimtune.core.modules import transformer_blocks
from slimtune.core.toolchain import cpu_compiler
from slimtune.perf.fused_lora import prepare_for_compile
from slimtune.quant import cpu_decode
from slimtune.quant.linear import Linear4bit, QuantizedLinear

InductorOptions = dict[str, str | int | bool | Callable[..., Any]]  # torch.compile's ``options``

__all__ = ["compile_blocks", "compiled_blocks", "compile_options", "cpu_compiler"]


# Random ops (a model's own dropout) drawn from torch's global generator as in eager mode: the same masks, so a
# compiled run trains as the eager one and torch.manual_seed reproduces it (inductor's own RNG draws others).
_OPTIONS: InductorOptions = {"fallback_random": True}
# Inductor's vectorized C++ for the 4-bit decode's table look-ups (64-bit lane indices, a bounds check and a scalar
# load per lane) measured 2.5x slower than its scalar C++ on the development CPU (1.18 vs 0.46 ms for a 1536 x 576
# weight; eager 0.63 ms); the blocks' other element-wise kernels lose less than that gains (QLoRA step 0.99 s
# against 1.10 s vectorized, bench shape). So blocks over a 4-bit base on the CPU compile to scalar code.
_SCALAR: InductorOptions = {"cpp.simdlen": 0}


def compile_blocks(model: nn.Module) -> int:
    """Compile each transformer block of ``model`` in place (``nn.Module.compile``; random ops as in eager mode);
    returns how many. Raises ValueError for a model without a list of transformer blocks, or on a CPU without a
    C++ compiler (torch.compile would fail at the first step)."""
    blocks = transformer_blocks(model)
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and cpu_compiler() is None:
        wanted = os.environ.get("CXX") or "g++"
        raise ValueError(f"torch.compile needs a C++ compiler for a model on the CPU and {wanted!r} was not found; "
                         "install one (e.g. apt install g++) or set CXX to it")
    if any(isinstance(m, QuantizedLinear) and m.matmul_backend is not None for m in model.modules()):
        raise ValueError("the 4-bit layers run the Triton kernels (kernels auto or triton on CUDA), which compiled "
                         "blocks do not call yet: set training.kernels: torch (or enable_fast_path(model, 'torch')) "
                         "to compile the pure-torch decode into the blocks")
    prepare_for_compile()
    options = compile_options(model)
    for _, block in blocks:
        block.compile(options=options)
    return len(blocks)


def compile_options(model: nn.Module) -> InductorOptions:
    """The inductor options :func:`compile_blocks` uses for ``model`` (scalar C++ over a 4-bit base on the CPU).
    Loads the CPU decode kernel there first: traced graphs call its GEMV (generation) only if it is loaded."""
    cpu_4bit = any(isinstance(m, Linear4bit) and m.weight.device.type == "cpu" for m in model.modules())
    if cpu_4bit:
        cpu_decode.status()
    return {**_OPTIONS, **_SCALAR} if cpu_4bit else dict(_OPTIONS)


def compiled_blocks(model: nn.Module) -> int:
    """How many modules of ``model`` are compiled in place."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
