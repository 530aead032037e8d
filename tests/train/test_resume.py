"""Exact resume: Ctrl-C then `--resume` ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_recipe, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2, tiny_llama

import slimtune
from slimtune.adapter_files import adapter_tensors
from slimtune.cli import main
from slimtune.errors import InvalidFileError
from slimtune.methods.fusion import AdapterFusionConfig
from slimtune.train import runner
from slimtune.train.batching import BatchIterator
from slimtune.train.checkpoint import Checkpoint, method_tensors, read_checkpoint
from slimtune.train.recipe import TrainingSection
from slimtune.train.run_folder import RunFolder
from slimtune.train.trainer import Trainer


def train(recipe_file, *extra: str) -> int:
    return main(["train", str(recipe_file), "--no-progress", *extra])


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tokens(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["tokens"] for r in rows if "tokens" in r}


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Press Ctrl-C (or send ``signum``) while optimizer step ``step`` runs (the loop stops after finishing it)."""
    original = Trainer.train_step

    def train_step(self):
        out = original(self)
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    # Dropout 0.1, accumulation, warmup + cosine and several epochs (40 rows / 4 per batch = 10
    # batches per epoch, 2 per step, 12 steps): every piece of state has to come back exactly. A metrics row
    # every 3 steps: the stop (step 7) falls inside a row's window, whose steps before it the row must count.
    recipe = tiny_recipe(tmp_path, training={"max_steps": 12, "save_every": 4, "keep_checkpoints": 2,
                                             "log_every": 3})
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
        assert torch.equal(a[key], b[key]), key  # bit for bit
    assert losses(tmp_path / "straight") == losses(run)  # steps 3..12, once each, the same to the last bit
    assert list(losses(run)) == [3, 6, 9, 12] and tokens(tmp_path / "straight") == tokens(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_loss_after"] < summary["eval_loss_before"]


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint_like_ctrl_c(tmp_path, monkeypatch, capsys):
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 6, "save_every": 0}))
    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the default handler: the run would have been killed")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with monkeypatch.context() as patch:
            interrupt_at(patch, 3, signal.SIGTERM)
            assert train(recipe_file) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "SIGTERM: stopping after this step" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000003"]
    assert train(recipe_file, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["evaluation", "plot"])
