"""Every PEFT method of slimtune on one small task, side by side with full fine-tuning.

    .venv/bin/python bench/compare_methods.py [--steps 100] [--threads 1] [--only lora,ia3]

The task is tiny but real: a small Llama (with biases, so BitFit has something to train) is first
trained to *copy* digit strings (``d1..d8 = d1..d8``); each method then adapts that same base to
*increment* every digit (``d1..d8 = d1+1..d8+1``, mod 10) for the same number of steps: the attention
pattern it already knows stays, the token mapping must change. Loss counts the answer tokens only.
Each method runs in its own process, so its peak memory is its own: "peak mem" is the peak resident
memory of the first training steps above the memory held before them (gradients, optimizer state,
activations). Step time is the median over the remaining steps; eval loss / acc are teacher-forced on
held-out strings. Full fine-tuning is the reference row. The table is generated, nothing is typed in.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import machine, median, peak_rss_bytes, reset_peak_rss
from safetensors.torch import save
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune
from slimtune.adapter_files import serialize_adapter

DIGITS, N = 10, 8  # tokens 3..12 are digits, 13 is "=", 1 BOS, 2 EOS, 0 pad
EQ, BOS, EOS = 13, 1, 2
MODEL = dict(vocab_size=16, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False)
MEMORY_STEPS = 3
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])

# name -> (how to build the trainable model from the base, learning rate: the best of a 3-point sweep
# (lr/3, lr, 3·lr) on this task, so no method is judged by a poor learning rate)
METHODS = {
    "full fine-tuning": (lambda m: m, 1e-3),
    "full FT + layer-wise LR 0.8": (lambda m: m, 2e-3),
    "LoRA r=8 (q,v)": (lambda m: slimtune.add_adapter(m, slimtune.LoraConfig(**LORA)), 1e-2),
    "LoRA + LayerDrop 0.1": (lambda m: slimtune.apply_layerdrop(slimtune.add_adapter(
        m, slimtune.LoraConfig(**LORA)), 0.1), 1e-2),
    "(IA)3": (lambda m: slimtune.add_adapter(m, slimtune.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])), 0.15),
    "bottleneck Houlsby (rf 16)": (lambda m: slimtune.add_adapter(m, slimtune.BottleneckConfig()), 1e-2),
    "bottleneck Pfeiffer (rf 16)": (lambda m: slimtune.add_adapter(m, slimtune.BottleneckConfig(
        adapter_type="pfeiffer")), 1e-2),
    "prompt tuning (p=8)": (lambda m: slimtune.add_adapter(m, slimtune.PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB")), 1.7e-2),
    "P-tuning MLP (p=8)": (lambda m: slimtune.add_adapter(m, slimtune.PromptEncoderConfig(num_virtual_tokens=8)), 3e-3),
    "prefix tuning (p=8)": (lambda m: slimtune.add_adapter(m, slimtune.PrefixTuningConfig(num_virtual_tokens=8)), 0.1),
    "prefix + MLP reparam (p=8)": (lambda m: slimtune.add_adapter(m, slimtune.PrefixTuningConfig(
        num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=128)), 3e-3),
    "BitFit": (lambda m: slimtune.add_adapter(m, slimtune.BitFitConfig()), 3e-2),
    "selective (norms + last block)": (lambda m: slimtune.add_adapter(m, slimtune.SelectiveConfig(
        target_parameters=["input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight"],
        target_modules=["model.layers.3"])), 2e-3),
}


def make_batch(size: int, increment: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    digits = torch.randint(3, 3 + DIGITS, (size, N), generator=generator)
    answer = (digits - 3 + 1) % DIGITS + 3 if increment else digits
    column = lambda token: torch.full((size, 1), token)  # noqa: E731
    ids = torch.cat([column(BOS), digits, column(EQ), answer, column(EOS)], dim=1)  # (size, 2N + 3)
    labels = ids.clone()
    labels[:, : N + 2] = -100  # only the answer (and EOS) is learned
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def evaluate(model, batch) -> tuple[float, float]:
    """Teacher-forced loss and next-token accuracy on the answer tokens."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, -batch["input_ids"].shape[1]:]  # causal prompt methods return virtual positions too
    predicted, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    mask = target != -100
    return out.loss.item(), (predicted[mask] == target[mask]).float().mean().item()


