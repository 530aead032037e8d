"""QLoRA training step on the CPU: slimtune's product path vs HF PEFT + bitsandbytes, with a floor.

    .venv/bin/python bench/qlora_step.py [--seq 256] [--steps 5] [--rounds 2]

A random SmolLM2-135M-shaped checkpoint (fp32 safetensors) is written once; then three workers run, each
in its own subprocess so its peak RSS is its own, ``--rounds`` times in turn (the best median of each is
reported, so a burst of machine noise hits one round, not the comparison):

- ``slimtune``: ``slimtune.train.models.load_model`` with a ``quantization`` section (meta-device model,
  NF4 + double quantization per layer from the file), LoRA r=16 on all linear layers, the fast path
  ``slimtune train`` enables (``enable_fast_path(model, "auto")``) and the trainer's chunked loss.
- with ``--compile``, also ``slimtune+compile``: the same with each decoder block torch.compile'd, as recipes'
  ``training.compile: true`` does (``slimtune.perf.compilation.compile_blocks``): the 4-bit decode is traced
  into each block's graph; its first step (compiling) is printed.
- ``peft+bnb``: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))`` then
  ``peft.get_peft_model`` with the same LoRA; transformers' loss.
- ``floor``: the same model unquantized and without an adapter, every weight frozen, the input embeddings'
  output requiring grad (``enable_input_require_grads``): forward + backward compute the activation
  gradients a LoRA step needs and no weight gradients. A QLoRA step cannot do less matmul work than this.

All three: fp32 compute, no dropout, labels = the input ids (every token), the same batch. AdamW on the
trainable tensors: slimtune's from the trainer's ``make_optimizer``, PEFT's as transformers' ``Trainer`` makes
it by default (``adamw_torch_fused``); both run torch's fused AdamW kernel. The first step's losses are
printed and must agree within 1e-4 (the LoRA B factors start at zero, and slimtune's NF4 bytes are
bitsandbytes'). Peak RSS is VmHWM: it counts file-backed
pages of memory-mapped checkpoints too (transformers maps safetensors files; slimtune reads them with
pread, so none).
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
from common import SMOLLM2_135M, machine, median, peak_rss_bytes, random_batch, smollm2_shaped, step_parser

HERE = Path(__file__).resolve().parent
RANK_ALPHA = 2  # lora_alpha = 2 r


def _settings(model, dropout: float, optimizer) -> dict:
    fused = optimizer is not None and optimizer.param_groups[0]["fused"]
    return {"threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "dropout": dropout, "labels": "input ids (all tokens)",
            "optimizer": "none" if optimizer is None else f"AdamW{' (fused)' if fused else ''}"}


def run_slimtune(folder: Path, args, compile_blocks: bool = False) -> dict:
    import slimtune
    from slimtune.optim import make_optimizer
    from slimtune.perf import compilation
    from slimtune.perf.fast_path import enable_fast_path
    from slimtune.perf.losses import causal_lm_loss
    from slimtune.quant import QuantConfig
    from slimtune.train.models import load_model

    start = time.perf_counter()
    model = load_model(folder, quantization=QuantConfig(compute_dtype="float32"))
    load_s = time.perf_counter() - start
    slimtune.add_adapter(model, slimtune.LoraConfig(r=args.rank, lora_alpha=RANK_ALPHA * args.rank,
                                                    target_modules="all-linear", lora_dropout=0.0))
    fast = enable_fast_path(model, "auto")
    for module in model.modules():
        if hasattr(module, "keep_dequantized"):
            module.keep_dequantized = args.keep_dequantized
    if compile_blocks:
        compilation.compile_blocks(model)
    loss = lambda m, b: causal_lm_loss(m, b, reduction="mean")  # noqa: E731 - the trainer's loss
    return {"load_s": load_s, "fast_path": str(fast), **_steps(model, args, loss, make_optimizer)}


def run_peft(folder: Path, args) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    load_s = time.perf_counter() - start
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=RANK_ALPHA * args.rank,
                                                       target_modules="all-linear", lora_dropout=0.0))
    return {"load_s": load_s, **_steps(model, args, lambda m, b: m(**b).loss, _trainer_default_adamw)}


def run_floor(folder: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    load_s = time.perf_counter() - start
    model.requires_grad_(False)
    model.enable_input_require_grads()  # the embedding output requires grad: activation gradients only
    return {"load_s": load_s, **_steps(model, args, lambda m, b: m(**b).loss, None)}


def _trainer_default_adamw(name, params, lr):
    """The AdamW transformers' ``Trainer`` builds by default (``optim="adamw_torch_fused"`` on torch >= 2.8)."""
    return torch.optim.AdamW(params, lr=lr, fused=True)


