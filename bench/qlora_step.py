"""QLoRA training step: slimtune vs HF PEFT + bitsandbytes on a SmolLM2-135M-shaped model.

    .venv/bin/python bench/qlora_step.py [--seq 256] [--steps 3]

One run: a random SmolLM2-135M-shaped checkpoint is written once, then each library runs in its own
subprocess (so peak RSS is its own): load the checkpoint straight into NF4 + double quantization
(fp32 compute on CPU), add LoRA r=16 on all linear layers, and time forward + backward + AdamW steps.
Also reports the time to quantize the whole model and its memory against fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    SMOLLM2_135M,
    machine,
    median,
    peak_rss_bytes,
    random_batch,
    smollm2_shaped,
    step_parser,
    time_steps,
    train_step,
)

HERE = Path(__file__).resolve().parent


def run_slimtune(folder: Path, args) -> dict:
    from transformers import AutoConfig, LlamaForCausalLM

    import slimtune
    from slimtune.quant import QuantConfig, init_empty_weights, load_in_4bit, quant_summary

    config = AutoConfig.from_pretrained(folder)
    start = time.perf_counter()
    with init_empty_weights():
        empty = LlamaForCausalLM(config)
    model = load_in_4bit(empty, folder, QuantConfig(compute_dtype="float32"))
    load_s = time.perf_counter() - start
    summary = quant_summary(model)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    return {"load_s": load_s, "summary": str(summary), **_steps(model, args)}


def run_peft(folder: Path, args) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    load_s = time.perf_counter() - start
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules="all-linear"))
    return {"load_s": load_s, **_steps(model, args)}


def _steps(model, args) -> dict:
    model.train()
    batch = random_batch(args.batch, args.seq)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = time_steps(lambda: train_step(model, optimizer, batch), warmup=1, steps=args.steps)
    return {"step_s": median(times), "peak_rss": peak_rss_bytes(), "trainable": trainable}


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["slimtune", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.manual_seed(0)
        result = (run_slimtune if args.worker == "slimtune" else run_peft)(args.model, args)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-shaped"
        smollm2_shaped().save_pretrained(folder)
        fp32_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        results = {}
        for worker in ("slimtune", "peft"):
            cmd = [sys.executable, str(HERE / "qlora_step.py"), "--worker", worker, "--model", str(folder),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--rank", str(args.rank)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[worker] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    ours, theirs = results["slimtune"], results["peft"]
    gb = 1e9
    print(f"# QLoRA (NF4 + DQ, fp32 compute) r={args.rank} all-linear, SmolLM2-135M shape "
          f"({SMOLLM2_135M['num_hidden_layers']} layers), bs {args.batch}, seq {args.seq}, "
          f"median of {args.steps} steps; {machine()}")
    print(f"trainable params: slimtune {ours['trainable']:,}, peft {theirs['trainable']:,}")
    print("| library        | load+quantize s | s/step | peak RSS GB |")
    for name, r in (("slimtune", ours), ("peft+bnb", theirs)):
        print(f"| {name:14s} | {r['load_s']:15.2f} | {r['step_s']:6.2f} | {r['peak_rss'] / gb:11.2f} |")
    print(f"ratio step time slimtune/peft+bnb: {ours['step_s'] / theirs['step_s']:.3f}")
    print(f"ratio peak RSS  slimtune/peft+bnb: {ours['peak_rss'] / theirs['peak_rss']:.3f}")
    print(f"fp32 checkpoint: {fp32_bytes / gb:.3f} GB; slimtune after quantization: {ours['summary']}")


if __name__ == "__main__":
    main()
