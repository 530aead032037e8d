"""LoRA-family benchmarks: slimtune and HF PEFT side by side in one run, ratios printed.

1. DoRA vs LoRA training step (SmolLM2-135M shape, r 16 on all linear layers, dropout 0.05), with
   PEFT's own DoRA/LoRA ratio measured in the same run (rounds interleave the variants).
2. Mixed-adapter inference, 4 adapters in one batch: ``slimtune.mixed_batch`` vs PEFT's ``adapter_names=``.
3. LoRA-FA vs LoRA memory for one training step: bytes autograd keeps for backward (exact) and the
   process's peak memory (peak RSS on CPU, each variant in a fresh process; max allocated on CUDA).

Random weights (no download). Run (about 5 minutes on 2 CPU cores):

    .venv/bin/python bench/lora_family.py                      # all three, bs 1, seq 128
    .venv/bin/python bench/lora_family.py --only dora --seq 256 --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune


def smollm2_shape(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


def base_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(smollm2_shape(args.layers)).to(args.device)


def lora_kwargs(args, **extra) -> dict:
    return dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", **extra)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_rounds(variants: dict, run, args) -> dict[str, float]:
    """Median seconds per call; each round runs every variant once, in a rotated order, so load drifts
    and position effects (e.g. running right after the variant with the largest allocations) hit all alike."""
    times = {name: [] for name in variants}
    order = list(variants.items())
    for round_ in range(1 + args.steps):  # round 0 warms up
        for name, state in order[round_ % len(order):] + order[: round_ % len(order)]:
            sync(args.device)
            start = time.perf_counter()
            run(state)
            sync(args.device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_dora(args) -> list[tuple[str, str]]:
    base = base_model(args).train()
    ids = torch.randint(3, 49152, (1, args.seq), device=args.device)
    variants = {}
    for name, dora in (("LoRA", False), ("DoRA", True)):
        ours = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**lora_kwargs(args, lora_dropout=0.05,
                                                                                       use_dora=dora)))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs(args, lora_dropout=0.05,
                                                                                        use_dora=dora)))
        for who, model in (("slimtune", ours), ("PEFT", theirs)):
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            variants[f"{who} {name}"] = (model, optimizer)
    del base
    t = timed_rounds(variants, lambda s: train_step(s[0], s[1], ids), args)
    rows = [(f"train step, {k}", f"{v:.2f} s") for k, v in t.items()]
    rows += [("DoRA / LoRA step, slimtune (target <= 1.3)", f"{t['slimtune DoRA'] / t['slimtune LoRA']:.2f}x"),
             ("DoRA / LoRA step, PEFT", f"{t['PEFT DoRA'] / t['PEFT LoRA']:.2f}x"),
             ("slimtune DoRA / PEFT DoRA step", f"{t['slimtune DoRA'] / t['PEFT DoRA']:.2f}x")]
    return rows


def bench_mixed(args) -> list[tuple[str, str]]:
    base = base_model(args).eval()
    names = [f"task{i}" for i in range(4)]
    ours = copy.deepcopy(base)
    theirs = None
    for name in names:
        slimtune.add_adapter(ours, slimtune.LoraConfig(**lora_kwargs(args, init_lora_weights=False)), name)
        config = peft.LoraConfig(**lora_kwargs(args, init_lora_weights=False))
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            theirs.add_adapter(name, config)
    del base
    ours.eval(), theirs.eval()
    # Same adapters in both: PEFT's in-memory keys are ours with the "base_model.model." prefix.
    ours_sd = ours.state_dict()
    theirs.load_state_dict({f"base_model.model.{k}": v for k, v in ours_sd.items() if "lora_" in k}, strict=False)
    rows_per_adapter = args.mixed_batch // len(names)
    rows = [n for n in names for _ in range(rows_per_adapter)]
    ids = torch.randint(3, 49152, (len(rows), args.seq), device=args.device)

    def run_ours(_):
        with torch.no_grad(), slimtune.mixed_batch(ours, rows):
            return ours(input_ids=ids).logits

    def run_theirs(_):
        with torch.no_grad():
            return theirs(input_ids=ids, adapter_names=rows).logits

    diff = (run_ours(None) - run_theirs(None)).abs().max().item()
    t = timed_rounds({"slimtune": run_ours, "PEFT": run_theirs}, lambda fn: fn(None), args)
    return [(f"mixed batch forward (4 adapters, {len(rows)} rows), slimtune", f"{t['slimtune']:.2f} s"),
            (f"mixed batch forward (4 adapters, {len(rows)} rows), PEFT adapter_names=", f"{t['PEFT']:.2f} s"),
            ("mixed batch, PEFT / slimtune time", f"{t['PEFT'] / t['slimtune']:.2f}x faster"),
            ("mixed batch, max |logit difference| vs PEFT", f"{diff:.1e}")]


def _rss_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))


def memory_child(args) -> None:
    """One variant in a fresh process: activation bytes kept for backward and the peak memory of one
    training step (CPU: VmHWM, reset just before the step; CUDA: max allocated)."""
    model = base_model(args).train()
    kwargs = lora_kwargs(args, lora_dropout=0.05)
    if args.memory_child == "PEFT LoRA":
        model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    else:
        fa = args.memory_child == "slimtune LoRA-FA"
        slimtune.add_adapter(model, slimtune.LoraFAConfig(**kwargs) if fa else slimtune.LoraConfig(**kwargs))
    ids = torch.randint(3, 49152, (1, args.seq), device=args.device)
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:  # activations only: the frozen weights are resident anyway
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    print(json.dumps({"saved": sum(saved.values()), "peak": peak, "step": peak - before}))


def bench_memory(args) -> list[tuple[str, str]]:
    results = {}
    for variant in ("slimtune LoRA", "slimtune LoRA-FA", "PEFT LoRA"):
        cmd = [sys.executable, __file__, "--memory-child", variant, "--seq", str(args.seq), "--rank", str(args.rank),
               "--layers", str(args.layers), "--device", args.device, "--threads", str(args.threads)]
        # A fixed mmap threshold makes glibc hand large blocks back on free, so RSS tracks live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    mib = 1 << 20
    kind = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    rows = [(f"{v}: activations saved / step's peak growth / {kind}",
             f"{r['saved'] / mib:.0f} / {r['step'] / mib:.0f} / {r['peak'] / mib:.0f} MiB") for v, r in results.items()]
    lora, fa = results["slimtune LoRA"], results["slimtune LoRA-FA"]
    rows += [("LoRA / LoRA-FA activations saved for backward", f"{lora['saved'] / fa['saved']:.2f}x"),
             ("LoRA / LoRA-FA step's peak growth", f"{lora['step'] / fa['step']:.2f}x"),
             (f"LoRA / LoRA-FA {kind} (weights included)", f"{lora['peak'] / fa['peak']:.2f}x")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["dora", "mixed", "memory"], action="append")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--mixed-batch", type=int, default=8, help="rows of the mixed batch (split over 4 adapters)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    print(f"# {args.device}, torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
          f"SmolLM2-135M shape ({args.layers} layers), bs 1, seq {args.seq}, r {args.rank} all-linear, "
          f"median of {args.steps} rounds", flush=True)
    sections = {"dora": bench_dora, "mixed": bench_mixed, "memory": bench_memory}
    rows = []
    for key in args.only or list(sections):
        start = time.perf_counter()
        rows += sections[key](args)
        print(f"# {key}: {time.perf_counter() - start:.0f} s", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}} | value\n{'-' * width}-|------")
    for label, value in rows:
        print(f"{label:<{width}} | {value}")


if __name__ == "__main__":
    main()