def test_a_run_stopped_while_it_is_finalized_resumes_into_finalizing_it(tmp_path, monkeypatch, capsys, where):
    """save_every: 0 (the default recipe's): Ctrl-C during the last evaluation (or after it, while the loss is
    plotted), after training ended. The resume trains nothing again and finishes the run with the adapter and
    the logs an uninterrupted run writes; the checkpoint of the finished training, kept only while the run was
    finalized, is gone once the summary is written."""
    recipe = tiny_recipe(tmp_path, training={"max_steps": 6, "save_every": 0})
    straight = write_recipe(tmp_path / "straight.yaml", {**recipe, "output": {"dir": str(tmp_path / "straight")}})
    stopped = write_recipe(tmp_path / "stopped.yaml", {**recipe, "output": {"dir": str(tmp_path / "stopped")}})
    assert train(straight) == 0
    original = Trainer.evaluate

    def evaluate(self):
        if self.state.step == self.total_steps:  # the final evaluation, in finalize
            raise KeyboardInterrupt
        return original(self)

    def plot(run_dir):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        if where == "evaluation":
            patch.setattr(Trainer, "evaluate", evaluate)
        else:
            patch.setattr(runner, "plot_loss", plot)
        assert train(stopped) == 130
    assert "interrupted while finishing the run; the training is saved" in capsys.readouterr().out
    run = tmp_path / "stopped"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000006"]
    trained_peak = json.loads((run / "checkpoints" / "step-000006" / "trainer_state.json").read_text())[
        "peak_memory_mb"]
    assert train(stopped, "--resume") == 0
    assert "training 0 steps" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["peak_memory_mb"] == round(trained_peak, 1) > 0
    for name in ("adapter_model.safetensors",):
        a, b = load_file(tmp_path / "straight" / "adapter" / name), load_file(run / "adapter" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(run)
    evals = [{k: row.get(k) for k in ("step", "eval_loss")} for row in map(json.loads, (run / "metrics.jsonl")
             .read_text().splitlines()) if "eval_loss" in row]
    straight = [{k: row.get(k) for k in ("step", "eval_loss")} for row in map(json.loads, (
        tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in row]
    assert evals == straight  # the stopped finalize's evaluation row is not kept twice
    assert not (run / "checkpoints").exists() and not (tmp_path / "straight" / "checkpoints").exists()


def test_resume_refuses_what_it_cannot_continue_exactly(tmp_path, monkeypatch, capsys):
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 4}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert train(recipe_file, "--resume") == 2
    assert "exists and is not a slimtune run folder" in capsys.readouterr().err
    (tmp_path / "run" / "notes.txt").unlink()

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
    assert train(recipe_file, "training.max_steps=6") == 2  # no advice pointing back to --resume
    err = capsys.readouterr().err
    assert "holds a finished run. Replace it with output.overwrite=true" in err and "--resume" not in err
    assert train(recipe_file, "output.overwrite=true") == 0  # replaces the finished run
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()


def test_a_resume_over_checkpoints_moved_elsewhere_and_linked_back_says_so_and_keeps_them(tmp_path, monkeypatch,
                                                                                           capsys):
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 4, "save_every": 1}))
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        assert train(recipe_file) == 130
    checkpoints = tmp_path / "run" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir())
    checkpoints.rename(tmp_path / "elsewhere")  # e.g. to another disk, after "free some disk space"
    checkpoints.symlink_to(tmp_path / "elsewhere")
    assert train(recipe_file, "--resume") == 2
    assert f"--resume: {checkpoints} is a symbolic link (to {tmp_path / 'elsewhere'})" in capsys.readouterr().err
    assert checkpoints.is_symlink() and sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == kept
    checkpoints.unlink()
    (tmp_path / "elsewhere").rename(checkpoints)
    assert train(recipe_file, "--resume") == 0
    assert f"resumed from {checkpoints / kept[-1]}" in capsys.readouterr().out


def test_a_resume_refuses_another_model_or_other_eval_rows_than_the_runs(tmp_path, monkeypatch, capsys):
    """A relative model path names another model from another working directory, and an eval file edited in place
    changes what "before" and "after" are measured on: both are refused, not mixed into the run."""
    recipe = tiny_recipe(tmp_path, quantized=False, training={"max_steps": 4, "save_every": 1})
    for project in ("a", "b"):  # two copies of the model, one of them changed
        shutil.copytree(recipe["model"]["name_or_path"], tmp_path / project / "model")
    changed = tmp_path / "b" / "model" / "model.safetensors"
    weights = load_file(changed)
    save_file({k: v + 0.1 for k, v in weights.items()}, changed)
    recipe["model"]["name_or_path"] = "model"
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    monkeypatch.chdir(tmp_path / "a")
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert train(recipe_file) == 130
    monkeypatch.chdir(tmp_path / "b")
    assert train(recipe_file, "--resume") == 2
    assert f"model.name_or_path ({str(tmp_path / 'a' / 'model')!r} -> {str(tmp_path / 'b' / 'model')!r})" in \
        capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "a")
    evals = Path(recipe["data"]["eval_dataset"])
    kept = evals.read_text()
    evals.write_text(kept.replace("a", "b", 1))
    assert train(recipe_file, "--resume") == 2
    assert "Cannot resume: the evaluation rows differ from the run's" in capsys.readouterr().err
    evals.write_text(kept)
    assert train(recipe_file, "--resume") == 0


