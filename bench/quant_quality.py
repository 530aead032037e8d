"""Quality and cost of slimtune's 4-bit / 8-bit weight formats on a real checkpoint.

Reports, over every linear weight of the model (embeddings and the output head excluded):
  - reconstruction error (mean |ΔW|, ||ΔW||_F / ||W||_F) of NF4 and FP4, with and without double
    quantization, plain symmetric absmax int4 (levels -7..7, fp32 scale per block) and int8 rows;
  - bits per weight measured from the stored tensors (codes, scales, nested scales);
  - time to quantize every linear weight, with bitsandbytes' CPU quantize_4bit on the same tensors
    when it is installed (ratio printed), and dequantization throughput;
  - optionally perplexity on held-out text (--texts FILE, needs a HF folder with a tokenizer).

Run:  .venv/bin/python bench/quant_quality.py --model PATH   (a .safetensors file or a HF model folder)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from slimtune.quant import QuantConfig, dequantize_model, nf4, quantize, requantization_error
from slimtune.quant.model import absmax_int4_error

FORMATS = {
    "nf4+dq": QuantConfig(quant_type="nf4", double_quant=True),
    "nf4": QuantConfig(quant_type="nf4", double_quant=False),
    "fp4+dq": QuantConfig(quant_type="fp4", double_quant=True),
    "fp4": QuantConfig(quant_type="fp4", double_quant=False),
    "int8": QuantConfig(bits=8),
}
SKIP_NAMES = ("embed", "lm_head", "wte", "wpe", "shared", "norm")


def linear_weights(path: Path, limit: int | None = None):
    """(name, fp32 tensor) for every 2-D weight that belongs to a linear layer, read one at a time."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    count = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):
                if not key.endswith(".weight") or any(s in key for s in SKIP_NAMES):
                    continue
                if len(f.get_slice(key).get_shape()) != 2:
                    continue
                yield key, f.get_tensor(key).float()
                count += 1
                if limit is not None and count >= limit:
                    return


@torch.no_grad()
def reconstruction_table(path: Path, limit: int | None) -> None:
    totals: dict[str, dict[str, float]] = {k: {"abs": 0.0, "sq": 0.0, "bits": 0.0} for k in [*FORMATS, "int4-absmax"]}
    ref_sq = 0.0
    params = 0
    for _, w in linear_weights(path, limit):
        n = w.numel()
        params += n
        ref_sq += w.pow(2).sum().item()
        results = {name: requantization_error(w, cfg) for name, cfg in FORMATS.items()}
        results["int4-absmax"] = absmax_int4_error(w, 64)
        for name, r in results.items():
            totals[name]["abs"] += r["mean_abs"] * n
            totals[name]["sq"] += (r["rel_frobenius"] ** 2) * w.pow(2).sum().item()
            totals[name]["bits"] += r["bits_per_param"] * n
    if params == 0:
        raise SystemExit(f"no linear weight found in {path}")
    print(f"\nreconstruction over {params:,} linear weights (blocksize 64)")
    print(f"{'format':<12} {'mean|dW|':>10} {'rel. Frob.':>11} {'bits/weight':>12}")
    for name, t in totals.items():
        print(f"{name:<12} {t['abs'] / params:>10.3e} {math.sqrt(t['sq'] / ref_sq):>11.4f} {t['bits'] / params:>12.3f}")


@torch.no_grad()
def timing_table(path: Path, limit: int | None) -> None:
    weights = [w for _, w in linear_weights(path, limit)]
    n = sum(w.numel() for w in weights)
    t = time.perf_counter()
    stored = []
    for w in weights:
        packed, absmax = nf4.quantize_4bit(w, "nf4", 64)
        stored.append((packed, nf4.double_quantize(absmax), w.shape))
    ours = time.perf_counter() - t
    print(f"\nquantize {len(weights)} linear weights ({n / 1e6:.1f} M) to NF4 + double quant: {ours:.2f} s")
    t = time.perf_counter()
    for packed, (codes, absmax2, offset), shape in stored:
        nf4.dequantize_4bit(packed, nf4.double_dequantize(codes, absmax2, offset), shape, "nf4", 64)
    ours_dq = time.perf_counter() - t
    print(f"dequantize all: {ours_dq:.2f} s ({4 * n / ours_dq / 1e9:.2f} GB/s of fp32 output)")
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        print("bitsandbytes not installed: no reference timing")
        return
    t = time.perf_counter()
    theirs = [bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]
    bnb_q = time.perf_counter() - t
    t = time.perf_counter()
    for packed, state in theirs:
        bnbF.dequantize_4bit(packed, state)
    bnb_dq = time.perf_counter() - t
    same = all(torch.equal(p, q[0]) for (p, _, _), q in zip(stored, theirs))
    import bitsandbytes

    print(f"bitsandbytes {bitsandbytes.__version__}: quantize {bnb_q:.2f} s, dequantize {bnb_dq:.2f} s; "
          f"speed-up slimtune/bnb: quantize {bnb_q / ours:.2f}x, dequantize {bnb_dq / ours_dq:.2f}x; "
          f"identical packed weights: {same}")


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 512) -> float:
    """exp(mean token NLL) of a causal LM over ``texts`` (each truncated to ``max_length`` tokens)."""
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids.to(device)
        if ids.shape[1] < 2:
            continue
        logits = model(ids).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += ids.shape[1] - 1
    if count == 0:
        raise ValueError("no text with at least 2 tokens to score")
    return math.exp(nll / count)


def model_table(path: Path, texts_file: Path | None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    texts = None
    if texts_file is not None:
        tokenizer = AutoTokenizer.from_pretrained(path)
        texts = [t for t in texts_file.read_text().split("\n\n") if t.strip()]
        ppl = perplexity(base, tokenizer, texts)
        print(f"\nperplexity on {len(texts)} passages of {texts_file.name}: fp32 {ppl:.3f}")
    for name in ("nf4+dq", "fp4", "int8"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        t = time.perf_counter()
        quantize(model, FORMATS[name])
        took = time.perf_counter() - t
        line = f"quantize() whole model to {name}: {took:.2f} s"
        if texts is not None:
            # The quantized forward multiplies by exactly these dequantized weights; scoring the
            # dequantized copy gives the same perplexity without re-dequantizing every passage.
            line += f", perplexity {perplexity(dequantize_model(model), tokenizer, texts):.3f}"
        print(line)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a .safetensors file or a HF model folder")
    parser.add_argument("--limit", type=int, default=None, help="only the first N linear weights (quick runs)")
    parser.add_argument("--texts", type=Path, default=None, help="text file (passages split by blank lines)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}")
    reconstruction_table(args.model, args.limit)
    timing_table(args.model, args.limit)
    if args.model.is_dir() and (args.model / "config.json").exists():
        model_table(args.model, args.texts)


if __name__ == "__main__":
    main()
