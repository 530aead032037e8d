"""Experiment tracking: the rows of ``metrics.jsonl`` also sent to TensorBoard and Weights & Biases.

``training.report_to`` lists where the metrics go: ``jsonl`` (the default), ``tensorboard``, ``wandb``.
``metrics.jsonl`` is written in every case, since ``loss.png`` and ``--resume`` read it; the other
destinations receive the same rows, one scalar per number, as they are written:

- ``tensorboard``: event files in ``<run>/tensorboard/`` (``torch.utils.tensorboard``; needs
  ``pip install slimtune[tensorboard]``). Train rows become ``train/<key>``, evaluation rows
  ``eval/<key>`` (``eval_loss`` → ``eval/loss``), at their optimizer step. ``tensorboard --logdir runs``.
- ``wandb``: a run under ``<run>/wandb/`` (``pip install slimtune[wandb]``), named after the run folder,
  with the resolved recipe as its config. Without ``WANDB_API_KEY`` it runs offline (nothing leaves the
  machine; ``wandb sync <run>/wandb/offline-run-*`` uploads it later); ``WANDB_MODE`` set by the user wins.

Reporters start on the first row, not when the trainer is built: the run folder may still be replaced
(``output.overwrite``) between the two.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from slimtune.core.optional import OptionalModule
from slimtune.train.recipe import REPORTERS
from slimtune.train.run_folder import RunFolder

# Optional and heavy (imported only when a run reports there): pip install slimtune[tensorboard] / [wandb].
tensorboard: OptionalModule | Any = OptionalModule("torch.utils.tensorboard", "pip install tensorboard",
                                               needs="tensorboard")
wandb: OptionalModule | Any = OptionalModule("wandb", "pip install wandb")

REPORT_TO: tuple[str, ...] = get_args(REPORTERS)
TENSORBOARD_DIR = RunFolder.TENSORBOARD
WANDB_DIR = RunFolder.WANDB
_EXTRAS = {"tensorboard": "pip install 'slimtune[tensorboard]' (or: pip install tensorboard)",
           "wandb": "pip install 'slimtune[wandb]' (or: pip install wandb)"}


def check_report_to(report_to: Sequence[str]) -> list[str]:
    """The destinations, validated: known names, no repeats, and the packages they need installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to={names!r}: {unknown} unknown; use any of {list(REPORT_TO)} "
                         "(metrics.jsonl is always written).")
    if len(set(names)) != len(names):
        raise ValueError(f"report_to={names!r} names a destination twice.")
    missing = [n for n, module in (("tensorboard", tensorboard), ("wandb", wandb)) if n in names and not module]
    if missing:
        raise ValueError(f"report_to={names!r} needs {', '.join(_EXTRAS[n] for n in missing)}.")
    return names


def scalars(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """``(step, {tag: value})`` of a metrics row: finite numbers only, ``train/`` or ``eval/`` tags."""
    step = int(row.get("step", 0))
    is_eval = any(key.startswith("eval_") for key in row)
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[f"eval/{key.removeprefix('eval_')}" if is_eval else f"train/{key}"] = float(value)
    return step, out


class Reporter:
    """One destination of the metrics rows (besides metrics.jsonl)."""

    def log(self, row: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write out what is buffered and release the destination."""


class TensorBoardReporter(Reporter):
    """Scalars into ``<run>/tensorboard/events.out.tfevents.*``, flushed after every row."""

    def __init__(self, run_dir: Path) -> None:
        if not tensorboard:
            raise ValueError(f"report_to tensorboard needs {_EXTRAS['tensorboard']}.")
        self.writer = tensorboard.SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log(self, row: Mapping[str, Any]) -> None:
        step, values = scalars(row)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a crash or Ctrl-C loses nothing already logged

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    """A W&B run under ``<run>/wandb/``: online with ``WANDB_API_KEY``, else offline."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        if not wandb:
            raise ValueError(f"report_to wandb needs {_EXTRAS['wandb']}.")
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        folder = run_dir / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(run_dir), mode=mode, name=run_dir.resolve().name,
                              project=os.environ.get("WANDB_PROJECT", "slimtune"), config=dict(config or {}))

    def log(self, row: Mapping[str, Any]) -> None:
        step, values = scalars(row)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
        if wandb.run is None:  # finish() returns before wandb's service has written the run file: wait for it
            wandb.teardown()


def make_reporters(report_to: Sequence[str], run_dir: Path, config: Mapping[str, Any] | None = None) -> list[Reporter]:
    """The reporters ``report_to`` asks for besides jsonl (which :class:`MetricsLog` writes itself)."""
    reporters: list[Reporter] = []
    for name in check_report_to(report_to):
        if name == "tensorboard":
            reporters.append(TensorBoardReporter(run_dir))
        elif name == "wandb":
            reporters.append(WandbReporter(run_dir, config))
    return reporters