def test_a_folder_of_the_users_is_never_cleared_even_with_a_recipe_yaml_in_it(tmp_path, capsys):
    """A user's project folder that holds its own recipe.yaml (or metrics.jsonl, ...) beside other files is not
    a run: neither --resume nor output.overwrite=true deletes anything in it."""
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 2}))
    project = tmp_path / "run"
    project.mkdir()
    mine = {"recipe.yaml": "my recipe", "notes.txt": "mine", "metrics.jsonl": "{}\n"}
    for name, text in mine.items():
        (project / name).write_text(text)
    for extra in ("--resume", "output.overwrite=true"):
        assert train(recipe_file, extra) == 2
        assert "is not a slimtune run folder (it holds ['notes.txt']" in capsys.readouterr().err
        assert {p.name: p.read_text() for p in project.iterdir()} == mine
    assert not RunFolder(project).is_run() and RunFolder(project).foreign() == ["notes.txt"]
    (project / "notes.txt").unlink()  # only slimtune's names left, but the recipe.yaml is the user's
    del mine["notes.txt"]
    for extra in (["--resume"], ["output.overwrite=true"], []):
        assert train(recipe_file, *extra) == 2
        assert "not a slimtune run folder: its recipe.yaml was not written by `slimtune train`" in \
            capsys.readouterr().err
        assert {p.name: p.read_text() for p in project.iterdir()} == mine
    (project / "recipe.yaml").write_text(f"{RunFolder.RECIPE_MARK}\nmodel: {{}}\n")  # a run's start: replaced
    assert RunFolder(project).is_run()
    assert train(recipe_file, "output.overwrite=true") == 0
    assert (project / "summary.json").is_file()


def test_resume_never_clears_a_folder_without_the_runs_own_recipe(tmp_path, capsys):
    """--resume into a folder holding only entries with slimtune's names (an adapter the user saved there) but no
    recipe.yaml of a run is refused; it deleted the adapter and trained a new one from scratch."""
    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 2}))
    saved = tmp_path / "run" / "adapter"
    saved.mkdir(parents=True)
    (saved / "adapter_model.safetensors").write_bytes(b"the user's adapter")
    for extra in (["--resume"], ["output.overwrite=true"]):
        assert train(recipe_file, *extra) == 2
        assert "holds ['adapter'] but no recipe.yaml, which a run writes first" in capsys.readouterr().err
        assert (saved / "adapter_model.safetensors").read_bytes() == b"the user's adapter"
    (tmp_path / "run" / ".recipe.yaml.tmp123").write_text("")  # only a first write's leftover: a run's start
    (saved / "adapter_model.safetensors").unlink()
    saved.rmdir()
    assert RunFolder(tmp_path / "run").is_run()
    assert train(recipe_file, "--resume") == 0
    first_line = (tmp_path / "run" / "recipe.yaml").read_text().splitlines()[0]
    assert first_line == RunFolder.RECIPE_MARK
    assert RunFolder(tmp_path / "run").is_run()
    recipe = tmp_path / "run" / "recipe.yaml"  # a run of an earlier slimtune: its recipe has no mark
    recipe.write_text(recipe.read_text().split("\n", 1)[1])
    assert RunFolder(tmp_path / "run").is_run()
    (tmp_path / "run" / "metrics.jsonl").unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints", ignore_errors=True)
    assert not RunFolder(tmp_path / "run").is_run()  # nor anything else a run writes early: the user's, maybe


# ---- every method x optimizer: N steps straight == N/2, checkpoint, new model, resume, N/2 -------------------
# Each case builds the adapter on a tiny LLaMA (GPT-2 for BitFit: LLaMA has no biases), with dropout on
# where the method has it; the LoRA case also trains a copy of lm_head (128 x 32 = 4096 values), so the
# 8-bit optimizer's quantized states (tensors of >= 4096 values) are in its checkpoints too.
TARGETS = ["q_proj", "v_proj", "down_proj"]
METHODS = {
    "lora": lambda: slimtune.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                                        modules_to_save=["lm_head"]),
    "rslora_dora": lambda: slimtune.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, use_dora=True,
                                               target_modules=TARGETS),
    "lora_fa": lambda: slimtune.LoraFAConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS),
    "delta_lora": lambda: slimtune.DeltaLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, delta_start_step=1),
    "lora_plus": lambda: slimtune.LoraPlusConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS),
    "vera": lambda: slimtune.VeraConfig(r=8, vera_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    "loha": lambda: slimtune.LohaConfig(r=4, alpha=8, rank_dropout=0.1, module_dropout=0.1, target_modules=TARGETS),
    "lokr": lambda: slimtune.LokrConfig(r=2, alpha=8, rank_dropout=0.1, module_dropout=0.1, decompose_both=True,
                                        target_modules=TARGETS),
    "ia3": lambda: slimtune.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    "bottleneck": lambda: slimtune.BottleneckConfig(adapter_type="houlsby", placement="adapterhub", reduction_factor=8,
                                                    dropout=0.1),
    "fusion": None,  # two bottleneck adapters and their AdapterFusion (see _add_method)
    "prompt_tuning": lambda: slimtune.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "p_tuning": lambda: slimtune.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8,
                                                     encoder_dropout=0.1, task_type="CAUSAL_LM"),
    "prefix_tuning": lambda: slimtune.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                         encoder_hidden_size=8, task_type="CAUSAL_LM"),
    "bitfit": lambda: slimtune.BitFitConfig(),
    "selective": lambda: slimtune.SelectiveConfig(target_parameters=["post_attention_layernorm.weight",
                                                                     "mlp.up_proj.weight"]),
    "layerdrop": None,  # LoRA with LayerDrop beside it (its RNG draws must resume too)
}
OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw"]
STEPS = 4


