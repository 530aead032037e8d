"""Training throughput and peak memory: slimtune vs HF PEFT (+ bitsandbytes) on the same shapes, in one run.

    .venv/bin/python bench/train_throughput.py                       # GPU: all three shapes, QLoRA
    .venv/bin/python bench/train_throughput.py --method lora --optim adamw_8bit --offload
    .venv/bin/python bench/train_throughput.py --shapes smollm2-135m --seq 256 --steps 2   # CPU smoke run

Shapes (random weights, no download): SmolLM2-135M; Llama 1B (16 layers, hidden 2048, MLP 8192, tied
128,256 vocabulary); Llama-3-8B (32 / 4096 / 14336, 128,256). Every (shape, side) runs in its own
subprocess, so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU (model
included), peak RSS on CPU. Each side: LoRA r=16 (alpha 32) on all linear layers, activation
checkpointing of every decoder layer, bs × seq tokens per step, ``--steps`` timed after ``--warmup``.

- ``slimtune``: NF4 + double quantization (bf16 compute on GPU), fused LoRA autograd function
  (Triton 4-bit matmuls on CUDA), chunked cross-entropy from the hidden states, slimtune's own
  checkpointing (``--offload``: layer inputs in pinned CPU memory), ``--optim`` from slimtune.optim.
- ``peft``: bitsandbytes ``Linear4bit`` (NF4 + DQ, bf16 compute) + ``peft.get_peft_model``,
  transformers' gradient checkpointing (non-reentrant), torch AdamW (``--peft-optim`` for bnb's).
- ``peft-prepare``: the same after ``peft.prepare_model_for_kbit_training`` (the common recipe, which
  upcasts every non-quantized weight to fp32).

Both sides run under bf16 autocast on a GPU (what ``Trainer(bf16=True)`` does), fp32 on CPU. Printed:
tokens/s, step time, peak memory, and slimtune's ratios against each PEFT side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import SMOLLM2_135M, machine, median, peak_rss_bytes, reset_peak_rss
from torch import nn

LLAMA_3 = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               rope_theta=500000.0, rms_norm_eps=1e-5)
SHAPES = {
    "smollm2-135m": SMOLLM2_135M,
    "llama-1b": dict(LLAMA_3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True),
    "llama-3-8b": dict(LLAMA_3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       tie_word_embeddings=False),
}
SIDES = ("slimtune", "peft", "peft-prepare")


def dense_model(shape: str, device: str, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised Llama-architecture model of ``shape``, built directly in ``dtype`` on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)


def slimtune_side(args, device: str, dtype: torch.dtype):
    import slimtune
    from slimtune.optim import make_optimizer
    from slimtune.perf.activation_checkpointing import checkpoint_layers
    from slimtune.perf.fused_lora import use_fused_lora
    from slimtune.perf.losses import causal_lm_loss
    from slimtune.quant import QuantConfig, quantize

    model = dense_model(args.shape, device, dtype)
    if args.method == "qlora":
        quantize(model, QuantConfig(compute_dtype=dtype))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
    use_fused_lora(model)
    if not args.no_checkpointing:
        checkpoint_layers(model, offload=args.offload)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optim, trainable, lr=1e-4, weight_decay=0.0)
    return model, optimizer, lambda batch: causal_lm_loss(model, batch, args.chunk_size, reduction="mean")


def _bnb_4bit(model: nn.Module, device: str, dtype: torch.dtype) -> None:
    """Swap every linear layer but the output layer for bitsandbytes' Linear4bit (what from_pretrained with
    BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute) builds)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module is head:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64, module=layer).to(device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.is_loaded_in_4bit = True  # what transformers sets; prepare_model_for_kbit_training reads it


def peft_side(args, device: str, dtype: torch.dtype):
    import peft

    model = dense_model(args.shape, device, dtype)
    if args.method == "qlora":
        _bnb_4bit(model, device, dtype)
    checkpointing = not args.no_checkpointing
    if args.side == "peft-prepare":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.peft_optim == "adamw":
        # fused, as transformers' Trainer builds it by default (adamw_torch_fused) and as slimtune's optimizer is
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=True)
    else:
        import bitsandbytes as bnb

        kind = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                "paged_adamw": bnb.optim.PagedAdamW}[args.peft_optim]
        optimizer = kind(trainable, lr=1e-4, weight_decay=0.0)
    return model, optimizer, lambda batch: model(**batch).loss


def worker(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    build = slimtune_side if args.side == "slimtune" else peft_side
    start = time.perf_counter()
    model, optimizer, loss_fn = build(args, device, dtype)
    build_s = time.perf_counter() - start
    model.train()
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronizes

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    losses = [step() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    step_s = median(times)
    return {"tokens_per_s": args.batch * args.seq / step_s, "step_s": step_s, "peak_bytes": peak,
            "build_s": build_s, "losses": losses}


def worker_command(args, side: str, shape: str) -> list[str]:
    cmd = [sys.executable, __file__, "--side", side, "--shape", shape, "--method", args.method,
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--optim", args.optim, "--peft-optim", args.peft_optim]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return cmd + ["--offload"] * args.offload + ["--no-checkpointing"] * args.no_checkpointing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b,llama-3-8b" if cuda else "smollm2-135m",
                        help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {list(SIDES)}")
    parser.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048 if cuda else 256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5 if cuda else 2)
    parser.add_argument("--warmup", type=int, default=2 if cuda else 1)
    parser.add_argument("--optim", default="adamw", help="slimtune's: adamw | adamw_8bit | paged_adamw | "
                                                         "paged_adamw_8bit")
    parser.add_argument("--peft-optim", default="adamw", choices=["adamw", "adamw_8bit", "paged_adamw",
                                                                  "paged_adamw_8bit"])
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per cross-entropy chunk")
    parser.add_argument("--offload", action="store_true", help="slimtune: checkpointed layer inputs on CPU")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(worker(args)))
        return

    shapes, sides = args.shapes.split(","), args.sides.split(",")
    for name in shapes + sides:
        if name not in SHAPES and name not in SIDES:
            parser.error(f"unknown shape or side {name!r}; shapes: {list(SHAPES)}, sides: {list(SIDES)}")
    print(f"{machine()}; {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}")
    print(f"{args.method}, r={args.rank}, batch {args.batch} x seq {args.seq}, checkpointing "
          f"{'off' if args.no_checkpointing else 'on' + (' + offload' if args.offload else '')}, "
          f"slimtune optim {args.optim}, PEFT optim {args.peft_optim}")
    for shape in shapes:
        results = {}
        for side in sides:
            cmd = worker_command(args, side, shape)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{shape} {side}: failed\n{proc.stderr[-2000:]}")
                continue
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"\n{shape}")
        for side, r in results.items():
            print(f"  {side:<13} {r['tokens_per_s']:10.1f} tokens/s  {r['step_s']:8.3f} s/step  "
                  f"peak {r['peak_bytes'] / 2**30:7.2f} GiB  (build {r['build_s']:.0f} s, "
                  f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f})")
        ours = results.get("slimtune")
        for side, r in results.items():
            if ours and side != "slimtune":
                print(f"  slimtune / {side}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s, "
                      f"{ours['peak_bytes'] / r['peak_bytes']:.2f}x peak memory")


if __name__ == "__main__":
    main()
