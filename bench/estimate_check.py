"""`slimtune estimate` against real training steps: predicted vs measured peak RSS and step time (CPU).

    .venv/bin/python bench/estimate_check.py                    # the validation table (~15 min, quiet 2-core CPU)
    .venv/bin/python bench/estimate_check.py --only v1,v5       # a subset
    .venv/bin/python bench/estimate_check.py --fit              # the fitting configurations (heap retention)
    .venv/bin/python bench/estimate_check.py --predict-only     # predictions only, incl. Llama-3-8B on --device h200

A random SmolLM2-135M-shaped checkpoint (fp32 safetensors, bench/common.py's shape) is written once; the
estimate reads its config.json like any local model. Every configuration then runs in its own subprocess
(so VmHWM, the peak RSS, is that run's own) through slimtune's product path: ``models.load_model`` (a
quantized base is quantized as it is read), ``runner.add_method`` (adapter, fast path, checkpointing) and
``Trainer.train()`` for 4 optimizer steps on random full-length rows (labels = inputs). Measured: the
process's VmHWM at the end (loading included) and the median time of steps 2-4 (the first allocates the
optimizer state); the whole subprocess is timed too.

Predictions come from ``slimtune.estimate.estimate`` on this CPU's measured profile (matmul FLOP/s, copy
and 4-bit-decode bandwidth, op cost), measured right before and right after each run (the mean of the two:
the speed of a shared machine drifts). Nothing is fitted to the
validation configurations; the fitted constants come from ``--fit``'s two configurations, which differ from
them: the glibc heap retention (``devices.CPU_HEAP_RETENTION``) and the shares of the calibration's rates a
training step reaches (``devices.CPU_COMPUTE_EFFICIENCY`` from the LoRA one, then
``CPU_DECODE_EFFICIENCY`` from the QLoRA one; ``--fit`` prints the values that would make both exact). Goal:
peak within ±15%, step time within ±30%. Timings on a busy machine swing by 5-20×: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import machine, smollm2_shaped

from slimtune.estimate import device_profile, devices, estimate
from slimtune.estimate.devices import DeviceProfile, cpu_calibration
from slimtune.estimate.memory import human
from slimtune.train.recipe import load_recipe

QLORA, LORA = "qlora-smollm2-pycode", "lora-smollm2-pycode"
PROMPT, P_TUNING = "prompt-tuning-smollm2-pycode", "p-tuning-smollm2-pycode"
_SMALL = ["training.batch_size=1", "training.gradient_accumulation_steps=1"]

# name -> (recipe, overrides). Sequence length is the row length (every row full).
FIT = {
    "f1": (QLORA, ["data.max_seq_length=256", "method.r=16"]),
    "f2": (LORA, [*_SMALL, "data.max_seq_length=256", "method.r=16", "model.gradient_checkpointing=false"]),
}
VALIDATION = {
    "v1": (QLORA, ["data.max_seq_length=128", "method.r=8"]),
    "v2": (QLORA, ["data.max_seq_length=512", "model.gradient_checkpointing=true", "training.optim=adamw_8bit"]),
    "v3": (QLORA, ["data.max_seq_length=384", "method.r=64", "training.loss=full"]),
    "v4": (QLORA, ["data.max_seq_length=256", "method.r=32", "model.gradient_checkpointing=true",
                   "training.loss=full", "training.optim=adamw_8bit"]),
    "v5": (LORA, [*_SMALL, "data.max_seq_length=128", "model.gradient_checkpointing=false"]),
    "v6": (LORA, [*_SMALL, "data.max_seq_length=512", "method.r=8", "training.optim=adamw_8bit"]),
    "v7": (LORA, [*_SMALL, "data.max_seq_length=256", "method.r=64", "training.loss=full",
                  "model.gradient_checkpointing=false"]),
    "v8": (LORA, [*_SMALL, "data.max_seq_length=384", "method.lora_dropout=0.0"]),
    "v9": (LORA, ["training.batch_size=2", "training.gradient_accumulation_steps=1", "data.max_seq_length=256",
                  "model.gradient_checkpointing=false", "training.loss=full", "method.r=8"]),
    # prompt methods: the model's own full-vocabulary loss over the virtual tokens' positions too
    "p1": (PROMPT, [*_SMALL, "data.max_seq_length=384", "method.num_virtual_tokens=128"]),
    "p2": (P_TUNING, [*_SMALL, "data.max_seq_length=256", "method.num_virtual_tokens=64"]),
    # other shapes, not used for fitting: Llama-3.2-1B and the Qwen2 family, random weights in their shapes
    "l1": (QLORA, [*_SMALL, "model.name_or_path=meta-llama/Llama-3.2-1B", "model.init=random",
                   "data.max_seq_length=256"]),
    "l2": (LORA, [*_SMALL, "model.name_or_path=meta-llama/Llama-3.2-1B", "model.init=random",
                  "data.max_seq_length=128", "model.gradient_checkpointing=true"]),
    "q1": (QLORA, [*_SMALL, "model.name_or_path=Qwen/Qwen2.5-0.5B", "model.init=random", "data.max_seq_length=256",
                   "method.r=32"]),
    "q2": (LORA, [*_SMALL, "model.name_or_path=Qwen/Qwen2.5-0.5B", "model.init=random", "data.max_seq_length=256",
                  "model.gradient_checkpointing=false", "training.optim=adamw_8bit"]),
}
# Predictions written down before a GPU run measures them (REFERENCE.md §5's shape: bs 1, seq 2048, r 16 on
# every linear layer, checkpointing, AdamW).
_LLAMA8B = ["model.name_or_path=meta-llama/Meta-Llama-3-8B", "data.max_seq_length=2048", "method.r=16",
            "model.gradient_checkpointing=true", *_SMALL]
GPU_PREDICTIONS = {
    "llama3-8b-qlora-bf16": (QLORA, [*_LLAMA8B, "model.dtype=bfloat16"]),
    "llama3-8b-qlora-fp32": (QLORA, _LLAMA8B),
    "llama3-8b-lora-bf16": (LORA, [*_LLAMA8B, "model.dtype=bfloat16"]),
}
STEPS = 4  # the first allocates the optimizer state; the median of the others is the step time


def _overrides(extra: list[str], folder: Path, out: Path) -> list[str]:
    # the measured Trainer.train() evaluates nothing: an evaluation batch of 1 keeps the estimate's own evaluation
    # term (slimtune train evaluates the base model first) out of the comparison of training steps
    return [f"model.name_or_path={folder}", "model.device=cpu", f"training.max_steps={STEPS}", "training.eval_every=0",
            "training.eval_batch_size=1", "training.save_every=0", "training.log_every=1", f"output.dir={out}",
            "output.plot=false", "demo.enabled=false", *extra]


def child(spec: dict) -> dict:
    """Run one configuration the way `slimtune train` does, on random rows; return what was measured."""
    from slimtune.train import runner
    from slimtune.train.batching import BatchIterator
    from slimtune.train.models import load_model
    from slimtune.train.runner import add_method
    from slimtune.train.trainer import Trainer

    start = time.perf_counter()
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    device = torch.device("cpu")
    if recipe.model.init == "random":  # the shapes of a named model (slimtune's table), weights made layer by layer
        model, _ = runner.load_model(recipe, device, log=lambda _: None)
    else:
        model = load_model(recipe.model.name_or_path, dtype=recipe.model.dtype, device=device,
                           quantization=recipe.quantization)
    load_hwm = _vm("VmHWM")
    add_method(model, recipe)
    settings, seq = recipe.training, recipe.data.max_seq_length
    gen = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 49152)
    rows = [{"input_ids": (ids := torch.randint(0, vocab, (seq,), generator=gen).tolist()), "labels": ids}
            for _ in range(settings.batch_size * settings.gradient_accumulation_steps * STEPS)]
    batches = BatchIterator(rows, settings.batch_size, seed=settings.seed, pad_id=0)
    run_dir = Path(tempfile.mkdtemp(prefix="estimate-check-run-"))
    trainer = Trainer(model, batches, rows[:1], settings, run_dir, device, 0, show_progress=False, log=lambda _: None)
    trainer.train()
    rows_log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = [r["train_seconds"] for r in rows_log if "train_seconds" in r]
    steps = [b - a for a, b in zip([0.0, *seconds], seconds)]
    return {"peak_rss": _vm("VmHWM"), "load_rss": load_hwm, "step_seconds": steps,
            "wall_seconds": time.perf_counter() - start}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _run_child(recipe: str, overrides: list[str], threads: int | None) -> dict:
    spec = json.dumps({"recipe": recipe, "overrides": overrides})
    started = time.perf_counter()
    extra = ["--threads", str(threads)] if threads else []
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec, *extra],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"configuration failed:\n{done.stderr[-3000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["process_seconds"] = time.perf_counter() - started
    return result


def _fresh_cpu_profile() -> DeviceProfile:
    cpu_calibration.cache_clear()
    return device_profile("cpu")


def _between(before: DeviceProfile, after: DeviceProfile) -> DeviceProfile:
    """The mean of two profiles' rates: a machine whose speed drifts while the run takes its minute."""
    return replace(before, matmul_flops=(before.matmul_flops + after.matmul_flops) / 2,
                   bandwidth=(before.bandwidth + after.bandwidth) / 2,
                   dequant_bandwidth=(before.dequant_bandwidth + after.dequant_bandwidth) / 2,
                   op_overhead=(before.op_overhead + after.op_overhead) / 2)


