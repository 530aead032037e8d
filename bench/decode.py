"""Decoding with unmerged adapters: slimtune's ``Decoder`` vs HF PEFT (+ bitsandbytes), in one run.

Scenarios (``--shape``: SmolLM2-135M, the CPU default, or Llama-3-8B for a GPU; random weights, LoRA r 16
on every linear layer, greedy, every new token forced so all runs decode the same count):

  base           the plain model (slimtune: ``Decoder(model)``; PEFT's side: transformers' ``generate``)
  1 adapter      bs 1, one unmerged adapter (PEFT: the active adapter)
  merged         bs 1, that adapter merged (slimtune: its wrappers bypassed; PEFT: ``merge_adapter()``,
                 wrappers kept)
  base, bs 8     the plain model, 8 rows
  8 adapters     bs 8, row i its own adapter (PEFT: ``generate(adapter_names=[...])``)
  (--compile)    1 adapter with ``Decoder(compile=True)``, compared with PEFT's 1 adapter

in full precision (``--dtype auto``: bf16 on CUDA, fp32 on CPU, where bf16 matmuls are emulated and very
slow without AVX-512 BF16) and NF4 (slimtune's ``Linear4bit`` vs PEFT on bitsandbytes' ``Linear4bit``, double
quantization, computing in the full-precision dtype; merged is n/a there). Tokens/s per sequence and in
total (new tokens over the whole ``generate`` call, prefill included), median of ``--reps`` calls run in
rotated rounds after one warm-up round. "vs base" compares each library with its own base on its own decode
path. Run:

    .venv/bin/python bench/decode.py --new-tokens 16 --prompt 16 --reps 3 --threads 1 --clock cpu --compile
    .venv/bin/python bench/decode.py --device cuda --shape llama3-8b --new-tokens 128 --bandwidth 4300

(the first: the README's CPU table, ~11 minutes on the shared 2-core development machine; the second: H200).

``--bandwidth`` (GB/s) adds the batch-1 bound: bandwidth over the bytes of weights one token reads.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import bitsandbytes
import peft
import torch
import transformers
from common import machine, smollm2_shaped
from transformers import LlamaConfig, LlamaForCausalLM

import slimtune
from slimtune.quant import QuantConfig, quantize
from slimtune.serving import Decoder

# Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32 heads / 8 KV heads, 128,256-token untied vocabulary.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False, rms_norm_eps=1e-5)
SHAPES = {"smollm2": "SmolLM2-135M", "llama3-8b": "Llama-3-8B"}

SCENARIOS = ("base", "1 adapter", "merged", "base, bs 8", "8 adapters", "1 adapter, compiled")
PEFT_SIDE = {"1 adapter, compiled": "1 adapter"}  # what the compiled row is compared with


def lora_config(args, cls):
    return cls(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)


def small_b(model) -> None:
    """Random B factors of a realistic size (init_lora_weights=False draws them Kaiming-uniform)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)


def copy_adapters(ours, theirs, names: list[str]) -> None:
    """The very same adapter weights in PEFT's model (its keys: ours under ``base_model.model.``)."""
    state = {f"base_model.model.{k}": v for k, v in ours.state_dict().items() if "lora_" in k}
    known = theirs.state_dict()
    missing = [k for k in state if k not in known]
    assert not missing, missing[:3]
    theirs.load_state_dict(state, strict=False)


def peft_model(base, args, names: list[str]):
    model = peft.get_peft_model(base, lora_config(args, peft.LoraConfig), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config(args, peft.LoraConfig))
    return model.eval()


def bnb_base(base, args, dtype: torch.dtype):
    """The base as PEFT users load it in 4 bits: from a folder, with transformers' BitsAndBytesConfig."""
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map=args.device, dtype=dtype, quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)).eval()


