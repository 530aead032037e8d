"""Loading a 3B model into NF4 + double quantization on the CPU: slimtune's product path vs transformers +
bitsandbytes, peak memory and time.

    .venv/bin/python bench/load_3b.py [--timeout 1200] [--keep DIR]

Writes a random Llama-shaped 3B checkpoint once (bf16 safetensors in 2 GB shards: 28 layers, hidden 3072,
MLP 8192, 24 heads / 8 KV heads, vocabulary 128,256, tied embeddings — Llama-3.2-3B's shapes; ~6.4 GB, so
free disk is checked first) and deletes it afterwards (unless ``--keep``). Then, each in its own
subprocess (peak RSS = its own VmHWM, file-backed pages of memory-mapped files included) and time-boxed:

- ``slimtune``: ``slimtune.train.models.load_model(folder, dtype="bfloat16", quantization=QuantConfig(...))``,
  the path ``slimtune train`` takes with a ``quantization`` section: the model is built on the meta device
  and each linear weight is read (pread, no mmap) and quantized layer by layer.
- ``transformers+bnb``: ``AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, nf4, double quant), dtype=bfloat16, device_map="cpu")``, what a PEFT user runs.

The goal for slimtune: peak RSS ≤ 1.3 × (the quantized model's bytes + one decoder layer in bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, peak_rss_bytes

LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
SHARD_BYTES = 2 * 2**30


def _shapes() -> dict[str, tuple[int, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_3B))
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "lm_head.weight"}


def write_checkpoint(folder: Path) -> int:
    """Random bf16 weights (norms at one), written shard by shard; returns the bytes written."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(**LLAMA_3B, torch_dtype="bfloat16").save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    total = 0
    shapes = _shapes()

    def flush() -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        index.update({key: name for key in shard})
        shard.clear()

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard and sum(t.numel() * 2 for t in shard.values()) + nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        total += nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the loaded model holds (parameters and buffers, shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def run_slimtune(folder: Path) -> dict:
    from slimtune.quant import QuantConfig
    from slimtune.train.models import load_model

    start = time.perf_counter()
    model = load_model(folder, dtype="bfloat16", quantization=QuantConfig(compute_dtype="bfloat16"))
    return {"load_s": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "model_bytes": model_bytes(model)}


def run_bnb(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.bfloat16))
    return {"load_s": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "model_bytes": model_bytes(model)}


WORKERS = {"slimtune": run_slimtune, "transformers+bnb": run_bnb}


def _run(worker: str, folder: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--model", str(folder)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if done.returncode:
        return {"error": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds each loader may take")
    parser.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here and keep it")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args.model)))
        return

    tmp = None if args.keep else tempfile.mkdtemp(prefix="slimtune-3b-")
    folder = args.keep or Path(tmp) / "llama-3b-shaped"
    try:
        if (folder / "config.json").is_file():
            written = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        else:
            need = 7 * 2**30
            free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path(tempfile.gettempdir())).free
            if free < need:
                sys.exit(f"need {need / 2**30:.0f} GiB free for the checkpoint, {free / 2**30:.1f} GiB free")
            start = time.perf_counter()
            written = write_checkpoint(folder)
            print(f"wrote {written / 2**30:.2f} GiB of bf16 weights in {time.perf_counter() - start:.0f} s")
        layer0 = sum(math.prod(shape) * 2 for name, shape in _shapes().items() if name.startswith("model.layers.0."))
        results = {name: _run(name, folder, args.timeout) for name in WORKERS}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    gib = 2**30
    print(f"# NF4 + double quantization load of a Llama-3.2-3B-shaped bf16 checkpoint "
          f"({written / gib:.2f} GiB); {machine()}")
    print("| loader | load s | peak RSS GiB (VmHWM) | loaded model GiB |")
    print("|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} | | |")
        else:
            print(f"| {name} | {r['load_s']:.0f} | {r['peak_rss'] / gib:.2f} | {r['model_bytes'] / gib:.2f} |")
    ours = results["slimtune"]
    if "error" not in ours:
        bound = 1.3 * (ours["model_bytes"] + layer0)
        print(f"goal: slimtune peak ≤ 1.3 × (model {ours['model_bytes'] / gib:.2f} + one layer "
              f"{layer0 / gib:.2f}) = {bound / gib:.2f} GiB: {'met' if ours['peak_rss'] <= bound else 'NOT met'}")
    theirs = results["transformers+bnb"]
    if "error" not in ours and "error" not in theirs:
        print(f"ratio peak RSS slimtune / transformers+bnb: {ours['peak_rss'] / theirs['peak_rss']:.3f}; "
              f"load time: {ours['load_s'] / theirs['load_s']:.3f}")


if __name__ == "__main__":
    main()
