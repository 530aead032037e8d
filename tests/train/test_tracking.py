"""training.report_to: the metrics rows reach TensorBoard's event files and W&B's offline run files."""

from __future__ import annotations

import json
import struct

import pytest
from run_helpers import tiny_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from slimtune.distributed.run import run_distributed
from slimtune.train import progress, tracking
from slimtune.train.progress import MetricsLog
from slimtune.train.recipe import RecipeError, TrainingSection, recipe_from_dict
from slimtune.train.runner import run_recipe
from slimtune.train.trainer import Trainer

ROWS = [
    {"step": 0, "eval_loss": 3.0, "eval_ppl": 20.0},
    {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "tokens": 10},
    {"step": 2, "loss": 2.0, "lr": 5e-4, "grad_norm": 0.5, "tokens": 12},
    {"step": 2, "eval_loss": 1.75, "eval_ppl": 5.75},
]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No API key: the reporter must go offline. W&B's own settings and caches stay in tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def wandb_records(path) -> list:
    """The protobuf records of a ``.wandb`` file: a LevelDB-style log (7-byte file header, 32 KiB blocks of
    chunks with a 7-byte header: crc32, length, kind FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def history(records) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(items["_step"], {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    return out


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_report_to_is_validated():
    assert TrainingSection().report_to == ["jsonl"]
    assert TrainingSection(report_to="tensorboard").report_to == ["tensorboard"]  # a single name, as in HF
    with pytest.raises(ValueError, match="names a destination twice"):
        TrainingSection(report_to=["wandb", "wandb"])
    with pytest.raises(RecipeError, match=r"training\.report_to.*'mlflow'"):
        recipe_from_dict({"method": {"peft_type": "LORA"}, "training": {"report_to": ["jsonl", "mlflow"]}})


def test_a_missing_package_is_named_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "wandb", None)
    with pytest.raises(ValueError, match=r"pip install 'slimtune\[wandb\]'"):
        MetricsLog(tmp_path / "run", ["jsonl", "wandb"])
    assert not (tmp_path / "run").exists()


def test_scalars_keep_finite_numbers_under_train_and_eval_tags():
    assert tracking.scalars(ROWS[1]) == (1, {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 10.0})
    assert tracking.scalars({"step": 3, "eval_loss": float("nan"), "eval_ppl": 7}) == (3, {"eval/ppl": 7.0})


def test_tensorboard_events_hold_every_row(tmp_path):
    run = tmp_path / "run"
    log = MetricsLog(run, ["jsonl", "tensorboard"])
    assert not run.exists()  # trackers start on the first row: the run folder may still be replaced
    run.mkdir()
    for row in ROWS:
        log.write(row)  # flushed row by row: readable before close
    assert scalars(run / tracking.TENSORBOARD_DIR) == {
        "eval/loss": [(0, 3.0), (2, 1.75)], "eval/ppl": [(0, 20.0), (2, 5.75)],
        "train/loss": [(1, 2.5), (2, 2.0)], "train/lr": [(1, pytest.approx(1e-3)), (2, pytest.approx(5e-4))],
        "train/grad_norm": [(2, 0.5)], "train/tokens": [(1, 10.0), (2, 12.0)],
    }
    log.close()
    assert log.rows() == ROWS  # metrics.jsonl as always


def test_wandb_runs_offline_without_an_api_key(tmp_path, offline_wandb):
    run = tmp_path / "my-run"
    run.mkdir()
    log = MetricsLog(run, ["wandb"], run_config={"training": {"learning_rate": 1e-3}})
    for row in ROWS:
        log.write(row)
    log.close()
    (folder,) = (run / tracking.WANDB_DIR).glob("offline-run-*")
    records = wandb_records(next(folder.glob("run-*.wandb")))
    assert history(records) == {
        0: {"eval/loss": 3.0, "eval/ppl": 20.0},
        1: {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 10},
        2: {"train/loss": 2.0, "train/lr": 5e-4, "train/grad_norm": 0.5, "train/tokens": 12, "eval/loss": 1.75,
            "eval/ppl": 5.75},
    }
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.display_name == "my-run" and meta.project == "slimtune"
    config = {i.key: json.loads(i.value_json) for i in meta.config.update}
    assert config["training"] == {"learning_rate": 1e-3}
    assert log.rows() == ROWS


def test_a_training_run_reports_to_tensorboard(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, quantized=False, training={"max_steps": 3, "save_every": 0,
                                                                               "report_to": ["jsonl", "tensorboard"]},
                                          demo={"enabled": False}))
    result = run_recipe(recipe, show_progress=False, log=lambda _: None)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = scalars(result.run_dir / tracking.TENSORBOARD_DIR)
    assert events["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows if "loss" in r]
    assert events["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"])) for r in rows if "eval_loss" in r]
    assert [step for step, _ in events["eval/loss"]] == [0, 3]  # the base model, then the fine-tune


@pytest.mark.parametrize("runner", ["single", "distributed"])
@pytest.mark.parametrize("ending", ["finished", "failed"])
def test_a_run_ends_its_trackers_when_it_ends(tmp_path, monkeypatch, ending, runner):
    """The trackers close with the run, after its last row (the final evaluation), whether it finished or failed:
    not at the process's exit (a W&B run left open until then would take a later run's rows in a notebook)."""
    events: list[str] = []

    class Recorder(tracking.Reporter):
        def log(self, row):
            events.append("eval" if "eval_loss" in row else "train")

        def close(self):
            events.append("close")

    monkeypatch.setattr(progress, "make_reporters", lambda *_: [Recorder()])
    if ending == "failed":
        def fail(self):
            raise RuntimeError("a failure in training")
        monkeypatch.setattr(Trainer, "train_step", fail)
    extra = {"distributed": {"strategy": "ddp"}} if runner == "distributed" else {}  # (a group of one here)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, quantized=False, training={"max_steps": 2, "save_every": 0},
                                          demo={"enabled": False}, **extra))
    run = run_distributed if runner == "distributed" else run_recipe
    if ending == "failed":
        with pytest.raises(RuntimeError, match="a failure in training"):
            run(recipe, show_progress=False, log=lambda _: None)
        assert events == ["eval", "close"]  # the base model's evaluation, then the end
    else:
        run(recipe, show_progress=False, log=lambda _: None)
        assert events == ["eval", "train", "train", "eval", "close"]
