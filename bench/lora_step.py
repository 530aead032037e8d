"""LoRA training step on the CPU: slimtune's product path vs HF PEFT, with a floor, same run, same inputs.

    .venv/bin/python bench/lora_step.py [--seq 256] [--steps 5]

SmolLM2-135M shape (random weights), fp32, LoRA r=16 on all linear layers, no dropout, labels = the input
ids (every token), forward + backward + AdamW (slimtune's from the trainer's ``make_optimizer``, PEFT's as
transformers' ``Trainer`` builds it by default, ``adamw_torch_fused``: torch's fused kernel on both sides). Steps
alternate between the three runs so machine noise hits them alike:

- ``slimtune``: ``add_adapter`` + the fast path ``slimtune train`` enables + the trainer's chunked loss.
- ``peft``: ``peft.get_peft_model`` with the same LoRA; transformers' loss.
- ``floor``: the same model without an adapter, every weight frozen, the input embeddings' output requiring
  grad (``enable_input_require_grads``): forward + backward compute the activation gradients a LoRA step
  needs and no weight gradients.
- with ``--compile``, also ``slimtune+compile``: the same with each decoder block torch.compile'd, as recipes'
  ``training.compile: true`` does (``slimtune.perf.compilation.compile_blocks``); its first step (compiling) printed.

The first step's losses of slimtune and PEFT must agree within 1e-4 (both B factors start at zero).
"""

from __future__ import annotations

import copy
import time

import peft
import torch
from common import SMOLLM2_135M, interleaved_medians, machine, random_batch, smollm2_shaped, step_parser

import slimtune
from slimtune.optim import make_optimizer
from slimtune.perf.compilation import compile_blocks
from slimtune.perf.fast_path import enable_fast_path
from slimtune.perf.losses import causal_lm_loss


def main() -> None:
    parser = step_parser(__doc__.splitlines()[0])
    parser.set_defaults(steps=5)
    parser.add_argument("--compile", action="store_true", help="add a run with each block torch.compile'd")
    args = parser.parse_args()

    base = smollm2_shaped()
    batch = random_batch(args.batch, args.seq)
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**lora))
    fast = enable_fast_path(ours, "auto")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    floor = base.requires_grad_(False)
    floor.enable_input_require_grads()  # the embedding output requires grad: no weight gradient anywhere
    runs = {
        "slimtune": (ours, lambda: causal_lm_loss(ours, batch, reduction="mean")),
        "peft": (theirs, lambda: theirs(**batch).loss),
        "floor": (floor, lambda: floor(**batch).loss),
    }
    optimizers = {"slimtune": make_optimizer("adamw", [p for p in ours.parameters() if p.requires_grad], lr=1e-4),
                  "peft": torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4, fused=True)}
    if args.compile:
        compiled = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**lora))
        enable_fast_path(compiled, "auto")
        compile_blocks(compiled)
        runs["slimtune+compile"] = (compiled, lambda: causal_lm_loss(compiled, batch, reduction="mean"))
        optimizers["slimtune+compile"] = make_optimizer(
            "adamw", [p for p in compiled.parameters() if p.requires_grad], lr=1e-4)

    def step(name: str) -> float:
        model, loss_of = runs[name]
        loss = loss_of()
        loss.backward()
        if name in optimizers:
            optimizers[name].step()
        for p in model.parameters():
            p.grad = None
        return loss.item()

    first, first_s = {}, {}
    for name, (model, _) in runs.items():  # warm-up (and compilation), and the first-step losses
        model.train()
        start = time.perf_counter()
        first[name] = step(name)
        first_s[name] = time.perf_counter() - start
    t = interleaved_medians(step, list(runs), args.steps)
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in runs.items()}
    assert trainable["slimtune"] == trainable["peft"], trainable
    print(f"# LoRA r={args.rank} all-linear, SmolLM2-135M shape ({SMOLLM2_135M['num_hidden_layers']} layers), "
          f"batch {args.batch} × seq {args.seq}, median of {args.steps} steps after one warm-up; {machine()}")
    print(f"settings (all three): threads {torch.get_num_threads()}, dtype float32, dropout 0.0, labels = input "
          f"ids (all tokens); slimtune fast path: {fast}")
    print("optimizers: " + ", ".join(f"{name} AdamW (fused={opt.param_groups[0]['fused']})"
                                     for name, opt in optimizers.items()))
    print(f"trainable params: {trainable['slimtune']:,} (slimtune and peft)")
    print("| run | s/step | first-step loss | first step s (compiles) |")
    print("|---|---|---|---|")
    for name in runs:
        print(f"| {name} | {t[name]:.3f} | {first[name]:.6f} | {first_s[name]:.1f} |")
    gap = abs(first["slimtune"] - first["peft"])
    print(f"first-step loss |slimtune − peft| = {gap:.2e} ({'OK' if gap <= 1e-4 else 'DIFFERENT WORK'}, ≤ 1e-4)")
    goal = max(0.9 * t["peft"], 1.05 * t["floor"])
    print(f"step time  slimtune/peft: {t['slimtune'] / t['peft']:.3f}   slimtune/floor: "
          f"{t['slimtune'] / t['floor']:.3f}   goal ≤ max(0.9× peft, 1.05× floor) = {goal:.3f} s: "
          f"{'met' if t['slimtune'] <= goal else 'NOT met'}")
    if args.compile:
        c = t["slimtune+compile"]
        gap = abs(first["slimtune+compile"] - first["peft"])
        print(f"slimtune+compile: /peft {c / t['peft']:.3f}   /floor {c / t['floor']:.3f}   "
              f"/slimtune {c / t['slimtune']:.3f}   |first-step loss − peft| = {gap:.2e}")


if __name__ == "__main__":
    main()
