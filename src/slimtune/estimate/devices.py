"""Devices: how much memory, how fast. Measured on this machine (CPU, a present GPU) or declared (profiles).

A CPU's figures are measured in a second or so: its matmul FLOP/s on a ``(512 × 1024) @ (1024 × 2048)`` fp32
product (torch's threads, as training uses them), its copy bandwidth on a 64 MiB tensor, the effective
bandwidth of slimtune's own 4-bit decode on a 1024 × 2048 weight, and the cost of one small autograd op.
Its fixed memory is the resident set of a fresh Python that imported slimtune's training stack (measured
once in a subprocess, then cached). GPU profiles are declared: achievable dense bf16 matmul FLOP/s and copy
bandwidth, and a context + workspace allowance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch
import transformers

from slimtune.core.files import atomic_write, cache_root
from slimtune.quant.nf4 import dequantize_4bit, double_dequantize, double_quantize, quantize_4bit

__all__ = ["DeviceProfile", "PROFILES", "parse_memory", "device_profile", "cpu_calibration", "process_rss",
           "baseline_rss", "DEQUANT_BYTES_PER_WEIGHT"]

GiB = 2**30
# Bytes moved per weight by slimtune's pure-torch 4-bit decode (slimtune.quant.nf4.dequantize_4bit): read the
# packed byte (0.5), widen it to an int32 index (write 2, read 2), gather an 8-byte pair of fp32 codes (write 4),
# scale by the block's absmax in place (read 4, write 4); a bf16 matmul adds a cast (read 4, write 2). On CPUs it
# is the unit of the calibrated decode rate, which times the decode the process runs (the C++ kernel of
# slimtune.quant.cpu_decode where it builds: 4.5 bytes per weight really moved, ~4.5x the gather's rate).
DEQUANT_BYTES_PER_WEIGHT = {4: 16.5, 2: 22.5}
# glibc keeps freed heap memory for reuse: on the fitting configurations of bench/estimate_check.py --fit
# (QLoRA and LoRA, seq 256, r 16, dropout 0.05), the peak RSS sat 0.66 and 0.63 of the step's activation +
# loss memory above the live bytes (CPU dropout's float noise tensors churn the heap on top of what is kept).
CPU_HEAP_RETENTION = 0.65
# A training step reaches only part of the rates the calibration measures (one large matmul, one long copy, one
# hot 4-bit decode, each timed at its best): its matmuls are smaller and skinnier, its element-wise ops short,
# and each weight's decode runs cold between two matmuls. The shares below, fitted by bench/estimate_check.py
# --fit on its two fitting configurations (SmolLM2 shape, seq 256: LoRA gives the compute share, QLoRA then the
# decode share), scale the measured rates of a CPU profile.
CPU_COMPUTE_EFFICIENCY = 0.67
CPU_DECODE_EFFICIENCY = 0.30
# PyTorch's caching allocator: fragmentation of the blocks it holds, on top of the allocated peak.
CUDA_ALLOCATOR_SLACK = 0.08


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # "cpu" or "cuda"
    memory: int  # bytes the run may use (device memory, or --memory)
    matmul_flops: float  # achievable FLOP/s of large matmuls in the training's matmul dtype
    bandwidth: float  # bytes/s of copies and element-wise ops
    dequant_bandwidth: float  # bytes/s of slimtune's 4-bit decode, bytes counted as DEQUANT_BYTES_PER_WEIGHT
    op_overhead: float  # seconds of dispatch / launch per op
    context: int  # fixed memory: the process baseline (CPU) or CUDA context + workspaces
    heap_retention: float  # allocator slack, as a share of the step's transient memory
    source: str  # how the figures were obtained
    free: int | None = None  # memory free right now (measured), if known

    @property
    def on_gpu(self) -> bool:
        return self.kind == "cuda"

    def with_memory(self, memory: int) -> DeviceProfile:
        return replace(self, memory=memory, free=None,
                       source=self.source + f"; memory declared: {memory / GiB:.2f} GiB")


def _gpu(name: str, memory_gib: float, tflops: float, tb_s: float, note: str) -> DeviceProfile:
    return DeviceProfile(name=name, kind="cuda", memory=int(memory_gib * GiB), matmul_flops=tflops * 1e12,
                         bandwidth=tb_s * 1e12, dequant_bandwidth=tb_s * 1e12, op_overhead=8e-6,
                         context=int(0.6 * GiB), heap_retention=CUDA_ALLOCATOR_SLACK, source=f"declared: {note}")


PROFILES: dict[str, DeviceProfile] = {
    "h200": _gpu("h200", 140, 790, 4.3, "H200 141 GB HBM3e, ~790 TFLOP/s dense bf16 reached, ~4.3 TB/s copy"),
    "h100": _gpu("h100", 79.2, 800, 3.0, "H100 80 GB SXM, ~800 TFLOP/s bf16 matmul and ~3.0 TB/s copy measured "
                 "(REFERENCE.md §5)"),
    "a100-80gb": _gpu("a100-80gb", 79.2, 280, 1.7, "A100 80 GB, 312 TFLOP/s bf16 peak, ~90% reached; 2.0 TB/s peak"),
    "a100-40gb": _gpu("a100-40gb", 39.4, 280, 1.4, "A100 40 GB, 312 TFLOP/s bf16 peak, 1.6 TB/s peak"),
    "l4": _gpu("l4", 22.0, 100, 0.27, "L4 24 GB, 121 TFLOP/s bf16 peak, 300 GB/s"),
    "rtx4090": _gpu("rtx4090", 23.6, 150, 0.9, "RTX 4090 24 GB, 165 TFLOP/s bf16 peak, 1.0 TB/s"),
    "rtx3090": _gpu("rtx3090", 23.6, 65, 0.85, "RTX 3090 24 GB, 71 TFLOP/s bf16 peak, 936 GB/s"),
}
_GPU_NAMES = {"H200": "h200", "H100": "h100", "A100-SXM4-80GB": "a100-80gb", "A100 80GB": "a100-80gb",
              "A100": "a100-40gb", "L4": "l4", "4090": "rtx4090", "3090": "rtx3090"}

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": GiB, "gb": GiB, "gib": GiB, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``"24GB"``, ``"24 GiB"``, ``"1.5T"``, ``"800MB"`` → bytes. GB and GiB both mean 2**30 (devices are sold
    in binary sizes: a "24 GB" card holds 24 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or (unit in ("", "b") and "." in match.group(1)):
        raise ValueError(f"--memory {text!r} is not a memory size; write a number and a unit, e.g. 24GB, 80GiB, "
                         "512MB or 1.5TB (GB = GiB = 2**30 bytes).")
    if unit == "":  # "12" is far more likely 12 GB than 12 bytes: say so rather than guess
        raise ValueError(f"--memory {text!r} has no unit; write e.g. {match.group(1)}GB (or {match.group(1)}B for "
                         "bytes).")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"--memory {text!r} must be more than zero.")
    return value


def process_rss(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), in bytes (0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# The training stack imported, then one tiny training step (it initialises the math libraries' thread pools
# and workspaces, the autograd engine and transformers' model code, as a real run does).
_BASELINE_CODE = """
import torch, slimtune.train.runner, slimtune.train.trainer
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
ids = torch.randint(0, 256, (1, 32))
model(input_ids=ids, labels=ids).loss.backward()
for line in open('/proc/self/status'):
    if line.startswith('VmHWM:'):
        print(int(line.split()[1]) * 1024)
