"""The estimate for people (a table) and for tools (JSON, ``schema`` 1)."""

from __future__ import annotations

from typing import Any

from slimtune.estimate.estimator import Estimate
from slimtune.estimate.memory import human
from slimtune.estimate.per_rank import loads_per_rank

__all__ = ["format_estimate", "estimate_json", "SCHEMA_VERSION", "human_seconds"]

SCHEMA_VERSION = 1


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e12 else f"{n / 1e9:.1f} GFLOP"


def format_estimate(est: Estimate) -> str:
    """The breakdown table, the peak and whether it fits, the step and run time, and the advice."""
    r, shape, dev, mem = est.recipe, est.shape, est.device, est.memory
    t = r.training
    quant = "none" if r.quantization is None else f"{r.quantization.bits}-bit {r.quantization.quant_type}"
    lines = [
        f"recipe  {r.name}: {r.method.peft_type} on {r.model.name_or_path} ({shape.model_type}, "
        f"{_count(shape.params)} params, {shape.layers} layers)",
        f"        config from {shape.source}",
        f"run     batch {t.batch_size} × seq {r.data.max_seq_length} × accumulation {t.gradient_accumulation_steps}, "
        f"quantization {quant}, dtype {r.model.dtype}{', bf16 autocast' if est.precision.autocast else ''}, "
        f"optim {t.optim}, checkpointing {str(r.model.gradient_checkpointing).lower()}, "
        f"loss {'chunked' if est.chunked else 'full'}",
        f"device  {dev.name}: {human(dev.memory)}"
        + (f" ({human(dev.free)} free now)" if dev.free is not None else "") + f"; {dev.source}",
    ]
    if est.distribution is not None:
        d = est.distribution
        shared = (f"; {d.per_machine} ranks share this machine's memory" if not dev.on_gpu and d.per_machine > 1
                  else "")
        lines.append(f"ranks   {d}{shared}")
    lines.append("")
    width = max(len(c.label) for c in mem.components)
    lines.append(f"  {'component':<{width}}  {'memory':>10}  why")
    for c in mem.components:
        if not c.bytes:
            continue
        where = "" if c.on_device else "  [host memory, not on the device]"
        lines.append(f"  {c.label:<{width}}  {human(c.bytes):>10}  {c.why}{where}")
    lines.append(f"  {'─' * width}  {'─' * 10}")
    lines.append(f"  {'peak while training':<{width}}  {human(mem.train_peak):>10}")
    if mem.load_peak:
        sharded = est.distribution is not None and est.distribution.strategy == "fsdp" and loads_per_rank(r) \
            and not est.shape.fused_expert_params
        how = ("the whole model in full precision, then quantized (transformers merges its experts while loading)"
               if est.shape.fused_expert_params else "quantized weights + one full-precision weight being quantized"
               + (" (with per-rank loading: the rank's rows)" if sharded else ""))
        lines.append(f"  {'peak while loading':<{width}}  {human(mem.load_peak):>10}  {how}")
    verdict = "fits" if est.fits else "does NOT fit"
    needed = f"{human(est.needed)} ({human(est.peak)} per rank)" if est.needed != est.peak else human(est.peak)
    lines.append(f"\npeak {needed}: {verdict} in {human(est.limit)}"
                 f"{' free' if dev.free is not None else ''} on {dev.name}")
    lines += [f"note: {n}" for n in mem.notes]
    if est.time is not None:
        s = est.time
        lines.append("")
        lines.append(f"step    {human_seconds(s.seconds)} per optimizer step, {s.tokens_per_second:,.0f} tokens/s "
                     f"({s.tokens:,} tokens per step at full-length rows)")
        lines.append(f"        matmuls {human_seconds(s.matmul_seconds)} (forward {_flops(s.forward_flops)}, backward "
                     f"{_flops(s.backward_flops)}, recompute {_flops(s.recompute_flops)} per micro-batch)")
        if s.dequant_bytes:
            lines.append(f"        4-bit decode {human_seconds(s.dequant_seconds)} "
                         f"({s.dequant_bytes / 1e9:.1f} GB moved)")
        lines.append(f"        element-wise {human_seconds(s.elementwise_seconds)} ({s.elementwise_bytes / 1e9:.1f} GB "
                     f"moved), optimizer {human_seconds(s.optimizer_seconds)}, "
                     f"dispatch {human_seconds(s.overhead_seconds)}"
                     f" ({s.ops:,} ops)")
        if est.run_seconds is not None:
            lines.append(f"run     {human_seconds(est.run_seconds)} for {est.total_steps:,} steps ({est.steps_note})"
                         + (f", incl. {human_seconds(est.eval_seconds)} of evaluation" if est.eval_seconds else ""))
        else:
            lines.append(f"run     {est.steps_note}")
    if est.advice:
        lines.append("\nchanges that lower the peak (each re-estimated; new peak, step time):")
        for a in est.advice:
            step = f", {human_seconds(a.step_seconds)}/step" if a.step_seconds is not None else ""
            peak = f"{human(a.needed)} ({human(a.peak)} per rank)" if a.needed > a.peak else human(a.peak)
            lines.append(f"  {'✓' if a.fits else '✗'} {a.label} → {peak}{step}")
            lines.append(f"      {_train_command(est)} {r.command_line(*a.overrides)}")
    return "\n".join(lines)


