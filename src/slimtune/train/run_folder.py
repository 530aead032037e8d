"""The run folder of `slimtune train`, named and read in one place.

    runs/<recipe>/
      recipe.yaml        the resolved recipe (written first)
      metrics.jsonl      one JSON row per logged step and per evaluation
      checkpoints/       step-000040/ … (see slimtune.train.checkpoint)
      adapter/           the final adapter, PEFT's format
      loss.png           the loss curve
      summary.json       written last: the run finished
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from slimtune.quant import QuantConfig


class RunFolder:
    RECIPE = "recipe.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    ADAPTER = "adapter"
    PLOT = "loss.png"
    SUMMARY = "summary.json"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def recipe_file(self) -> Path:
        return self.path / self.RECIPE

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / self.ADAPTER

    @property
    def plot_file(self) -> Path:
        return self.path / self.PLOT

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    def is_run(self) -> bool:
        """Whether the folder holds (the start of) a run."""
        return any((self.path / name).exists() for name in (self.RECIPE, self.METRICS, self.SUMMARY, self.CHECKPOINTS))

    def finished(self) -> bool:
        return self.summary_file.is_file()

    def recipe_dict(self) -> dict[str, Any] | None:
        """The resolved recipe the run was started with (None if absent or unreadable)."""
        try:
            data = yaml.safe_load(self.recipe_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def quantization(self) -> QuantConfig | None:
        """The run's ``quantization`` section (None: a full-precision base, or no readable recipe)."""
        section = (self.recipe_dict() or {}).get("quantization")
        return QuantConfig.from_dict(section) if isinstance(section, dict) else None

    def summary(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.summary_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @classmethod
    def of_adapter(cls, adapter_dir: str | os.PathLike) -> RunFolder | None:
        """The run an adapter folder belongs to: ``<run>/adapter`` or ``<run>/checkpoints/step-N/adapter``."""
        adapter_dir = Path(adapter_dir)
        for candidate in (adapter_dir.parent, adapter_dir.parent.parent.parent):
            if candidate.name and (candidate / cls.RECIPE).is_file() and (
                    adapter_dir.parent == candidate or adapter_dir.parent.parent.name == cls.CHECKPOINTS):
                return cls(candidate)
        return None
