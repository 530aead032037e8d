"""Resumable checkpoints, each a folder written atomically (temp folder, then rename).

``<run>/checkpoints/step-000040/`` holds:

- ``adapter/``: the adapter in PEFT's format (usable on its own, e.g. with `slimtune generate`);
- ``trainable.safetensors``: every trainable parameter by its name in the model (what resume restores;
  it covers methods whose trainable tensors are not all in the adapter file);
- ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: torch state dicts (read back with ``weights_only``);
- ``trainer_state.json``: step, token count, data position, evaluation history, elapsed time.

A folder without ``trainer_state.json`` (written last) is never picked up, and temp folders start with a dot.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.adapter_files import save_adapter
from slimtune.core.files import atomic_folder, recover_folder
from slimtune.train.run_folder import RunFolder

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rng: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` (RNG ``rng`` captured at the step boundary) and keep the newest ``keep``."""
    root = RunFolder(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with atomic_folder(final) as tmp:  # re-saving a step after a resume replaces it whole
        save_adapter(model, tmp / "adapter")
        save_file(trainable_tensors(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = RunFolder(run_dir).checkpoints
    if not root.is_dir():
        return []
    for leftover in {p.name.split(".")[1] for p in root.glob(".step-*.*-*")}:
        recover_folder(root / leftover)  # a save a crash interrupted
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.startswith(".")]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model (trainable tensors), optimizer and scheduler in place; return (state, rng)."""
    stored = load_file(path / "trainable.safetensors")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(stored) != set(params):
        missing, extra = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
        raise ValueError(f"checkpoint {path} does not match this model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); was the recipe's method changed?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(stored[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    state = json.loads((path / STATE_FILE).read_text())
    return state, rng
