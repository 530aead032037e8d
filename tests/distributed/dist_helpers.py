"""Helpers of the distributed tests: tiny recipes, torchrun launches, adapter comparisons.

Every launch runs ranks on one thread each (two ranks share this machine's two cores) with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from run_helpers import tiny_recipe, write_recipe
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "worker.py"
LAUNCH_TIMEOUT = 120  # seconds: a launch that takes longer has hung


def recipe_file(tmp: Path, name: str, *, quantized: bool = False, batch: int = 2, accumulation: int = 1,
                strategy: str | None = None, max_steps: int = 4, save_every: int = 0, checkpointing: bool = False,
                **training: Any) -> Path:
    """A tiny recipe at ``tmp/name.yaml`` writing ``tmp/name``; ``strategy`` adds a ``distributed`` section.

    Dropout 0 and Adam's epsilon 1e-3: with epsilon 1e-8 a gradient component at the level of fp32 rounding
    becomes a full learning-rate step, so runs whose gradients agree to 1e-7 would differ by 1e-5 after a few
    steps; a larger epsilon compares the gradients rather than Adam's amplification of rounding.
    """
    recipe = tiny_recipe(tmp, quantized=quantized, method={"lora_dropout": 0.0},
                         training={"max_steps": max_steps, "batch_size": batch, "gradient_accumulation_steps":
                                   accumulation, "save_every": save_every, "warmup_steps": 1, "adam_epsilon": 1e-3,
                                   "keep_checkpoints": 2, **training},
                         demo={"enabled": False}, output={"dir": str(tmp / name), "plot": False})
    recipe["model"]["gradient_checkpointing"] = checkpointing  # recomputed blocks: the same gradients
    if quantized:
        recipe["quantization"]["blocksize"] = 32  # the tiny model's rows (32 or 64 wide) are whole blocks
    if strategy is not None:
        recipe["distributed"] = {"strategy": strategy, "timeout_s": 60}
    return write_recipe(tmp / f"{name}.yaml", recipe)


def env(**extra: str) -> dict[str, str]:
    # (PYTHONFAULTHANDLER: a rank that aborts prints where each of its threads was)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONFAULTHANDLER": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                           os.environ.get("PYTHONPATH", "")]), **extra}


# What a rank prints when it aborts in the interpreter's teardown, after its script ended (a gloo thread freeing the
# last collective's work takes the GIL while the interpreter finalizes; see slimtune/__main__.py): about once in a
# hundred launches on a loaded 2-core machine. `python -m slimtune` ranks skip that teardown; the test scripts' ranks
# run it and are relaunched
GLOO_THREAD_ABORT = "terminate called without an active exception"


def torchrun(*args: str, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT,
             fresh: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc ARGS`` (ARGS: ``-m slimtune train ...`` or a script).

    ``fresh`` makes the launch repeatable: when a rank died of :data:`GLOO_THREAD_ABORT`, it is called (to remove
    what the first launch wrote) and the launch runs once more; any other failure is returned as it is.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 and fresh is not None and GLOO_THREAD_ABORT in result.stderr:
        fresh()
        result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)
    return result


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest element-wise difference of two adapters, relative to each tensor's largest value."""
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in a)


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-5,
                        moved_key: str = "lora_B") -> None:
    """``a`` and ``b`` agree to ``rel``, and ``a`` trained: its ``moved_key`` tensors (initialized to 0) moved."""
    moved = max(float(a[k].abs().max()) for k in a if moved_key in k)
    assert moved > 1e-3, "the adapters did not train: the comparison would prove nothing"
    difference = relative_difference(a, b)
    assert difference < rel, f"adapters differ: {difference:.2e} relative (tolerance {rel:.0e})"


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result
