"""Per-rank memory of QLoRA under FSDP2 on the CPU (gloo): the Llama-3.2-3B shape in NF4, 1 vs 2 processes.

    .venv/bin/python bench/distributed_memory.py [--ranks 1 2] [--layers 28] [--timeout 1800] [--keep DIR]

Each configuration is one `slimtune train` of a recipe with ``model.init: random`` (Llama-3.2-3B's shapes from
slimtune's table: 28 layers, hidden 3072, MLP 8192, vocabulary 128,256, tied embeddings; random weights made and
quantized layer by layer), NF4 + double quantization, LoRA r=16 on every linear layer, ``distributed.strategy:
fsdp``, one optimizer step of one 64-token row per rank; N ranks are started with ``--nproc-per-node N``.
It prints, per rank, what the run's summary and log record:

- held after sharding: the bytes of parameters and buffers the rank holds once ``fully_shard`` has run
  (FSDP2 local shards), and of them the 4-bit layers' packed weights and block scales;
- peak RSS while training (VmHWM reset at the first step) and the whole process's peak RSS (loading included).

Each rank loads per rank (slimtune.distributed.sharded_load): the model stays empty until ``fully_shard`` has
split it, then the rank makes (here: random, from per-chunk generators; from a checkpoint: reads) and
quantizes only its own rows of every weight, all-gathering one layer's fp32 block scales at a time for the
double quantization. No rank ever holds the whole model. What does not fall with N is the replicated part:
the root's frozen parameters (the tied fp32 embedding, 1.47 GiB here, and the final norm: kept whole on every
rank, see slimtune.distributed.wrap._replicated_root), the double-quant statistics, code books and rotary
tables, and each rank's activations and runtime. The log line "each rank reads and quantizes only its own
rows" says the run took that path. The prediction for 8 GPUs divides the sharded part by 8 and
keeps the replicated part.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HELD = re.compile(r"fsdp: rank 0 holds ([\d,]+) of the (model's|quantized layers') ([\d,]+) bytes")


def recipe(folder: Path, layers: int) -> Path:
    data = folder / "rows.jsonl"
    row = {"prompt": "Write a function that adds two numbers.", "response": "def add(a, b):\n    return a + b\n"}
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(8)))
    spec = {
        "description": "distributed memory bench: Llama-3.2-3B shape, random NF4 weights, FSDP2",
        "model": {"name_or_path": "meta-llama/Llama-3.2-3B", "init": "random", "device": "cpu",
                  "config_overrides": {"num_hidden_layers": layers}},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 64,
                         "compute_dtype": "float32"},
        "method": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"dataset": str(data), "eval_dataset": str(data), "max_seq_length": 64, "max_eval_examples": 1},
        "training": {"max_steps": 1, "batch_size": 1, "eval_batch_size": 1, "max_grad_norm": None},
        "distributed": {"strategy": "fsdp", "timeout_s": 1800},
        "output": {"dir": str(folder / "run"), "plot": False, "overwrite": True},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(ranks: int, folder: Path, layers: int, timeout: float) -> dict:
    path = recipe(folder, layers)
    command = [sys.executable, "-m", "slimtune", "train", str(path), "--no-progress", "--force"]
    if ranks > 1:
        command += ["--nproc-per-node", str(ranks)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((folder / "run" / "summary.json").read_text())
    held = {kind: (int(mine.replace(",", "")), int(whole.replace(",", ""))) for mine, kind, whole in
            HELD.findall(done.stdout)}
    if ranks > 1 and "each rank reads and quantizes only its own rows" not in done.stdout:
        raise RuntimeError(f"{ranks} ranks did not load per rank:\n{done.stdout[-3000:]}")
    return {"ranks": ranks, "seconds": time.perf_counter() - started, "summary": summary, "held": held}


def table(results: list[dict]) -> str:
    gib = 2**30
    lines = ["| processes | rank | held after sharding (all / NF4 weights+scales) | peak RSS while training | "
             "process peak RSS |", "|---|---|---|---|---|"]
    for r in results:
        s, (mine, whole), (q_mine, q_whole) = r["summary"], r["held"]["model's"], r["held"]["quantized layers'"]
        for rank in range(r["ranks"]):
            held = f"{mine / gib:.2f} of {whole / gib:.2f} GiB / {q_mine / gib:.2f} of {q_whole / gib:.2f} GiB" \
                if rank == 0 else "(as rank 0)"
            lines.append(f"| {r['ranks']} | {rank} | {held} | {s['peak_memory_mb_per_rank'][rank] / 1024:.2f} GiB | "
                         f"{s['process_peak_rss_mb_per_rank'][rank] / 1024:.2f} GiB |")
    return "\n".join(lines)


def prediction(results: list[dict], n: int = 8) -> str:
    """Bytes a rank holds with ``n`` ranks: the sharded part / n plus the replicated part (from the 2-rank run)."""
    two = next((r for r in results if r["ranks"] == 2), None)
    if two is None:
        return ""
    mine, whole = two["held"]["model's"]
    sharded = 2 * (whole - mine)  # what 2 ranks split: whole - mine = the other rank's half
    replicated = whole - sharded
    gib = 2**30
    return (f"predicted for {n} ranks: each holds {(sharded / n + replicated) / gib:.2f} GiB of the model's "
            f"{whole / gib:.2f} GiB after sharding ({sharded / gib:.2f} GiB sharded / {n} + {replicated / gib:.2f} GiB "
            "replicated: the root's frozen parameters and buffers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28: the real 3B; fewer to try it)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args()
    results = []
    for ranks in args.ranks:
        folder = Path(tempfile.mkdtemp(prefix=f"slimtune-dist-mem-{ranks}-"))
        try:
            results.append(run(ranks, folder, args.layers, args.timeout))
            print(f"{ranks} rank(s): {results[-1]['seconds']:.0f} s", flush=True)
        finally:
            if args.keep is not None:
                shutil.copytree(folder, args.keep / folder.name, dirs_exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
    print(table(results))
    print(prediction(results))


if __name__ == "__main__":
    main()