def _describe(recipe: str, extra: list[str]) -> str:
    kind = {QLORA: "QLoRA", LORA: "LoRA", PROMPT: "prompt tuning", P_TUNING: "P-tuning"}[recipe]
    short = [o.split(".", 1)[1].replace("gradient_checkpointing", "ckpt").replace("max_seq_length", "seq")
             for o in extra if not o.startswith(("training.batch_size=1", "training.gradient_accumulation_steps=1"))]
    return f"{kind} " + " ".join(short)


def _err(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured:+.0%}" if measured else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated configuration names (v1,v2,... or f1,f2)")
    parser.add_argument("--fit", action="store_true", help="run the fitting configurations instead")
    parser.add_argument("--predict-only", action="store_true", help="print predictions, run nothing")
    parser.add_argument("--device", default="h200", help="GPU profile for the Llama-3-8B predictions")
    parser.add_argument("--threads", type=int, help="torch threads for the calibration and every run (default: "
                        "torch's); 1 is steadier on a busy machine")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    began = time.perf_counter()
    configs = FIT if args.fit else VALIDATION
    if args.only:
        configs = {k: v for k, v in {**FIT, **VALIDATION}.items() if k in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="estimate-check-"))
    try:
        _compare(args, configs, work, began)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the 0.5 GB checkpoint


