"""Disk full, read-only, two writers: a save that fails midway leaves what was there before, and says so.

ENOSPC and EROFS are raised from the write calls themselves (``os.write``, ``os.fsync``, ``os.mkdir``,
``os.replace``), at every call of an adapter save and of a checkpoint save in turn: the folder afterwards holds
the previous version whole (or, when the failure came after the new one was renamed into place, the new one
whole), nothing half-written is left beside it, and the error is a :class:`~slimtune.errors.SaveError` saying
what failed and what to do. Then the same through `slimtune train`, and two `slimtune train` on one run folder.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sys

import pytest
import torch
from crash import report
from run_helpers import tiny_recipe, write_recipe
from tiny_models import tiny_llama

import slimtune
from slimtune.cli import main
from slimtune.errors import RunFolderBusyError, SaveError
from slimtune.train.batching import BatchIterator
from slimtune.train.checkpoint import list_checkpoints, read_checkpoint, rng_state
from slimtune.train.recipe import TrainingSection
from slimtune.train.run_folder import RunLock
from slimtune.train.trainer import Trainer

WRITE_CALLS = ("write", "fsync", "mkdir", "replace")
ERRORS = {errno.ENOSPC: "free some disk space", errno.EROFS: "read-only"}


class Injector:
    """Counts the write calls; raises ``OSError(code)`` from the ``fail_at``-th one (1-based; 0: never), only
    while a function named ``inside`` is on the stack (None: anywhere) whose local ``step`` is ``step`` (if given)."""

    def __init__(self, monkeypatch, fail_at: int = 0, code: int = errno.ENOSPC, inside: str | None = None,
                 step: int | None = None):
        self.calls, self.fail_at, self.code, self.inside, self.step, self.failed = 0, fail_at, code, inside, step, None
        for name in WRITE_CALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _in_scope(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_name == self.inside:
                return self.step is None or frame.f_locals.get("step") == self.step
            frame = frame.f_back
        return False

    def _wrap(self, name, original):
        def wrapped(*args, **kwargs):
            if self.inside is None or self._in_scope():
                self.calls += 1
                if self.calls == self.fail_at:
                    self.failed = name
                    raise OSError(self.code, os.strerror(self.code))
            return original(*args, **kwargs)
        return wrapped


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def count_calls(monkeypatch, save) -> int:
    with monkeypatch.context() as patch:
        injector = Injector(patch)
        save()
    return injector.calls


# ---- an adapter save, failed at each of its write calls ------------------------------------------------------
def test_adapter_save_failing_at_any_write_call_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))
    pristine = tmp_path / "pristine" / "adapter"
    slimtune.save_adapter(model, pristine)
    old = folder_bytes(pristine)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def fresh(name: str):
        folder = tmp_path / name / "adapter"
        shutil.copytree(pristine, folder)
        return folder

    probe = fresh("probe")
    calls = count_calls(monkeypatch, lambda: slimtune.save_adapter(model, probe))
    new = folder_bytes(probe)
    assert calls >= 10 and new != old
    outcomes = {"old": 0, "new": 0}
    for at in range(1, calls + 1):
        for code, advice in ERRORS.items():
            folder = fresh(f"try-{at}-{code}")
            with monkeypatch.context() as patch:
                injector = Injector(patch, at, code)
                try:
                    slimtune.save_adapter(model, folder)
                except SaveError as error:
                    message = str(error)
                    assert error.errno == code and str(folder) in message and advice in message, message
                    assert os.strerror(code) in message, message
                else:  # the failed call was one a save may survive (mkdir of a folder that exists)
                    message = None
                    assert injector.failed == "mkdir", (at, injector.failed)
            now = folder_bytes(folder)
            assert now in (old, new), f"{injector.failed} #{at}: a mix of two adapters"
            outcomes["old" if now == old else "new"] += 1
            if message is not None and now == old:
                assert "The previous adapter is intact" in message, message
            elif message is not None:  # (the sync after the rename failed: the message says what is there)
                assert "The new adapter is in place" in message and "previous" not in message, message
            assert leftovers(folder.parent) == [], f"{injector.failed} #{at}: leftovers"
    assert outcomes["old"] > 0
    report({"suite": "save_failures", "kind": "adapter save", "write_calls": calls, "failures_injected": 2 * calls,
            "previous_intact": outcomes["old"], "new_complete": outcomes["new"]})


# ---- a checkpoint save, failed at each of its write calls ---------------------------------------------------
def _rows(n: int = 8) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(3, 128, (6 + i % 3,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_checkpoint_save_failing_at_any_write_call_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = slimtune.add_adapter(tiny_llama(seed=0).train(), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    settings = TrainingSection(max_steps=2, batch_size=2, learning_rate=1e-2, save_every=2, keep_checkpoints=1,
                               optim="adamw_8bit")
    rows = _rows()
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    trainer = Trainer(model, BatchIterator(rows, 2, seed=0, pad_id=0), rows[:2], settings, pristine,
                      torch.device("cpu"), 0, show_progress=False, log=lambda _: None)
    assert trainer.train()  # step 2, the last: its checkpoint is the finished training's
    before = folder_bytes(pristine / "checkpoints")
    assert {name.split("/")[0] for name in before} == {"step-000002"}
    trainer.state.step, trainer.total_steps = 3, 4  # the next one; keep_checkpoints=1: it deletes step 2
    rng = rng_state()

    def fresh(name: str):
        run = tmp_path / name
        shutil.copytree(pristine / "checkpoints", run / "checkpoints")
        trainer.run_dir = run
        return run / "checkpoints"

    probe = fresh("probe")
    calls = count_calls(monkeypatch, lambda: trainer.save(rng))
    after = folder_bytes(probe)
    assert calls >= 10 and {name.split("/")[0] for name in after} == {"step-000003"}
    outcomes = {"previous_intact": 0, "new_complete": 0}
    for at in range(1, calls + 1):
        code = list(ERRORS)[at % 2]
        root = fresh(f"try-{at}")
        with monkeypatch.context() as patch:
            injector = Injector(patch, at, code)
            try:
                trainer.save(rng)
            except SaveError as error:
                message = str(error)
                assert error.errno == code and os.strerror(code) in message and "--resume" in message, message
            else:  # the failed call was one a save may survive (mkdir of a folder that exists)
                message = None
                assert injector.failed == "mkdir", (at, injector.failed)
        done = [p.name for p in list_checkpoints(root.parent)]
        assert done in (["step-000002"], ["step-000003"], ["step-000002", "step-000003"]), (at, injector.failed)
        if message is not None:
            assert done[-1] in message, message  # names the checkpoint to resume from
        now = folder_bytes(root)
        for name, data in now.items():  # each checkpoint present is one of the two, whole
            assert data == (before if name.startswith("step-000002/") else after)[name], (at, injector.failed, name)
        for step in done:
            assert {n for n in now if n.startswith(step)} == {n for n in {**before, **after} if n.startswith(step)}
            read_checkpoint(root / step)  # and checks out
        assert leftovers(root) == [], (at, injector.failed)
        outcomes["previous_intact" if "step-000002" in done else "new_complete"] += 1
    report({"suite": "save_failures", "kind": "checkpoint save", "write_calls": calls, "failures_injected": calls,
            **outcomes})


# ---- through `slimtune train` ---------------------------------------------------------------------------------
def _recipe(tmp_path, name: str):
    recipe = tiny_recipe(tmp_path, quantized=False, training={"max_steps": 6, "save_every": 2, "keep_checkpoints": 1},
                         demo={"enabled": False}, output={"dir": str(tmp_path / name), "plot": False})
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def train(recipe, *extra: str) -> int:
    return main(["train", str(recipe), "--no-progress", *extra])


def test_slimtune_train_disk_full_then_read_only_then_resumes_to_the_same_adapter(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        counter = Injector(patch, inside="save_checkpoint", step=4)
        assert train(_recipe(tmp_path, "straight")) == 0
    expected = folder_bytes(tmp_path / "straight" / "adapter")
    recipe, run = _recipe(tmp_path, "run"), tmp_path / "run"
    capsys.readouterr()

    with monkeypatch.context() as patch:  # the disk fills up halfway through the checkpoint of step 4
        Injector(patch, counter.calls // 3, errno.ENOSPC, inside="save_checkpoint", step=4)
        assert train(recipe) == 2
    error = capsys.readouterr().err
    assert f"checkpoint at step 4: cannot write {run / 'checkpoints' / 'step-000004'}: No space left on device; " \
           "free some disk space" in error, error
    assert "The latest complete checkpoint is step-000002: once fixed, resume from it with --resume" in error, error
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"] and leftovers(run / "checkpoints") == []
    read_checkpoint(run / "checkpoints" / "step-000002")

    with monkeypatch.context() as patch:  # resumed, the disk turns read-only during the final adapter save
        Injector(patch, 4, errno.EROFS, inside="save_adapter")
        assert train(recipe, "--resume") == 2
    error = capsys.readouterr().err
    assert f"cannot create adapter folder {run / 'adapter'}" in error and "read-only" in error, error
    assert not (run / "adapter").exists() and not (run / "summary.json").exists() and leftovers(run) == []
    assert [p.name for p in list_checkpoints(run)] == ["step-000006"]  # the finished training's: nothing to redo

    assert train(recipe, "--resume") == 0
    assert folder_bytes(run / "adapter") == expected
    summary = json.loads((run / "summary.json").read_text())  # this session's wall time is said to be that
    assert summary["resumed_at_step"] == 6 and "since the resume at step 6" in capsys.readouterr().out
    assert json.loads((tmp_path / "straight" / "summary.json").read_text())["resumed_at_step"] is None
    report({"suite": "save_failures", "kind": "slimtune train", "failures": 2, "resumed_identical": 1})


# ---- two writers ----------------------------------------------------------------------------------------------
FORK = multiprocessing.get_context("fork")


def _hold_lock(run_dir: str, ready, release) -> None:
    os.environ["TORCHELASTIC_RUN_ID"] = "job-7"
    lock = RunLock(run_dir, log=lambda _: None)
    lock.acquire()
    ready.set()
    release.wait(60)
    os._exit(0)


def test_a_second_slimtune_train_on_the_same_run_folder_is_refused_then_takes_over_a_dead_ones_lock(
        tmp_path, capsys):
    recipe, run = _recipe(tmp_path, "run"), tmp_path / "run"
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(str(run), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        assert train(recipe) == 2
        error = capsys.readouterr().err
        assert f"run folder {run} is in use by another `slimtune train` (pid {holder.pid} on {socket.gethostname()}" \
               ", launcher run id job-7" in error, error
        assert "wait for it to finish or stop it" in error and not run.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the lock file stays, its flock goes
        holder.join()
    lock_file = tmp_path / ".run.lock"
    assert json.loads(lock_file.read_text())["pid"] == holder.pid
    assert train(recipe) == 0
    out = capsys.readouterr().out
    assert f"taking over the lock of pid {holder.pid}" in out and "no longer running" in out
    assert not lock_file.exists() and (run / "summary.json").is_file()


def _write_lock(tmp_path, **who) -> RunLock:
    lock = RunLock(tmp_path / "run", log=lambda _: None)
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "run_id": None, "restart": None,
                                     "started": "earlier", **who}))
    return lock


def test_the_lock_records_its_holder_and_is_rank_zeros(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-9")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with RunLock(tmp_path / "run") as lock:
        who = json.loads(lock.path.read_text())
        assert who["host"] == socket.gethostname() and who["pid"] == os.getpid()
        assert who["run_id"] == "job-9" and who["restart"] == "0"
        with pytest.raises(RunFolderBusyError, match=r"in use by another `slimtune train` \(pid \d+ on .*job-9"):
            RunLock(tmp_path / "run").acquire()  # a second open file description: its flock is refused
        (tmp_path / "link").symlink_to(tmp_path / "run")
        for alias in (tmp_path / "link", tmp_path / "run" / ".." / "run"):  # the same folder by another name
            with pytest.raises(RunFolderBusyError, match="in use by another"):
                RunLock(alias).acquire()
    assert not lock.path.exists()
    monkeypatch.setenv("RANK", "1")  # other ranks of a distributed run share rank 0's folder and lock
    with RunLock(tmp_path / "run") as other:
        assert not other.path.exists()


def test_a_stale_lock_from_another_host_is_refused_and_an_earlier_attempt_of_the_same_job_taken_over(
        tmp_path, monkeypatch):
    lock = _write_lock(tmp_path, host="elsewhere", pid=os.getpid())
    with pytest.raises(RunFolderBusyError, match=r"locked by pid \d+ on elsewhere.*cannot tell whether that run "
                                                 r"is still going\. If it is not, delete .*\.run\.lock"):
        lock.acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    lock = _write_lock(tmp_path, host="elsewhere", run_id="job-3", restart="0")
    lines = []
    lock.log = lines.append
    with lock:
        assert json.loads(lock.path.read_text())["restart"] == "1"
    assert lines and "taking over the lock of pid 1 on elsewhere, launcher run id job-3" in lines[0]


def test_a_lock_path_that_cannot_be_opened_or_a_file_in_the_way_is_a_clear_error(tmp_path):
    (tmp_path / ".run.lock").mkdir()  # something else made a folder where the lock file goes
    with pytest.raises(SaveError, match=r"cannot open the lock file .*\.run\.lock of run .*: Is a directory; remove"):
        RunLock(tmp_path / "run").acquire()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SaveError, match=r"cannot create the folder of run .*a-file/sub/run: .*choose another output"):
        RunLock(tmp_path / "a-file" / "sub" / "run").acquire()