def train(model, optimizer, steps: int, batch_size: int, increment: bool, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(steps):
        batch = make_batch(batch_size, increment, generator)
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def pretrain_base(folder: str, steps: int) -> float:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), steps, 32, increment=False, seed=1)
    model.save_pretrained(folder)
    return evaluate(model, make_batch(256, False, torch.Generator().manual_seed(2)))[0]


def run_method(name: str, base_folder: str, steps: int, batch_size: int) -> dict:
    build, lr = METHODS[name]
    warm_up(base_folder, batch_size)
    torch.manual_seed(0)
    model = build(LlamaForCausalLM.from_pretrained(base_folder))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = slimtune.layerwise_lr_groups(model, lr, 0.8) if "layer-wise" in name else trainable
    optimizer = torch.optim.AdamW(groups, lr=lr)
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    if hasattr(model, "slimtune_state"):
        size = len(serialize_adapter(model))
    else:
        size = len(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    # Memory peaks in the first steps (optimizer state appears at step 1). Measure those with every
    # allocation of 64 KiB or more in its own mapping, returned to the OS when freed, so peak RSS
    # tracks live tensors; then let glibc keep memory again so the timed steps pay no page faults.
    before = _rss_bytes()
    reset_peak_rss()
    train(model, optimizer, MEMORY_STEPS, batch_size, increment=True, seed=3)
    peak = peak_rss_bytes() - before
    _mmap_threshold(32 << 20)
    times = train(model, optimizer, steps - MEMORY_STEPS, batch_size, increment=True, seed=5)
    loss, acc = evaluate(model, make_batch(256, True, torch.Generator().manual_seed(4)))
    return {"method": name, "trainable": n_trainable, "percent": 100 * n_trainable / total, "bytes": size,
            "peak": peak, "step_ms": 1000 * median(times), "loss": loss, "acc": acc}


def warm_up(base_folder: str, batch_size: int) -> None:
    """One throwaway training step, so one-time process costs (kernel setup, thread pools) are not
    charged to the method measured next."""
    model = LlamaForCausalLM.from_pretrained(base_folder)
    train(model, torch.optim.AdamW(model.parameters()), 1, batch_size, increment=True, seed=0)
    del model
    gc.collect()


def _mmap_threshold(size: int) -> None:
    """glibc: allocations of at least ``size`` bytes get their own mmap (M_MMAP_THRESHOLD = -3)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, size)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[dict], base_loss: float) -> str:
    header = ["method", "trainable params", "%", "adapter on disk", "peak mem", "step ms", "eval loss", "acc"]
    lines = [[r["method"], f"{r['trainable']:,}", f"{r['percent']:.3f}", _size(r["bytes"]), _size(max(r["peak"], 0)),
              f"{r['step_ms']:.1f}", f"{r['loss']:.3f}", f"{r['acc']:.3f}"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(line) for line in lines]
    out.append(f"(the base model before fine-tuning: increment-task eval loss {base_loss:.3f})")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per method")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy small CPU)")
    parser.add_argument("--only", default="", help="comma-separated substrings of method names to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= MEMORY_STEPS:
        parser.error(f"--steps {args.steps}: the first {MEMORY_STEPS} steps measure memory, so at least "
                     f"{MEMORY_STEPS + 1} are needed for a timed step")
    torch.set_num_threads(args.threads)
    if args.worker:
        _mmap_threshold(64 << 10)
        print(json.dumps(run_method(args.worker, args.base, args.steps, args.batch)))
        return
    names = [n for n in METHODS if not args.only or any(s.strip() in n for s in args.only.split(","))]
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        copy_loss = pretrain_base(folder, args.pretrain_steps)
        base_loss = evaluate(LlamaForCausalLM.from_pretrained(folder),
                             make_batch(256, True, torch.Generator().manual_seed(4)))[0]
        print(f"base: {sum(p.numel() for p in LlamaForCausalLM.from_pretrained(folder).parameters()):,} params, "
              f"copy-task loss {copy_loss:.3f} after {args.pretrain_steps} steps ({time.perf_counter() - start:.0f} s)")
        rows = []
        for name in names:
            command = [sys.executable, __file__, "--worker", name, "--base", folder, "--steps", str(args.steps),
                       "--batch", str(args.batch), "--threads", str(args.threads)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {name}: done", file=sys.stderr)
    print(f"\nincrement-digits task, {args.steps} steps of batch {args.batch}, {machine()}")
    print(table(rows, base_loss))


if __name__ == "__main__":
    main()
