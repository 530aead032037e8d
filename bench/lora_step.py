"""LoRA training step: slimtune vs HF PEFT on a SmolLM2-135M-shaped model, same run, same inputs.

    .venv/bin/python bench/lora_step.py [--seq 256] [--steps 3]

Forward + backward + AdamW step, LoRA r=16 on all linear layers, fp32 on CPU (bf16 on CUDA).
Steps alternate between the two libraries so machine noise hits both alike.
"""

from __future__ import annotations

import copy
import time

import peft
import torch
from common import machine, median, random_batch, smollm2_shaped, step_parser, train_step

import slimtune


def main() -> None:
    args = step_parser(__doc__.splitlines()[0]).parse_args()

    base = smollm2_shaped()
    batch = random_batch(args.batch, args.seq)
    models = {
        "slimtune": slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")),
        "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")),
    }
    del base
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, m in models.items()}
    for name, model in models.items():  # warm-up
        model.train()
        train_step(model, optimizers[name], batch)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.steps):
        for name, model in models.items():
            start = time.perf_counter()
            train_step(model, optimizers[name], batch)
            times[name].append(time.perf_counter() - start)
    ours, theirs = median(times["slimtune"]), median(times["peft"])
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    assert trainable["slimtune"] == trainable["peft"], trainable
    print(f"# LoRA r={args.rank} all-linear, SmolLM2-135M shape, bs {args.batch}, seq {args.seq}, "
          f"median of {args.steps} steps; {machine()}")
    print(f"trainable params: {trainable['slimtune']:,} (both)")
    print("| library  | s/step |")
    print(f"| slimtune | {ours:6.2f} |")
    print(f"| peft     | {theirs:6.2f} |")
    print(f"ratio slimtune/peft: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
