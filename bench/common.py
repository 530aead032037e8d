"""Shared helpers for the benchmarks: model shapes, timing, peak memory. Benchmarks are not tests."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads, 49,152-token tied vocabulary.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)


def smollm2_shaped(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A randomly initialised model with SmolLM2-135M's shapes (no download)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(dtype)


def random_batch(batch: int, seq: int, vocab: int = 49152, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def step_parser(description: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    return parser


def train_step(model, optimizer, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        gc.collect()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def interleaved_medians(step, names, steps: int) -> dict[str, float]:
    """Median seconds of ``step(name)`` for each name, the names taking turns ``steps`` times, so the
    machine's drift hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(steps):
        for name in names:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    return {name: median(ts) for name, ts in times.items()}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM so the next reading covers only what follows (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"