"""


def baseline_rss(run: Callable[[], int] | None = None) -> int:
    """Peak RSS of a fresh Python that imports slimtune's training stack (torch, transformers, matplotlib ...)
    and runs one tiny training step, measured once in a subprocess and cached per interpreter and versions."""
    key = f"{sys.executable}|{torch.__version__}|{transformers.__version__}|{torch.get_num_threads()}|2"
    path = cache_root() / "estimate" / "baseline_rss.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return int(cached["bytes"])
    except (OSError, ValueError):
        pass
    value = run() if run is not None else _measure_baseline()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"key": key, "bytes": value}).encode())
    except OSError:
        pass
    return value


def _measure_baseline() -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", _BASELINE_CODE], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return process_rss()  # this process has torch and transformers loaded: close enough
    return int(lines[-1])


def _best_time(fn: Callable[[], object], min_seconds: float = 0.15, rounds: int = 3) -> float:
    """Best per-call time of ``fn`` over ``rounds`` rounds of at least ``min_seconds`` each."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


@dataclass(frozen=True)
class CpuCalibration:
    matmul_flops: float
    bandwidth: float
    dequant_bandwidth: float
    op_overhead: float


@cache
def cpu_calibration() -> CpuCalibration:
    """Measure this CPU (see the module docstring); about a second, once per process."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 1024, generator=gen), torch.randn(1024, 2048, generator=gen)
    flops = 2 * 512 * 1024 * 2048 / _best_time(lambda: a @ b)
    src = torch.ones(16 * 2**20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src))
    w = torch.randn(1024, 2048, generator=gen)
    packed, absmax = quantize_4bit(w, "nf4", 64)
    codes, nested, offset = double_quantize(absmax)
    out = torch.empty(w.numel())

    def decode() -> torch.Tensor:
        return dequantize_4bit(packed, double_dequantize(codes, nested, offset), w.shape, "nf4", 64, out=out)

    dequant = DEQUANT_BYTES_PER_WEIGHT[4] * w.numel() / _best_time(decode)
    x = torch.ones(8, requires_grad=True)
    op = _best_time(lambda: (x * 2.0).sum().backward(), min_seconds=0.05) / 4  # mul, sum and their backward
    return CpuCalibration(flops, bandwidth, dequant, op)


def _cpu_profile(measure_baseline: bool) -> DeviceProfile:
    cal = cpu_calibration()
    context = baseline_rss() if measure_baseline else process_rss()
    total, available = _meminfo("MemTotal"), _meminfo("MemAvailable")
    compute, decode = CPU_COMPUTE_EFFICIENCY, CPU_DECODE_EFFICIENCY
    return DeviceProfile(
        name="cpu", kind="cpu", memory=total or 16 * GiB, matmul_flops=cal.matmul_flops * compute,
        bandwidth=cal.bandwidth * compute, dequant_bandwidth=cal.dequant_bandwidth * decode,
        op_overhead=cal.op_overhead / compute, context=context,
        heap_retention=CPU_HEAP_RETENTION, free=(available + process_rss()) if available else None,
        source=f"measured: {cal.matmul_flops / 1e9:.0f} GFLOP/s fp32 matmul, {cal.bandwidth / 1e9:.1f} GB/s copy, "
               f"{cal.dequant_bandwidth / 1e9:.1f} GB/s 4-bit decode, {torch.get_num_threads()} threads; a training "
               f"step reaches {compute:.2f} of them ({decode:.2f} of the decode; fitted)")


def _cuda_profile(name: str) -> DeviceProfile:
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU on this machine; name a GPU profile instead "
                         f"({', '.join(PROFILES)}) or give --memory with it.")
    device = torch.device(name)
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    known = next((PROFILES[v] for k, v in _GPU_NAMES.items() if k in props.name), None)
    if known is not None:
        return replace(known, name=f"{name} ({props.name})", memory=total, free=free,
                       source=known.source + f"; memory measured: {total / GiB:.1f} GiB, {free / GiB:.1f} GiB free")
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    src = torch.empty(256 * 2**20, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def matmul() -> None:
        a @ a
        torch.cuda.synchronize(device)

    def copy() -> None:
        dst.copy_(src)
        torch.cuda.synchronize(device)

    flops = 2 * 4096**3 / _best_time(matmul)
    bandwidth = 2 * src.numel() / _best_time(copy)
    return DeviceProfile(name=f"{name} ({props.name})", kind="cuda", memory=total, matmul_flops=flops,
                         bandwidth=bandwidth, dequant_bandwidth=bandwidth, op_overhead=8e-6, context=int(0.6 * GiB),
                         heap_retention=CUDA_ALLOCATOR_SLACK, free=free,
                         source=f"measured: {flops / 1e12:.0f} TFLOP/s bf16 matmul, {bandwidth / 1e12:.2f} TB/s copy")


def device_profile(name: str = "auto", memory: str | int | None = None, measure_baseline: bool = True) -> DeviceProfile:
    """The profile of ``name``: ``auto``/``cpu``/``cuda[:N]`` (this machine, measured) or a GPU in
    :data:`PROFILES` (declared). ``memory`` (bytes or "24GB") overrides the memory the run may use."""
    key = name.strip().lower()
    if key == "auto":
        key = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        profile = _cpu_profile(measure_baseline)
    elif key == "cuda" or re.fullmatch(r"cuda:\d+", key):
        profile = _cuda_profile(key)
    elif key in PROFILES:
        profile = PROFILES[key]
    else:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or one of {', '.join(PROFILES)} "
                         "(GPU profiles; add --memory for another size).")
    if memory is not None:
        profile = profile.with_memory(parse_memory(memory) if isinstance(memory, str) else int(memory))
    return profile
