"""What a person sees during and after training: memory figures, metrics.jsonl (and the trackers that
``training.report_to`` adds, see :mod:`slimtune.train.tracking`), the loss plot."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from slimtune.core.files import atomic_file
from slimtune.core.optional import OptionalModule
from slimtune.errors import SaveError
from slimtune.train.run_folder import RunFolder
from slimtune.train.tracking import Reporter, check_report_to, make_reporters

# matplotlib (~40 MB resident) is loaded when the plot is drawn, after training, not for every run's start.
matplotlib_figure = OptionalModule("matplotlib.figure", "pip install matplotlib")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on a GPU, else the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # /proc is Linux-only; elsewhere fall back to resource (no psutil dependency)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak afresh (so training's peak is not loading's). Best effort on CPU:
    Linux resets VmHWM when "5" is written to /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _PEAKS_BEFORE_RESETS.append(peak_memory_mb(device))
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


_PEAKS_BEFORE_RESETS: list[float] = []  # VmHWM each time reset_peak_memory cleared it (CPU)


def process_peak_rss_mb() -> float:
    """The whole process's peak resident memory (VmHWM: anonymous and file-backed mmap pages alike) since it
    started: loading, training and evaluation, across the resets of :func:`reset_peak_memory`."""
    return max([peak_memory_mb(torch.device("cpu")), *_PEAKS_BEFORE_RESETS])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_seconds(s: float) -> str:
    minutes, seconds = divmod(int(round(s)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{s:.1f}s"


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line (``{"step": .., "loss": ..}`` or eval rows).

    Each row also goes to the trackers ``report_to`` names (TensorBoard, W&B), started on the first row
    (the run folder may still be replaced before that) and ended by :meth:`close` (or at exit).
    ``run_config`` is what a tracker records as the run's configuration (the resolved recipe).
    """

    def __init__(self, run_dir: Path, report_to: Sequence[str] = ("jsonl",),
                 run_config: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = RunFolder(run_dir).metrics_file
        self.report_to = check_report_to(report_to)
        self.run_config = dict(run_config or {})
        self.reporters: list[Reporter] | None = None  # started by the first write

    def write(self, row: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
        except OSError as error:
            raise SaveError(error.errno or 0, f"cannot append to {self.path}: {error.strerror or error}; free some "
                                              "disk space (or make the folder writable), then continue the run with "
                                              "--resume (from its latest checkpoint).") from error
        if self.reporters is None:
            self.reporters = make_reporters(self.report_to, self.run_dir, self.run_config)
        for reporter in self.reporters:
            reporter.log(row)

    def close(self) -> None:
        """End the trackers (flush TensorBoard, finish the W&B run); writing again starts new ones."""
        for reporter in self.reporters or []:
            reporter.close()
        self.reporters = None

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        # Lines a crash cut, or bytes that are not UTF-8 (a damaged disk block), are skipped: the rest is still
        # useful, and a resume rewrites the file from the rows kept.
        for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step", 0), int):
                out.append(row)
        return out

    def truncate_after(self, step: int, evals_at_step: int | None = None) -> None:
        """Drop rows logged after ``step`` (a resume replays those steps), rewriting the file atomically; with
        ``evals_at_step``, also the evaluation rows of ``step`` past that many (a run stopped while it was
        finalized had logged its last evaluation after the checkpoint, and evaluates again)."""
        kept, evals = [], 0
        for row in self.rows():
            if row.get("step", 0) > step:
                continue
            if row.get("step", 0) == step and "eval_loss" in row and evals_at_step is not None:
                evals += 1
                if evals > evals_at_step:
                    continue
            kept.append(row)
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


def plot_loss(run_dir: Path) -> Path | None:
    """Draw train loss (and eval loss points) from metrics.jsonl into loss.png; None if nothing to plot."""
    rows = MetricsLog(run_dir).rows()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig = matplotlib_figure.Figure(figsize=(7, 4), dpi=100)  # no pyplot: the caller's matplotlib backend stays as it is
    ax = fig.subplots()
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train loss", linewidth=0.8, alpha=0.4)
        if len(losses) >= 10:  # per-step losses of small batches are noisy: show the trend too
            window = max(2, len(losses) // 10)
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, label=f"train loss (mean of {window} steps)", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = RunFolder(run_dir).plot_file
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
