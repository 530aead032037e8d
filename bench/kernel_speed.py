"""4-bit kernels: slimtune (Triton and pure torch) vs bitsandbytes vs the copy-bandwidth limit, in one run.

(Not named ``kernels.py``: the bench folder is first on the import path, and bitsandbytes imports the optional
``kernels`` package for its CPU kernels; a file of that name would shadow it and slow the anchor down.)

    .venv/bin/python bench/kernel_speed.py [--rows 14336 --cols 4096 --tokens 2048 --iters 50]

On the same NF4 + double-quantized weight (bitsandbytes quantizes it; slimtune reads bitsandbytes'
storage as is, the layouts are the same):

- dequantize to bf16: effective bandwidth = (packed + scale bytes read + bf16 bytes written) / time,
  next to a plain device copy of the bf16 weight (read + write), the practical limit; target ≥ 2,400 GB/s
  on an H100 for 14336 × 4096 (bitsandbytes was measured at 1.86 TB/s there, copy ≈ 3.0 TB/s);
- training matmul ``x Wᵀ`` and ``g W`` with ``tokens`` rows: Triton fused dequantize+matmul, Triton
  dequantize + cuBLAS, ``bnb.matmul_4bit``, and a dense bf16 matmul (the ceiling), in TFLOP/s;
- batch-1 GEMV: Triton vs ``bnb.matmul_4bit`` on one row (bitsandbytes' gemv_4bit), in effective GB/s
  of weight read, and the dense bf16 GEMV.

Without CUDA only the CPU rows run: the dequantize (slimtune's C++ decode kernel, its pure-torch gather, and
bitsandbytes' CPU dequantize), then the batch-1 fp32 GEMV (slimtune's C++ GEMV, slimtune's decode + matmul,
``bnb.matmul_4bit``); the GPU figures stay open.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slimtune.perf import kernels
from slimtune.quant import cpu_decode, nf4


def timed(fn, device: str, iters: int) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bnb_weight(rows: int, cols: int, device: str):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
    param = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64)
    param = param.to(device)
    qs = param.quant_state
    w = kernels.Weight4bit(param.data, qs.absmax, qs.code, (rows, cols), qs.blocksize, qs.state2.absmax,
                           qs.offset, qs.state2.code)
    return bnb, param, w


def row(name: str, seconds: float, value: float, unit: str, ref: float | None = None) -> None:
    ratio = f"{value / ref:6.2f}x" if ref else ""
    print(f"  {name:<44} {seconds * 1e3:9.3f} ms  {value:9.2f} {unit:<7} {ratio}")


def cpu_gemv(bnb, param, w, iters: int) -> None:
    """Batch-1 fp32 GEMV on the CPU (the compute dtype there): one generated token's matmul."""
    rows, cols = w.shape
    print("batch-1 fp32 GEMV on the CPU (GB/s of 4-bit weight read; ratio vs bitsandbytes)")
    x1 = torch.randn(1, cols)
    weight_bytes = rows * cols // 2 + w.absmax.numel()
    scales, wt = w.block_scales(), param.t()
    t_bnb = timed(lambda: bnb.matmul_4bit(x1, wt, quant_state=param.quant_state), "cpu", iters)
    ref = weight_bytes / t_bnb / 1e9
    row("bitsandbytes matmul_4bit", t_bnb, ref, "GB/s", ref)
    if cpu_decode.few_rows_matmul(x1, w.packed, scales, w.code, rows, w.blocksize) is not None:
        t_g = timed(lambda: cpu_decode.few_rows_matmul(x1, w.packed, w.block_scales(), w.code, rows, w.blocksize),
                    "cpu", iters)
        row("slimtune C++ GEMV (W decoded on the fly)", t_g, weight_bytes / t_g / 1e9, "GB/s", ref)
    else:
        print(f"  slimtune C++ GEMV: not on this CPU ({cpu_decode.status() or 'no AVX-512'})")
    t_d = timed(lambda: x1 @ kernels.dequantize_4bit(w, torch.float32, use_triton=False).T, "cpu", iters)
    row("slimtune decode + matmul", t_d, weight_bytes / t_d / 1e9, "GB/s", ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bnb, param, w = bnb_weight(args.rows, args.cols, device)
    n = args.rows * args.cols
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; torch {torch.__version__}, "
          f"bitsandbytes {bnb.__version__}; weight {args.rows} x {args.cols} NF4 + DQ, blocksize 64")
    iters = args.iters if device == "cuda" else 10

    print("dequantize to bf16 (effective bandwidth; ratio vs bitsandbytes)")
    moved = n // 2 + w.absmax.numel() + 4 * w.nested_absmax.numel() + 2 * n  # read packed + scales, write bf16
    t_bnb = timed(lambda: bnb.functional.dequantize_4bit(param.data, param.quant_state), device, iters)
    t_torch = timed(lambda: kernels.dequantize_4bit(w, torch.bfloat16, use_triton=False), device, iters)
    scales = w.block_scales()
    t_gather = timed(lambda: nf4.dequantize_4bit(w.packed, scales, w.shape, dtype=torch.bfloat16, code=w.code,
                                                 cpu_kernel=False), device, iters)
    dense = torch.empty(n, dtype=torch.bfloat16, device=device)
    copy_dst = torch.empty_like(dense)
    t_copy = timed(lambda: copy_dst.copy_(dense), device, iters)
    ref = moved / t_bnb / 1e9
    row("bitsandbytes dequantize_4bit", t_bnb, ref, "GB/s", ref)
    if device == "cpu":
        how = f"C++ kernel, {cpu_decode.isa()}" if cpu_decode.status() is None else "pure torch: no C++ kernel"
        row(f"slimtune ({how})", t_torch, moved / t_torch / 1e9, "GB/s", ref)
        row("slimtune pure-torch gather (cpu_kernel=False)", t_gather, moved / t_gather / 1e9, "GB/s", ref)
    else:
        row("slimtune pure torch", t_torch, moved / t_torch / 1e9, "GB/s", ref)
    if device == "cuda":
        t_tri = timed(lambda: kernels.dequantize_4bit(w, torch.bfloat16, use_triton=True), device, iters)
        row("slimtune Triton", t_tri, moved / t_tri / 1e9, "GB/s", ref)
    row("device copy of the bf16 weight (limit)", t_copy, 2 * 2 * n / t_copy / 1e9, "GB/s", ref)
    if device != "cuda":
        cpu_gemv(bnb, param, w, iters)
        print("no CUDA device: the Triton, matmul and GPU GEMV figures need a GPU (open)")
        return

    x = torch.randn(args.tokens, args.cols, device=device, dtype=torch.bfloat16)
    g = torch.randn(args.tokens, args.rows, device=device, dtype=torch.bfloat16)
    flops = 2 * args.tokens * n
    wt = param.t()
    w_dense = kernels.dequantize_4bit(w, torch.bfloat16)
    for label, a, transpose in (("forward x W^T", x, True), ("backward g W", g, False)):
        print(f"training matmul, {label}, {args.tokens} tokens (TFLOP/s; ratio vs bitsandbytes)")
        if transpose:
            t_bnb = timed(lambda: bnb.matmul_4bit(a, wt, quant_state=param.quant_state), device, iters)
        else:  # bitsandbytes has no W-side op: dequantize + matmul is what its backward does
            t_bnb = timed(lambda: a @ bnb.functional.dequantize_4bit(param.data, param.quant_state), device, iters)
        ref = flops / t_bnb / 1e12
        row("bitsandbytes", t_bnb, ref, "TFLOP/s", ref)
        t_f = timed(lambda: kernels.matmul_4bit(a, w, transpose, use_triton=True), device, iters)
        row("slimtune Triton fused dequant+matmul", t_f, flops / t_f / 1e12, "TFLOP/s", ref)
        t_d = timed(lambda: a @ (kernels.dequantize_4bit(w, torch.bfloat16, use_triton=True).T if transpose
                                 else kernels.dequantize_4bit(w, torch.bfloat16, use_triton=True)), device, iters)
        row("slimtune Triton dequant + cuBLAS", t_d, flops / t_d / 1e12, "TFLOP/s", ref)
        t_dense = timed(lambda: a @ (w_dense.T if transpose else w_dense), device, iters)
        row("dense bf16 matmul (ceiling)", t_dense, flops / t_dense / 1e12, "TFLOP/s", ref)

    print("batch-1 GEMV (GB/s of 4-bit weight read; ratio vs bitsandbytes)")
    x1 = x[:1]
    weight_bytes = n // 2 + w.absmax.numel()
    t_bnb = timed(lambda: bnb.matmul_4bit(x1, wt, quant_state=param.quant_state), device, iters)
    ref = weight_bytes / t_bnb / 1e9
    row("bitsandbytes gemv_4bit", t_bnb, ref, "GB/s", ref)
    t_g = timed(lambda: kernels.gemv_4bit(x1, w, use_triton=True), device, iters)
    row("slimtune Triton GEMV", t_g, weight_bytes / t_g / 1e9, "GB/s", ref)
    t_dense = timed(lambda: x1 @ w_dense.T, device, iters)
    row("dense bf16 GEMV (reads 4x the bytes)", t_dense, weight_bytes / t_dense / 1e9, "GB/s", ref)


if __name__ == "__main__":
    main()