def _compare(args: argparse.Namespace, configs: dict[str, tuple[str, list[str]]], work: Path, began: float) -> None:
    folder = work / "smollm2-135m-random"
    smollm2_shaped(seed=0).save_pretrained(folder)  # fp32 safetensors + config.json
    cpu = device_profile("cpu")
    print(f"# estimate vs measured — {machine()}\n# cpu profile: {cpu.source}; process baseline "
          f"{human(cpu.context)}\n")
    rows = []
    header = ("| config | what | predicted peak | measured peak | error | predicted step | measured step | error | "
              "GFLOP/s the estimate uses |")  # the measured matmul rate × the efficiency the estimator applies
    print(header + "\n|" + "---|" * 9)
    for name, (recipe_name, extra) in configs.items():
        overrides = _overrides(extra, folder, work / name)
        measured_run: dict = {}
        if not args.predict_only:  # the CPU measured right before and right after the run: the load it saw
            before = _fresh_cpu_profile()
            measured_run = _run_child(recipe_name, overrides, args.threads)
            cpu = _between(before, _fresh_cpu_profile())
        est = estimate(load_recipe(recipe_name, overrides), device=cpu, advise=False)
        assert est.time is not None
        row: dict = {"config": name, "what": _describe(recipe_name, extra), "predicted_peak": est.peak,
                     "predicted_step": est.time.seconds, "predicted_decode": est.time.dequant_seconds,
                     "cpu_gflops": cpu.matmul_flops / 1e9,
                     "components": {c.label: c.bytes for c in est.memory.components}, **measured_run}
        if measured_run:
            row["measured_step"] = statistics.median(row["step_seconds"][1:])
        rows.append(row)
        measured = (f"{human(row['peak_rss'])} | {_err(est.peak, row['peak_rss'])} | {est.time.seconds:.2f} s | "
                    f"{row['measured_step']:.2f} s | {_err(est.time.seconds, row['measured_step'])}"
                    if "peak_rss" in row else f"- | - | {est.time.seconds:.2f} s | - | -")
        measured += f" | {cpu.matmul_flops / 1e9:.0f}"
        print(f"| {name} | {row['what']} | {human(est.peak)} | {measured} |", flush=True)
    if any("peak_rss" in r for r in rows):
        peak_err = max(abs(r["predicted_peak"] - r["peak_rss"]) / r["peak_rss"] for r in rows)
        step_err = max(abs(r["predicted_step"] - r["measured_step"]) / r["measured_step"] for r in rows)
        print(f"\nlargest error: peak {peak_err:.0%} (goal ±15%), step time {step_err:.0%} (goal ±30%)")
        if args.fit:
            _print_retention(rows)
            _print_efficiency(rows)
    print(f"\n# predictions on --device {args.device} (not measured here)\n")
    print("| config | peak | step | tokens/s |\n|---|---|---|---|")
    for name, (recipe_name, extra) in GPU_PREDICTIONS.items():
        est = estimate(load_recipe(recipe_name, [*extra, f"output.dir={work / name}"]), device=args.device,
                       advise=False)
        assert est.time is not None
        print(f"| {name} | {human(est.peak)} | {est.time.seconds:.2f} s | {est.time.tokens_per_second:,.0f} |")
        rows.append({"config": name, "device": args.device, "predicted_peak": est.peak,
                     "predicted_step": est.time.seconds})
    print(f"\nwhole command: {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _print_efficiency(rows: list[dict]) -> None:
    """The shares of the calibration's rates a training step reaches (devices.CPU_COMPUTE_EFFICIENCY and
    CPU_DECODE_EFFICIENCY) that would make the predictions of f2 (LoRA: compute only) and then f1 (QLoRA: compute
    and 4-bit decode) exact, from the predictions made with the current shares."""
    by_name = {r["config"]: r for r in rows}
    if not {"f1", "f2"} <= set(by_name):
        return
    lora, qlora = by_name["f2"], by_name["f1"]
    speed = lora["predicted_step"] / lora["measured_step"]  # > 1: the step is slower than predicted
    compute = devices.CPU_COMPUTE_EFFICIENCY * speed
    rest = (qlora["predicted_step"] - qlora["predicted_decode"]) / speed  # f1's compute, at the fitted share
    decode_time = qlora["measured_step"] - rest
    if decode_time <= 0:
        print(f"compute share {compute:.2f}; f1's decode time is within the noise (no decode share fitted)")
        return
    decode = devices.CPU_DECODE_EFFICIENCY * qlora["predicted_decode"] / decode_time
    print(f"fitted shares: CPU_COMPUTE_EFFICIENCY = {compute:.2f}, CPU_DECODE_EFFICIENCY = {decode:.2f} "
          f"(now {devices.CPU_COMPUTE_EFFICIENCY}, {devices.CPU_DECODE_EFFICIENCY})")


def _print_retention(rows: list[dict]) -> None:
    """The share of the step's activation + loss memory that the measured peak holds beyond the live bytes."""
    for r in rows:
        comps = r["components"]
        slack = comps.get("allocator slack", 0)
        dynamic = sum(v for k, v in comps.items() if k.startswith(("activations", "loss", "backward")))
        live = r["predicted_peak"] - slack
        print(f"{r['config']}: measured {human(r['peak_rss'])}, live bytes predicted {human(live)}: heap retention "
              f"{(r['peak_rss'] - live) / max(dynamic, 1):.2f} of {human(dynamic)}")


if __name__ == "__main__":
    main()