def _steps(model, args, loss_of, build_optimizer) -> dict:
    model.train()
    batch = random_batch(args.batch, args.seq)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw", trainable, lr=1e-4) if build_optimizer is not None else None
    losses, times = [], []
    for _ in range(1 + args.steps):  # the first step warms up (allocator, one-time caches) and gives the loss
        start = time.perf_counter()
        loss = loss_of(model, batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        for p in trainable:
            p.grad = None
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {"step_s": median(times[1:]), "first_step_s": times[0], "first_loss": losses[0],
            "peak_rss": peak_rss_bytes(),
            "trainable": sum(p.numel() for p in trainable) if optimizer is not None else 0,
            "settings": _settings(model, 0.0, optimizer)}


WORKERS = {"slimtune": run_slimtune, "peft+bnb": run_peft, "floor": run_floor,
           "slimtune+compile": lambda folder, args: run_slimtune(folder, args, compile_blocks=True)}


def _run_worker(worker: str, folder: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--model", str(folder),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--rank", str(args.rank)]
    if args.keep_dequantized:
        cmd.append("--keep-dequantized")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {worker} failed:\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="run every worker this many times, in turn")
    parser.add_argument("--keep-dequantized", action="store_true",
                        help="slimtune keeps each dequantized weight for its backward (training.keep_dequantized)")
    parser.add_argument("--compile", action="store_true", help="add a run with each block torch.compile'd")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.set_defaults(steps=5)
    args = parser.parse_args()
    if args.worker:
        torch.manual_seed(0)
        print("RESULT " + json.dumps(WORKERS[args.worker](args.model, args)))
        return

    runs: dict[str, list[dict]] = {name: [] for name in WORKERS if args.compile or name != "slimtune+compile"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-shaped"
        smollm2_shaped().save_pretrained(folder)
        for _ in range(args.rounds):
            for name in runs:
                runs[name].append(_run_worker(name, folder, args))
    best = {name: min(results, key=lambda r: r["step_s"]) for name, results in runs.items()}
    ours, theirs, floor = best["slimtune"], best["peft+bnb"], best["floor"]
    mib = 2**20
    print(f"# QLoRA (NF4 + DQ, fp32 compute) r={args.rank} all-linear, SmolLM2-135M shape "
          f"({SMOLLM2_135M['num_hidden_layers']} layers), batch {args.batch} × seq {args.seq}, median of "
          f"{args.steps} steps after one warm-up, best of {args.rounds} rounds; {machine()}")
    for name, r in best.items():
        print(f"settings {name:9s}: {r['settings']}")
    print(f"slimtune fast path: {ours['fast_path']}")
    print(f"trainable params: slimtune {ours['trainable']:,}, peft {theirs['trainable']:,}")
    print("| run      | load s | s/step (each round)   | peak RSS MiB (VmHWM) | first-step loss | first step s |")
    print("|---|---|---|---|---|---|")
    for name, r in best.items():
        rounds = ", ".join(f"{x['step_s']:.3f}" for x in runs[name])
        print(f"| {name} | {r['load_s']:.2f} | {r['step_s']:.3f} ({rounds}) | {r['peak_rss'] / mib:.0f} | "
              f"{r['first_loss']:.6f} | {r['first_step_s']:.1f} |")
    gap = abs(ours["first_loss"] - theirs["first_loss"])
    print(f"first-step loss |slimtune − peft+bnb| = {gap:.2e} ({'OK' if gap <= 1e-4 else 'DIFFERENT WORK'}, ≤ 1e-4)")
    goal = max(0.8 * theirs["step_s"], 1.05 * floor["step_s"])
    print(f"step time  slimtune/peft+bnb: {ours['step_s'] / theirs['step_s']:.3f}   slimtune/floor: "
          f"{ours['step_s'] / floor['step_s']:.3f}   goal ≤ max(0.8× peft+bnb, 1.05× floor) = {goal:.3f} s: "
          f"{'met' if ours['step_s'] <= goal else 'NOT met'}")
    print(f"peak RSS   slimtune/peft+bnb: {ours['peak_rss'] / theirs['peak_rss']:.3f}   goal ≤ 0.8: "
          f"{'met' if ours['peak_rss'] <= 0.8 * theirs['peak_rss'] else 'NOT met'}")
    if args.compile:
        c = best["slimtune+compile"]
        gap = abs(c["first_loss"] - theirs["first_loss"])
        print(f"slimtune+compile: step /peft+bnb {c['step_s'] / theirs['step_s']:.3f}   /floor "
              f"{c['step_s'] / floor['step_s']:.3f}   /slimtune {c['step_s'] / ours['step_s']:.3f}: goal "
              f"{'met' if c['step_s'] <= goal else 'NOT met'}; peak RSS /peft+bnb "
              f"{c['peak_rss'] / theirs['peak_rss']:.3f}; "
              f"first-step loss gap {gap:.2e}")


if __name__ == "__main__":
    main()
