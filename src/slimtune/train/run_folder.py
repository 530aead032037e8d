"""The run folder of `slimtune train`, named and read in one place.

    runs/<recipe>/
      recipe.yaml        the resolved recipe (written first, its first line RECIPE_MARK)
      metrics.jsonl      one JSON row per logged step and per evaluation
      checkpoints/       step-000040/ … (see slimtune.train.checkpoint)
      adapter/           the final adapter, PEFT's format
      loss.png           the loss curve
      summary.json       written last: the run finished
    runs/.<recipe>.lock  beside the folder, while a run holds it (:class:`RunLock`)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from slimtune.core.files import atomic_write, lock_file
from slimtune.errors import RunFolderBusyError, SaveError
from slimtune.quant import QuantConfig
from slimtune.train.schema import RecipeError


class RunFolder:
    RECIPE = "recipe.yaml"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    ADAPTER = "adapter"
    PLOT = "loss.png"
    SUMMARY = "summary.json"
    TENSORBOARD = "tensorboard"  # training.report_to: [tensorboard]
    WANDB = "wandb"  # training.report_to: [wandb]
    OWN = (RECIPE, METRICS, CHECKPOINTS, ADAPTER, PLOT, SUMMARY, TENSORBOARD, WANDB)
    RECIPE_MARK = "# the resolved recipe of this `slimtune train` run (its folder's mark: keep this line)"
    # the prefix of the empty folder a run makes for a moment to test that the folder is writable: not part of
    # the folder for any rule here (another rank of a distributed run may be testing while this one looks)
    WRITE_PROBE = ".slimtune-write-probe-"

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

    @classmethod
    def is_own(cls, name: str) -> bool:
        """Whether an entry of a run folder is one slimtune writes (or the temporary name it writes it under)."""
        return name in cls.OWN or name.startswith(tuple(f".{n}." for n in cls.OWN))

    def entries(self) -> list[Path]:
        """What the folder holds, without write probes (none for a missing folder)."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if not p.name.startswith(self.WRITE_PROBE)]

    def foreign(self) -> list[str]:
        """The folder's entries slimtune did not write, sorted (none for a missing folder)."""
        return sorted(p.name for p in self.entries() if not self.is_own(p.name))

    def is_run(self) -> bool:
        """Whether the folder holds (the start of) a run, or what a crash left of its first file write, and
        nothing else. A run writes its marked ``recipe.yaml`` first, so a folder of entries with slimtune's names
        but without it (an adapter saved there, the user's own recipe.yaml) is not one: it is never cleared."""
        if not self.path.is_dir():
            return False
        names = [p.name for p in self.entries()]
        if not names or not all(self.is_own(name) for name in names):
            return False
        if self.RECIPE not in names:
            return all(name.startswith(".") for name in names)  # only the temporary file of that first write
        return self.recipe_is_ours()

    def recipe_is_ours(self) -> bool:
        """Whether ``recipe.yaml`` was written by `slimtune train`: its first line is the mark (a run from before the
        mark: a resolved recipe, every section written out, with a metrics log or checkpoints beside it)."""
        try:
            with self.recipe_file.open(encoding="utf-8", errors="replace") as file:
                first = file.readline().rstrip("\n")
        except OSError:
            return False
        if first == self.RECIPE_MARK:
            return True
        resolved = set(self.recipe_dict() or {}) >= {"model", "method", "data", "training", "output"}
        return resolved and (self.metrics_file.is_file() or self.checkpoints.is_dir())

    def write_recipe(self, text: str) -> None:
        """Write the resolved recipe, marked as this run's (see :meth:`is_run`)."""
        atomic_write(self.recipe_file, f"{self.RECIPE_MARK}\n{text}".encode())

    def clear(self) -> None:
        """Delete the run's own entries (``output.overwrite``); refuses a folder holding anything else."""
        if not self.path.is_dir():
            return
        if self.foreign():
            raise RecipeError(self.not_a_run())
        for entry in self.entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def drop_checkpoints(self, save_every: int) -> None:
        """After the summary: with ``training.save_every: 0`` the only checkpoint is the finished training's,
        kept while the run was finalized; the run asked for none, so it goes."""
        if not save_every and self.finished() and self.checkpoints.is_dir():
            shutil.rmtree(self.checkpoints)

    def not_a_run(self) -> str:
        """Why the folder cannot be a run's: what in it slimtune did not write."""
        foreign = self.foreign()
        if foreign:
            return (f"output.dir: {self.path} exists and is not a slimtune run folder (it holds {foreign[:5]}"
                    f"{' ...' if len(foreign) > 5 else ''}, which slimtune did not write); use a new or empty folder.")
        if self.recipe_file.is_file():
            why = (f"its {self.RECIPE} was not written by `slimtune train` (is it your recipe? a run writes its "
                   "resolved recipe under that name)")
        else:
            names = sorted(p.name for p in self.entries())
            why = f"it holds {names[:5]} but no {self.RECIPE}, which a run writes first"
        return (f"output.dir: {self.path} exists and is not a slimtune run folder: {why}; nothing in it is changed. "
                f"Use a new or empty folder (e.g. output.dir={self.path / 'run'}).")

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