def base_model(args, dtype: torch.dtype) -> LlamaForCausalLM:
    """The random-weight base of ``--shape``, made on ``--device`` in ``dtype`` (no full-precision copy on the host)."""
    if args.shape == "smollm2":
        return smollm2_shaped(dtype=dtype).to(args.device).eval()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).eval()
    finally:
        torch.set_default_dtype(previous)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors one decoded token reads (every parameter and buffer once; tied ones once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def build(args, precision: str, dtype: torch.dtype, names: list[str]) -> dict[str, object]:
    """Decoders and PEFT models holding the very same weights and adapters."""
    base = base_model(args, dtype)
    nf4 = precision == "nf4"

    def ours_base():  # slimtune's model before adapters: the float model, or ours quantized to NF4
        model = copy.deepcopy(base)
        return quantize(model, QuantConfig(compute_dtype=dtype)) if nf4 else model

    def theirs_base():  # PEFT's: the float model, or bitsandbytes' NF4 as transformers loads it
        return bnb_base(base, args, dtype) if nf4 else copy.deepcopy(base)

    ours = ours_base()
    for name in names:
        slimtune.add_adapter(ours, lora_config(args, slimtune.LoraConfig), name)
    small_b(ours)
    theirs = peft_model(theirs_base(), args, names)
    copy_adapters(ours, theirs, names)
    models: dict[str, object] = {"ours_base": Decoder(ours_base()), "ours": Decoder(ours, adapters=names),
                                 "theirs_base": theirs_base(), "theirs": theirs}
    if not nf4:  # merging into 4-bit weights is not offered (slimtune: merge_for_export dequantizes first)
        merged = copy.deepcopy(ours)
        slimtune.set_adapter(merged, names[0])
        slimtune.merge_adapter(merged)
        models["ours_merged"] = Decoder(merged)
        theirs_merged = peft_model(theirs_base(), args, names)
        copy_adapters(ours, theirs_merged, names)
        theirs_merged.set_adapter(names[0])
        theirs_merged.merge_adapter()
        models["theirs_merged"] = theirs_merged
    return models


def hf_generate(model, ids: torch.Tensor, new: int, **extra) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0, **extra)