def _add_method(case: str):
    model = (tiny_gpt2 if case == "bitfit" else tiny_llama)(seed=0).train()
    torch.manual_seed(1)
    if case == "fusion":
        for name in ("a", "b"):
            slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", reduction_factor=8),
                                 name, activate=False)
        slimtune.add_adapter(model, AdapterFusionConfig(adapter_names=["a", "b"], dropout_prob=0.1), activate=True)
    elif case == "layerdrop":
        slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_dropout=0.1, target_modules=TARGETS))
        slimtune.apply_layerdrop(model, 0.5)
    else:
        slimtune.add_adapter(model, METHODS[case]())
    return model


def _rows(n: int = 12) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(3, 128, (6 + i % 5,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def _trainer(case: str, optim: str, run_dir) -> Trainer:
    settings = TrainingSection(max_steps=STEPS, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                               warmup_steps=1, save_every=STEPS // 2, optim=optim, seed=0, weight_decay=0.01)
    rows = _rows()
    run_dir.mkdir()
    batches = BatchIterator(rows, settings.batch_size, seed=0, pad_id=0)
    return Trainer(_add_method(case), batches, rows[:2], settings, run_dir, torch.device("cpu"), 0,
                   show_progress=False, log=lambda _: None)


def _final(trainer: Trainer) -> dict[str, torch.Tensor]:
    """What the run ends with: the adapter file's tensors, and what methods change in place (Delta-LoRA's W)."""
    model = trainer.model
    out = {f"adapter/{k}": v.detach().clone() for k, v in adapter_tensors(model).items()}
    out.update({f"method/{k}": v.detach().clone() for k, v in method_tensors(model).items()})
    return out


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_beginning(tmp_path, capsys):
    """What a kill during start-up leaves (the recipe, some metrics, no checkpoint): --resume starts it again
    rather than sending the user back and forth between --resume and output.overwrite."""
    recipe = tiny_recipe(tmp_path, training={"max_steps": 3, "save_every": 1}, demo={"enabled": False})
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    assert train(recipe_file) == 0
    straight = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    run = tmp_path / "run"
    for name in ("adapter", "checkpoints", "summary.json", "loss.png"):  # as if killed before step 1's checkpoint
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 5.0}\n{"step": 1, "lo')
    capsys.readouterr()
    assert train(recipe_file, "--resume") == 0
    assert "has no checkpoint yet (the run stopped before its first); starting from the beginning" in \
        capsys.readouterr().out
    again = load_file(run / "adapter" / "adapter_model.safetensors")
    assert again.keys() == straight.keys() and all(torch.equal(again[k], straight[k]) for k in straight)
    # Checkpoint folders that are all incomplete are not deleted by a restart: the reason is given instead.
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    for step in (run / "checkpoints").iterdir():
        (step / "trainer_state.json").unlink()
    assert train(recipe_file, "--resume") == 2
    assert "trainer_state.json: is missing; the checkpoint is incomplete" in capsys.readouterr().err
    assert len(list((run / "checkpoints").iterdir())) == 2
    # Killed before the run folder was made: --resume starts the run.
    assert train(write_recipe(tmp_path / "r2.yaml", {**recipe, "output": {"dir": str(tmp_path / "new")}}),
                 "--resume") == 0
    assert (tmp_path / "new" / "summary.json").is_file()


@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize("case", list(METHODS))
def test_resumed_training_ends_bit_identical(case, optim, tmp_path):
    torch.manual_seed(0)
    straight = _trainer(case, optim, tmp_path / "straight")
    assert straight.train()  # saves step-000002 on the way
    expected = _final(straight)
    checkpoint = tmp_path / "straight" / "checkpoints" / f"step-{STEPS // 2:06d}"
    if case == "lora" and optim == "adamw_8bit":  # the copy of lm_head has 8-bit moments: they are checkpointed
        with safe_open(checkpoint / "tensors.safetensors", "pt") as f:
            assert any(k.endswith("exp_avg_codes") for k in f.keys())

    torch.manual_seed(123)  # the resumed process starts from another random state: the checkpoint restores it
    resumed = _trainer(case, optim, tmp_path / "resumed")
    resumed.resume(checkpoint)
    assert resumed.state.step == STEPS // 2
    assert resumed.train()
    got = _final(resumed)
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_a_resume_that_fails_midway_leaves_the_data_position(tmp_path, monkeypatch):
    straight = _trainer("lora", "adamw", tmp_path / "straight")
    assert straight.train()
    checkpoint = tmp_path / "straight" / "checkpoints" / f"step-{STEPS // 2:06d}"
    fresh = _trainer("lora", "adamw", tmp_path / "fresh")
    before = fresh.batches.state_dict()

    def fails(*args, **kwargs):
        raise InvalidFileError(checkpoint / "tensors.safetensors", "tampered", "tensors")

    monkeypatch.setattr(Checkpoint, "apply", fails)
    with pytest.raises(InvalidFileError, match="tampered"):
        fresh.resume(checkpoint)
    assert fresh.batches.state_dict() == before and fresh.state.step == 0


@pytest.mark.parametrize("text, problem", [("{", "is not readable JSON"), ("[]", "holds a JSON list, not an object"),
                                           ('{"format": 0}', "format 0 is not")])
def test_a_damaged_trainer_state_says_what_to_do(tmp_path, text, problem):
    step = tmp_path / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(text)
    advice = "start the run again with output.overwrite=true" if "format" in problem else \
        "Delete this step's folder to resume from the one before"
    with pytest.raises(InvalidFileError, match=rf"trainer_state.json: {problem}.*{advice}"):
        read_checkpoint(step)


def test_a_checkpoint_with_the_empty_decay_group_of_earlier_versions_resumes(tmp_path, monkeypatch, capsys):
    """Earlier slimtune kept an empty weight-decay group when only vectors train (VeRA's): such a checkpoint
    resumes to the adapter of an uninterrupted run, the group dropped."""
    from slimtune import optim

    recipe = {**tiny_recipe(tmp_path, training={"max_steps": 6, "save_every": 0}, demo={"enabled": False}),
              "method": {"peft_type": "VERA", "r": 8, "target_modules": ["q_proj", "v_proj"]}}
    straight = write_recipe(tmp_path / "straight.yaml", {**recipe, "output": {"dir": str(tmp_path / "straight")}})
    old = write_recipe(tmp_path / "old.yaml", {**recipe, "output": {"dir": str(tmp_path / "old")}})
    assert train(straight) == 0

    def earlier_groups(model, lr, *args, **kwargs):  # what earlier versions built: a decay group even when empty
        groups = optim.training_param_groups(model, lr, *args, **kwargs)
        return groups if len(groups) == 2 else [{"params": []}, *groups]

    with monkeypatch.context() as patch:
        patch.setattr("slimtune.train.trainer.training_param_groups", earlier_groups)
        interrupt_at(patch, 3)
        assert train(old) == 130
    saved = json.loads((tmp_path / "old" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert [len(g["params"]) for g in saved["optimizer"]["param_groups"]] == [0, 8]  # (2 layers × q, v × λ_b, λ_d)
    assert train(old, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "old" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