def process_rank() -> int:
    """This process's rank in a distributed run (``torch.distributed`` once initialised, else ``$RANK``), 0 alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """One `slimtune train` per run folder: rank 0 holds ``.<run>.lock`` beside the folder while it runs.

    The lock is an exclusive ``flock`` on that file (the kernel drops it when the process dies, however it
    dies), and the file says who holds it: host, pid, the launcher's run id (``TORCHELASTIC_RUN_ID``) and
    restart count, and when it started. A second run is refused with those details. A lock file whose
    ``flock`` is free was left by a process that died: on the same host it is stale and taken over (so is
    one left by an earlier attempt of the same elastic run); one from another host is refused, since this
    host cannot tell whether that run is still going. Only rank 0 locks: the ranks of one distributed run
    share the folder. The file sits beside the run folder, so the folder's own contents stay the run's.
    """

    def __init__(self, run_dir: str | os.PathLike, log: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        real = self.run_dir.resolve()  # one lock however the folder is named (a symbolic link, "..")
        self.path = real.parent / f".{real.name}.lock"
        self.log = log
        self._fd: int | None = None
        self._made: list[Path] = []

    @staticmethod
    def identity() -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT"),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}

    def holder(self) -> dict[str, Any] | None:
        """What the lock file says (None: no file, or empty)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _describe(self, who: dict[str, Any] | None) -> str:
        if not who:
            return "another process"
        run_id = f", launcher run id {who['run_id']}" if who.get("run_id") else ""
        return f"pid {who.get('pid')} on {who.get('host')}{run_id}, since {who.get('started')}"

    def _stale(self, who: dict[str, Any] | None, flock_works: bool) -> bool:
        """Whether a lock file whose flock is free may be taken over (without flock: whether its pid is gone)."""
        me = self.identity()
        if not who:
            return True
        if who.get("host") == me["host"]:
            return flock_works or not pid_alive(who.get("pid"))
        same_run = who.get("run_id") is not None and who.get("run_id") == me["run_id"]
        return same_run and str(who.get("restart")) != str(me["restart"])

    def acquire(self) -> None:
        if process_rank() != 0:
            return
        missing = self.run_dir.parent
        while not missing.exists():
            self._made.append(missing)
            missing = missing.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # e.g. a file where a parent folder should be
            raise SaveError(error.errno, f"cannot create the folder of run {self.run_dir}: {error.strerror} "
                                         f"({error.filename}); choose another output.dir") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise SaveError(error.errno, f"cannot open the lock file {self.path} of run {self.run_dir}: "
                                             f"{error.strerror}; remove what is at that path (no `slimtune train` "
                                             f"makes it a folder), or choose another output.dir") from None
            try:
                taken = lock_file(fd)
            except OSError:
                os.close(fd)
                raise
            if taken is False:
                os.close(fd)
                raise RunFolderBusyError(
                    f"run folder {self.run_dir} is in use by another `slimtune train` ({self._describe(self.holder())})"
                    f"; wait for it to finish or stop it (lock file: {self.path}).")
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: open the new one
        who = self.holder()
        if who and not self._stale(who, flock_works=taken is True):
            os.close(fd)
            raise RunFolderBusyError(
                f"run folder {self.run_dir} is locked by {self._describe(who)}, and this host "
                f"({socket.gethostname()}) cannot tell whether that run is still going. If it is not, delete "
                f"{self.path} and start again.")
        if who:
            self.log(f"taking over the lock of {self._describe(who)}: that run is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.identity()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiting opener then sees another inode and retries
        os.close(self._fd)
        self._fd = None
        for folder in self._made:  # parents this lock created for itself, if nothing else went there
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