def prompts(args, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch-1 prompt and the mixed batch's ``rows`` prompts (the same in every run)."""
    g = torch.Generator().manual_seed(0)
    one = torch.randint(3, 49152, (1, args.prompt), generator=g).to(args.device)
    return one, torch.randint(3, 49152, (rows, args.prompt), generator=g).to(args.device)


def rows_alone(decoder: Decoder, args, names: list[str], mixed: torch.Tensor) -> bool:
    """Whether each row of slimtune's mixed batch is what that row decodes alone with its adapter."""
    _, eight = prompts(args, len(names))
    return all(torch.equal(decoder.generate(eight[i: i + 1], adapter_names=[name], max_new_tokens=args.new_tokens,
                                            ignore_eos=True)[0], mixed[i]) for i, name in enumerate(names))


def runs(models: dict, args, names: list[str]) -> dict[tuple[str, str], Callable[[], torch.Tensor]]:
    new = args.new_tokens
    one, eight = prompts(args, len(names))
    ours, base = models["ours"], models["ours_base"]
    theirs, theirs_base = models["theirs"], models["theirs_base"]

    def ours_run(decoder: Decoder, ids: torch.Tensor, rows: list[str] | None) -> Callable[[], torch.Tensor]:
        return lambda: decoder.generate(ids, adapter_names=rows, max_new_tokens=new, ignore_eos=True)

    def theirs_one() -> torch.Tensor:
        theirs.set_adapter(names[0])
        return hf_generate(theirs, one, new)

    out = {("slimtune", "base"): ours_run(base, one, None),
           ("PEFT", "base"): lambda: hf_generate(theirs_base, one, new),
           ("slimtune", "1 adapter"): ours_run(ours, one, names[:1]), ("PEFT", "1 adapter"): theirs_one,
           ("slimtune", "base, bs 8"): ours_run(base, eight, None),
           ("PEFT", "base, bs 8"): lambda: hf_generate(theirs_base, eight, new),
           ("slimtune", "8 adapters"): ours_run(ours, eight, names),
           ("PEFT", "8 adapters"): lambda: hf_generate(theirs, eight, new, adapter_names=names)}
    if args.compile:  # slimtune only: the one-token steps through torch.compile
        out[("slimtune", "1 adapter, compiled")] = ours_run(Decoder(ours.model, adapters=names, compile=True), one,
                                                            names[:1])
    if "ours_merged" in models:
        out[("slimtune", "merged")] = ours_run(models["ours_merged"], one, None)
        out[("PEFT", "merged")] = lambda: hf_generate(models["theirs_merged"], one, new)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rounds(fns: dict, args) -> dict:
    """Median seconds per call; each round runs every variant once in a rotated order, so load drifts hit
    all alike. Round 0 warms up."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict = {key: [] for key in fns}
    order = list(fns.items())
    for round_ in range(1 + args.reps):
        for key, fn in order[round_ % len(order):] + order[: round_ % len(order)]:
            sync(args.device)
            start = clock()
            fn()
            sync(args.device)
            if round_:
                times[key].append(clock() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def table(precision: str, seconds: dict, args) -> list[str]:
    def rate(who: str, scenario: str) -> tuple[float, float] | None:
        if (who, scenario) not in seconds:
            return None
        rows = args.adapters if "8" in scenario else 1
        per_seq = args.new_tokens / seconds[(who, scenario)]
        return per_seq, per_seq * rows

    lines = [f"| {precision} | slimtune tok/s (seq / total) | vs slimtune base | PEFT tok/s (seq / total) "
             "| vs PEFT base | slimtune / PEFT |", "|---|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        ours, theirs = rate("slimtune", scenario), rate("PEFT", PEFT_SIDE.get(scenario, scenario))
        if ours is None and scenario in PEFT_SIDE:
            continue
        if ours is None or theirs is None:
            lines.append(f"| {scenario} | n/a | | n/a | | |")
            continue
        base_name = "base, bs 8" if "8" in scenario else "base"
        ours_base, theirs_base = rate("slimtune", base_name), rate("PEFT", base_name)
        assert ours_base is not None and theirs_base is not None
        shown = scenario.replace("8", str(args.adapters))  # the batched rows have --adapters rows
        lines.append(f"| {shown} | {ours[0]:.1f} / {ours[1]:.1f} | {ours[0] / ours_base[0] - 1:+.0%} "
                     f"| {theirs[0]:.1f} / {theirs[1]:.1f} | {theirs[0] / theirs_base[0] - 1:+.0%} "
                     f"| {ours[0] / theirs[0]:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth in GB/s (H200: 4300): print the batch-1 tokens/s bound")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8, help="adapters (and rows) of the mixed batch")
    parser.add_argument("--precision", choices=["float", "nf4", "both"], default="both")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the full-precision dtype (and NF4's compute dtype); auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add a row: 1 adapter with Decoder(compile=True)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (CPU only), steadier than wall time on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and cuda) else torch.float32
    names = [f"task{i}" for i in range(args.adapters)]
    print(f"# {machine()}; transformers {transformers.__version__}, peft {peft.__version__}", end="")
    precisions = ["float", "nf4"] if args.precision == "both" else [args.precision]
    print(f", bitsandbytes {bitsandbytes.__version__}" if "nf4" in precisions else "", end="")
    print(f"\n# {SHAPES[args.shape]} shape, LoRA r {args.rank} all-linear, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy, median of {args.reps}, {args.clock} clock\n")
    for precision in precisions:
        start = time.perf_counter()
        models = build(args, precision, dtype, names)
        print(f"# {precision}: models built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        fns = runs(models, args, names)
        same = torch.equal(fns[("slimtune", "1 adapter")](), fns[("PEFT", "1 adapter")]())
        ours_mixed = fns[("slimtune", "8 adapters")]()
        mixed = torch.equal(ours_mixed, fns[("PEFT", "8 adapters")]())
        alone = rows_alone(models["ours"], args, names, ours_mixed)
        start = time.perf_counter()
        seconds = timed_rounds(fns, args)
        print(f"# {precision}: timed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        label = ("bf16" if dtype == torch.bfloat16 else "fp32") if precision == "float" else "NF4"
        print("\n".join(table(label, seconds, args)))
        print(f"\ngreedy tokens equal to PEFT's: 1 adapter {'yes' if same else 'no'}, "
              f"{len(names)} adapters {'yes' if mixed else 'no'}; slimtune's {len(names)} mixed rows equal to each "
              f"row decoded alone: {'yes' if alone else 'no'}\n", flush=True)
        if args.bandwidth:
            decoder = models["ours_base"]
            assert isinstance(decoder, Decoder)
            read = weight_bytes(decoder.model)
            print(f"batch-1 bound at {args.bandwidth:g} GB/s: {args.bandwidth * 1e9 / read:.0f} tokens/s "
                  f"({read / 1e9:.2f} GB of weights per token)\n", flush=True)
        del models, fns


if __name__ == "__main__":
    main()
