"""Exact resume: Ctrl-C then `--resume` ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal

import pytest
from run_helpers import tiny_recipe, write_recipe
from safetensors.torch import load_file

from slimtune.cli import main
from slimtune.train.trainer import Trainer


def train(recipe_file, *extra: str) -> int:
    return main(["train", str(recipe_file), "--no-progress", *extra])


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def interrupt_at(monkeypatch, step: int) -> None:
    """Press Ctrl-C while optimizer step ``step`` runs (the loop stops after finishing it)."""
    original = Trainer.train_step

    def train_step(self):
        out = original(self)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    # Dropout 0.1, accumulation, warmup + cosine and several epochs (40 rows / 4 per batch = 10
    # batches per epoch, 2 per step, 12 steps): every piece of state has to come back exactly.
    recipe = tiny_recipe(tmp_path, training={"max_steps": 12, "save_every": 4, "keep_checkpoints": 2})
    straight = write_recipe(tmp_path / "straight.yaml", {**recipe, "output": {"dir": str(tmp_path / "straight")}})
    broken = write_recipe(tmp_path / "broken.yaml", {**recipe, "output": {"dir": str(tmp_path / "broken")}})
    assert train(straight) == 0

    with monkeypatch.context() as patch:
        interrupt_at(patch, 7)
        assert train(broken) == 130
    out = capsys.readouterr().out
    assert "interrupted at step 7/12" in out and "--resume" in out
    run = tmp_path / "broken"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000007"]
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()

    assert train(broken, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28  # 7 linear layers x 2 blocks x (A, B)
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= 1e-6, key
    assert losses(tmp_path / "straight") == pytest.approx(losses(run), abs=1e-6)  # steps 1..12, once each
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_loss_after"] < summary["eval_loss_before"]


def test_resume_refuses_what_it_cannot_continue_exactly(tmp_path, monkeypatch, capsys):
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 4}))
    assert train(recipe_file, "--resume") == 2
    assert "has no checkpoint to resume from" in capsys.readouterr().err

    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert train(recipe_file) == 130
    assert train(recipe_file) == 2  # a new run over an unfinished one
    assert "already holds a run. Continue it with --resume" in capsys.readouterr().err
    assert train(recipe_file, "training.learning_rate=0.5", "--resume") == 2
    assert "training.learning_rate (0.01 -> 0.5)" in capsys.readouterr().err

    assert train(recipe_file, "--resume") == 0
    assert train(recipe_file, "--resume") == 2
    assert "already finished" in capsys.readouterr().err
    assert train(recipe_file, "output.overwrite=true") == 0  # replaces the finished run
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()