def _train_command(est: Estimate) -> str:
    """``slimtune train`` as the estimate's ranks run it: one node with --nproc-per-node, several through torchrun."""
    d = est.distribution
    if d is None or d.ranks == 1:
        return "slimtune train"
    if d.ranks == d.per_machine:
        return f"slimtune train --nproc-per-node {d.ranks}"
    return f"torchrun --nnodes {d.ranks // d.per_machine} --nproc-per-node {d.per_machine} -m slimtune train"


def estimate_json(est: Estimate) -> dict[str, Any]:
    """Everything the table shows, in bytes and seconds."""
    r, shape, dev, mem = est.recipe, est.shape, est.device, est.memory
    out: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "recipe": r.name,
        "model": {"name": r.model.name_or_path, "model_type": shape.model_type, "config_source": shape.source,
                  "params": shape.params, "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab},
        "method": {"peft_type": r.method.peft_type, "trainable_params": est.layout.trainable_params,
                   "wrapped_layers": len(est.layout.wrapped)},
        "device": {"name": dev.name, "kind": dev.kind, "memory_bytes": dev.memory, "free_bytes": dev.free,
                   "limit_bytes": est.limit, "matmul_flops": dev.matmul_flops, "bandwidth_bytes_per_s": dev.bandwidth,
                   "source": dev.source},
        "memory": {
            "components": [{"key": c.key, "label": c.label, "bytes": c.bytes, "why": c.why, "on_device": c.on_device}
                           for c in mem.components],
            "train_peak_bytes": mem.train_peak,
            # without the process / CUDA context and allocator slack: what torch.cuda.max_memory_allocated
            # (the trainer's GPU peak) counts
            "allocated_peak_bytes": mem.train_peak - mem.component("overhead"),
            "load_peak_bytes": mem.load_peak,
            "peak_bytes": est.peak,
            "host_bytes": mem.host_extra,
            "fits": est.fits,
            "notes": mem.notes,
        },
        "distribution": None if est.distribution is None else {
            "strategy": est.distribution.strategy, "ranks": est.distribution.ranks,
            "per_machine": est.distribution.per_machine, "cpu_offload": est.distribution.cpu_offload,
            "needed_bytes": est.needed},
        "time": None,
        "advice": [{"label": a.label, "overrides": a.overrides, "peak_bytes": a.peak, "needed_bytes": a.needed,
                    "fits": a.fits,
                    "step_seconds": a.step_seconds} for a in est.advice],
    }
    if est.time is not None:
        s = est.time
        out["time"] = {
            "step_seconds": s.seconds, "tokens_per_step": s.tokens, "tokens_per_second": s.tokens_per_second,
            "forward_flops": s.forward_flops, "backward_flops": s.backward_flops, "recompute_flops": s.recompute_flops,
            "matmul_seconds": s.matmul_seconds, "dequant_bytes": s.dequant_bytes, "dequant_seconds": s.dequant_seconds,
            "elementwise_bytes": s.elementwise_bytes, "elementwise_seconds": s.elementwise_seconds,
            "optimizer_seconds": s.optimizer_seconds, "overhead_seconds": s.overhead_seconds, "ops": s.ops,
            "total_steps": est.total_steps, "steps_note": est.steps_note, "eval_seconds": est.eval_seconds,
            "run_seconds": est.run_seconds,
        }
    return out
