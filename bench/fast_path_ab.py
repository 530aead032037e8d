"""The fast path against slimtune's pure-torch reference path, in one process, steps interleaved.

    .venv/bin/python bench/fast_path_ab.py                        # the demo's step: QLoRA, checkpointing, dropout 0.05
    .venv/bin/python bench/fast_path_ab.py --no-quantize --no-checkpointing --dropout 0

A random SmolLM2-135M-shaped checkpoint (fp32 safetensors) is written once and loaded twice through the
product's loader (``models.load_model``, streaming NF4 + double quantization unless ``--no-quantize``);
both copies get the same LoRA (r 16, all linear layers, the recipe's seed) and the trainer's optimizer
(``make_optimizer``) and loss (chunked cross-entropy); one runs ``enable_fast_path(model, "auto")``, the
other ``"torch"`` (plain LoRA layers, their one-byte dropout masks). Steps alternate between the two so the
machine's drift hits both alike; the median step of each and their ratio are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import interleaved_medians, machine, random_batch, smollm2_shaped

import slimtune
from slimtune.optim import make_optimizer
from slimtune.perf.activation_checkpointing import checkpoint_layers
from slimtune.perf.fast_path import enable_fast_path
from slimtune.perf.losses import causal_lm_loss
from slimtune.quant import QuantConfig
from slimtune.train.models import load_model


def _model(folder: Path, mode: str, args):
    model = load_model(folder, quantization=QuantConfig(compute_dtype="float32") if args.quantize else None)
    torch.manual_seed(0)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    lora_dropout=args.dropout))
    path = enable_fast_path(model, mode)
    if args.checkpointing:
        checkpoint_layers(model)
    model.train()
    return model, make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-4), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    batch = random_batch(1, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-shaped"
        smollm2_shaped().save_pretrained(folder)
        runs = {mode: _model(folder, mode, args) for mode in ("auto", "torch")}

    def step(mode: str) -> float:
        model, optimizer, _ = runs[mode]
        loss = causal_lm_loss(model, batch, reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first = {mode: step(mode) for mode in runs}  # warm-up; equal B = 0 factors: the same first loss
    t = interleaved_medians(step, list(runs), args.steps)
    print(f"# {'QLoRA (NF4 + DQ)' if args.quantize else 'LoRA'} r=16 all-linear, SmolLM2-135M shape, batch 1 × "
          f"{args.seq}, dropout {args.dropout}, checkpointing {args.checkpointing}; median of {args.steps} "
          f"interleaved steps after one warm-up; {machine()}")
    for mode, (_, _, path) in runs.items():
        print(f"| {mode} | {t[mode]:.3f} s/step | first loss {first[mode]:.6f} | {path} |")
    print(f"fast path / reference: {t['auto'] / t['torch']:.3f}")


if __name__ == "__main__":
    main()
