"""Resumable checkpoints: safetensors + JSON folders, written as one unit, checked whole before use.

``<run>/checkpoints/step-000040/`` holds:

- ``adapter/``: the adapter in PEFT's format (usable on its own, e.g. with `slimtune generate`);
- ``tensors.safetensors``: every tensor a resume needs — the trainable parameters (``model/<name>``), the
  tensors methods change in place beyond them (``method/<adapter>/<name>``: Delta-LoRA's base weights and
  step counter, :meth:`slimtune.methods.contract.Method.checkpoint_tensors`), the optimizer's state
  (``optimizer/…``: AdamW moments, 8-bit codes and scales) and the RNG states (``rng/…``);
- ``trainer_state.json``: step, tokens, data position, evaluations, elapsed time, the recipe's comparable
  parts, the optimizer's and scheduler's settings and Python's RNG state (tensors referenced by name), the
  size and SHA-256 of every other file, and a SHA-256 of its own content.

Nothing is unpickled: a checkpoint is read with the validating safetensors reader and ``json``. Before a
resume changes anything, every file is checked against the manifest (a changed, cut or missing file is an
:class:`~slimtune.errors.InvalidFileError` naming it) and every tensor against the model and optimizer
(names, shapes, dtypes), so a failed resume leaves the model as it was. Folders are written with
:func:`slimtune.core.files.atomic_folder` and deleted with :func:`slimtune.core.files.remove_folder`, so a
crash at any instant leaves complete checkpoints only (plus leftovers that the next listing cleans up).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from slimtune.adapter_files import adapter_file_contents
from slimtune.core.files import atomic_folder, inside, leftover_targets, recover_folder, remove_folder, write_file
from slimtune.core.state import find_state
from slimtune.core.tensor_files import read_tensors
from slimtune.errors import InvalidFileError, SaveError
from slimtune.methods import method_for
from slimtune.train.run_folder import RunFolder

STATE_FILE = "trainer_state.json"
DELETE_STEP = "Delete this step's folder to resume from the one before."
TENSORS_FILE = "tensors.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "slimtune-checkpoint/2"
STEP_NAME = re.compile(r"^step-(\d{6,})$")
# What trainer_state.json must hold, and of which type (checked before anything is restored).
STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int, "tokens": int, "train_seconds": (int, float), "data": dict, "evals": list, "total_steps": int,
    "config": dict, "optimizer": dict, "scheduler": dict, "rng": dict, "files": dict,
}


# ---- RNG -------------------------------------------------------------------------------------------------
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


# ---- state dicts as JSON + named tensors -------------------------------------------------------------------
def encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """``value`` (a state dict: dicts, lists, tuples, numbers, strings, tensors) as JSON, its tensors moved to
    ``tensors`` under ``key/…``; tuples and dicts with other than plain string keys are tagged."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors, f"{key}/{k}") for k, v in value.items()}
        return {"__items__": [[encode(k, tensors, f"{key}/k{i}"), encode(v, tensors, f"{key}/{k}")]
                              for i, (k, v) in enumerate(value.items())]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {key}")


def decode(value: Any, tensors: dict[str, torch.Tensor], file: Path, where: str) -> Any:
    """The inverse of :func:`encode`; a malformed entry is an :class:`InvalidFileError` naming ``where``."""
    if isinstance(value, list):
        return [decode(v, tensors, file, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in ("__tensor__", "__tuple__", "__items__"):
        tag, inner = next(iter(value.items()))
        if tag == "__tensor__":
            if not isinstance(inner, str) or inner not in tensors:
                raise InvalidFileError(file, f"{where} refers to tensor {inner!r}, which {TENSORS_FILE} does not hold.",
                                       where)
            return tensors[inner]
        if tag == "__tuple__" and isinstance(inner, list):
            return tuple(decode(v, tensors, file, f"{where}[{i}]") for i, v in enumerate(inner))
        if tag == "__items__" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
            items = [(decode(k, tensors, file, where), decode(v, tensors, file, f"{where}[{k!r}]")) for k, v in inner]
            if not all(isinstance(k, (str, int, float, bool)) or k is None for k, _ in items):
                raise InvalidFileError(file, f"{where} has a key that is not a number or string.", where)
            return dict(items)
        raise InvalidFileError(file, f"{where}: malformed {tag} entry {inner!r:.80}.", where)
    return {k: decode(v, tensors, file, f"{where}.{k}") for k, v in value.items()}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _self_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of trainer_state.json's content without its own ``checksum`` field."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    return _digest(json.dumps(body, sort_keys=True).encode())


# ---- saving ----------------------------------------------------------------------------------------------
def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def method_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors every adapter's method changes in place beyond the trainable parameters."""
    state = find_state(model)
    if state is None:
        return {}
    return {f"{adapter}/{key}": tensor for adapter, config in state.configs.items()
            for key, tensor in method_for(config).checkpoint_tensors(model, adapter, state).items()}


def checkpoint_contents(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rng: dict[str, Any],
                        state: dict[str, Any]) -> dict[str, bytes]:
    """Every file of a checkpoint (relative path → bytes); ``trainer_state.json`` lists the others."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in trainable_tensors(model).items():
        encode(tensor, tensors, f"model/{name}")
    for name, tensor in method_tensors(model).items():
        encode(tensor, tensors, f"method/{name}")
    payload = {"format": FORMAT, **state,
               "optimizer": encode(optimizer.state_dict(), tensors, "optimizer"),
               "scheduler": encode(scheduler.state_dict(), tensors, "scheduler"),
               "rng": encode(rng, tensors, "rng")}
    files = {f"{ADAPTER_DIR}/{name}": data for name, data in adapter_file_contents(model).items()}
    files[TENSORS_FILE] = save(tensors, metadata={"format": "pt"})
    payload["files"] = {name: {"bytes": len(data), "sha256": _digest(data)} for name, data in sorted(files.items())}
    payload["checksum"] = _self_digest(payload)
    files[STATE_FILE] = (json.dumps(payload, indent=1) + "\n").encode()
    return files


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rng: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` (RNG ``rng`` captured at the step boundary) and keep the newest ``keep``."""
    root = inside(RunFolder(run_dir).path, RunFolder.CHECKPOINTS)
    final = root / f"step-{step:06d}"
    contents = checkpoint_contents(model, optimizer, scheduler, rng, state)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_folder(final) as tmp:  # re-saving a step after a resume replaces it whole
            (tmp / ADAPTER_DIR).mkdir()
            for name, data in contents.items():
                write_file(tmp / name, data)
    except OSError as error:
        latest = latest_checkpoint(run_dir)
        done = f"The latest complete checkpoint is {latest.name}: once fixed, resume from it with --resume." \
            if latest else "No checkpoint was completed yet: once fixed, start again with output.overwrite=true."
        what = error.strerror if isinstance(error, SaveError) else f"cannot write {final}: {error.strerror or error}."
        raise SaveError(error.errno or 0, f"checkpoint at step {step}: {what} {done}") from error
    for old in list_checkpoints(run_dir)[:-keep]:
        try:
            remove_folder(old)
        except OSError as error:
            raise SaveError(error.errno or 0, f"checkpoint at step {step} is complete ({final.name}), but deleting the "
                                              f"older {old.name} failed: {error.strerror or error}; fix the folder, "
                                              "then resume with --resume.") from error
    return final


# ---- finding ---------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a crash's leftovers are repaired first)."""
    root = RunFolder(run_dir).checkpoints
    if not root.is_dir() or root.is_symlink():
        return []
    for target in leftover_targets(root):
        recover_folder(target)
    done = [p for p in root.iterdir() if STEP_NAME.match(p.name) and p.is_dir() and not p.is_symlink()
            and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def check_no_incomplete_checkpoints(run_dir: Path) -> None:
    """With no complete checkpoint in ``run_dir``: raise what is wrong with its newest step folder, if it has one
    (incomplete, or an earlier slimtune's), rather than let a resume treat the run as never checkpointed."""
    root = RunFolder(run_dir).checkpoints
    steps = sorted((p for p in root.iterdir() if STEP_NAME.match(p.name) and p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1])) if root.is_dir() and not root.is_symlink() else []
    if steps:
        read_state_file(steps[-1])


# ---- loading ---------------------------------------------------------------------------------------------
def read_state_file(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint folder ``path``, checked (format, fields, its own checksum)."""
    file = path / STATE_FILE
    if not file.is_file():
        old = [n for n in ("optimizer.pt", "rng.pt") if (path / n).is_file()]
        if old:
            raise InvalidFileError(path, f"an earlier slimtune's checkpoint ({', '.join(old)}: pickles, which this "
                                         "version does not read); start the run again with output.overwrite=true.")
        raise InvalidFileError(file, "is missing; the checkpoint is incomplete. Delete this step's folder to resume "
                                     "from the one before.", STATE_FILE)
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InvalidFileError(file, f"is not readable JSON ({error}); the checkpoint is damaged. "
                                     f"{DELETE_STEP}") from None
    if not isinstance(payload, dict):
        raise InvalidFileError(file, f"holds a JSON {type(payload).__name__}, not an object; the checkpoint is "
                                     f"damaged. {DELETE_STEP}")
    if payload.get("format") != FORMAT:
        raise InvalidFileError(file, f"format {payload.get('format')!r} is not {FORMAT!r}: written by another "
                                     "slimtune version; start the run again with output.overwrite=true.", "format")
    for key, kind in STATE_FIELDS.items():
        if key not in payload:
            raise InvalidFileError(file, f"the field {key!r} is missing; the checkpoint is damaged. {DELETE_STEP}", key)
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            raise InvalidFileError(file, f"{key}={payload[key]!r:.80} has the wrong type; the checkpoint is damaged. "
                                         f"{DELETE_STEP}", key)
    if payload.get("checksum") != _self_digest(payload):
        raise InvalidFileError(file, "checksum does not match its content: the file was changed after it was "
                                     "written; delete this step's folder to resume from the one before.", "checksum")
    _check_values(file, payload)
    return payload


def _check_values(file: Path, payload: dict[str, Any]) -> None:
    """The counters and the evaluation history in range: a resume trusts them for the steps left to train and
    for the run's report."""
    step, total = payload["step"], payload["total_steps"]
    problem = None
    if not 1 <= total or not 0 <= step <= total:
        problem = f"step={step!r} of total_steps={total!r} is out of range"
    elif payload["tokens"] < 0 or not 0 <= payload["train_seconds"] < math.inf:
        problem = f"tokens={payload['tokens']!r} or train_seconds={payload['train_seconds']!r} is out of range"
    else:
        for i, row in enumerate(payload["evals"]):
            ok = isinstance(row, dict) and set(row) == {"step", "eval_loss"} and type(row["step"]) is int \
                and 0 <= row["step"] <= step and type(row["eval_loss"]) in (int, float)
            if not ok:
                problem = f"evals[{i}]={row!r:.80} is not an evaluation of a step up to {step}"
                break
    if problem:
        raise InvalidFileError(file, f"{problem}; the checkpoint is damaged. Delete this step's folder to resume "
                                     "from the one before.")


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The recipe parts a checkpoint was made with (read without loading its tensors)."""
    return read_state_file(path)["config"]


def _read_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists: present, same size, same SHA-256."""
    file = path / STATE_FILE
    for name, entry in manifest.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise InvalidFileError(file, f"files[{name!r}] is malformed.", name)
        try:
            target = inside(path, name)
            data = target.read_bytes()
        except (OSError, ValueError) as error:
            raise InvalidFileError(path / str(name), f"cannot be read ({error}); the checkpoint is incomplete. "
                                                     "Delete this step's folder to resume from the one before.",
                                   name) from None
        if len(data) != entry.get("bytes") or _digest(data) != entry["sha256"]:
            raise InvalidFileError(target, f"differs from what was written ({len(data)} bytes, expected "
                                           f"{entry.get('bytes')}; SHA-256 mismatch): the checkpoint is damaged. "
                                           "Delete this step's folder to resume from the one before.", name)
    for required in (TENSORS_FILE, f"{ADAPTER_DIR}/adapter_config.json"):
        if required not in manifest:
            raise InvalidFileError(file, f"files does not list {required}; the checkpoint is damaged. {DELETE_STEP}",
                                   "files")


@dataclass
class Checkpoint:
    """A checkpoint read and checked, not yet applied: :meth:`apply` restores it into a model."""

    path: Path
    state: dict[str, Any]  # trainer_state.json, tensors decoded
    model: dict[str, torch.Tensor]
    method: dict[str, torch.Tensor]

    def _check(self, target: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], what: str) -> None:
        file = self.path / TENSORS_FILE
        missing, extra = sorted(set(target) - set(stored)), sorted(set(stored) - set(target))
        if missing or extra:
            raise InvalidFileError(file, f"does not match this model's {what} (missing {missing[:3]}, unexpected "
                                         f"{extra[:3]}); was the recipe's method changed?", (missing + extra)[0])
        for name, tensor in stored.items():
            live = target[name]
            if tensor.shape != live.shape or tensor.dtype != live.dtype:
                raise InvalidFileError(file, f"{name!r} is {tensor.dtype} {tuple(tensor.shape)}, the model's is "
                                             f"{live.dtype} {tuple(live.shape)}.", name)

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        file, saved = self.path / STATE_FILE, self.state["optimizer"]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not isinstance(saved.get("state"), dict) or len(groups) != len(
                optimizer.param_groups) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                   and len(g["params"]) == len(mine["params"])
                                                   for g, mine in zip(groups, optimizer.param_groups)):
            raise InvalidFileError(file, "optimizer: its parameter groups do not match this run's optimizer.",
                                   "optimizer")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, values in saved["state"].items():
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(values, dict):
                raise InvalidFileError(file, f"optimizer.state has an entry {index!r} for no parameter.", "optimizer")
            for key, value in values.items():
                size_like = key.endswith("absmax") or key == "step"
                if isinstance(value, torch.Tensor) and not size_like and value.shape != params[index].shape:
                    raise InvalidFileError(file, f"optimizer.state[{index}].{key} has shape {tuple(value.shape)}, "
                                                 f"its parameter {tuple(params[index].shape)}.", key)

    def _drop_empty_groups(self, live_groups: int) -> None:
        """Checkpoints of earlier slimtune versions hold an empty weight-decay group when every trainable parameter
        is a vector (VeRA, BitFit, norms), a group the optimizer now leaves out: drop such groups, and the
        scheduler's entries for them, when they are what tells the two apart."""
        saved, scheduler = self.state["optimizer"], self.state["scheduler"]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or len(groups) <= live_groups or not isinstance(scheduler, dict):
            return
        empty = [i for i, g in enumerate(groups) if isinstance(g, dict) and g.get("params") == []]
        if len(groups) - len(empty) != live_groups:
            return
        saved["param_groups"] = [g for i, g in enumerate(groups) if i not in empty]
        for key, value in scheduler.items():  # per-group lists (base_lrs, _last_lr, a LambdaLR's lr_lambdas)
            if isinstance(value, list) and len(value) == len(groups):
                scheduler[key] = [v for i, v in enumerate(value) if i not in empty]

    def _check_rng(self) -> None:
        file, rng = self.path / STATE_FILE, self.state["rng"]
        python = rng.get("python")
        ok = isinstance(python, tuple) and len(python) == 3 and isinstance(python[1], tuple) and all(
            type(v) is int for v in python[1])
        torch_state = rng.get("torch")
        if not ok or not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8 or \
                torch_state.shape != torch.get_rng_state().shape:
            raise InvalidFileError(file, "rng: not the random generators' state this slimtune saves.", "rng")

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
        """Check everything against ``model``/``optimizer``/``scheduler``, then restore them; return the RNG state
        (set it with :func:`set_rng_state` when the run continues). Nothing changes if a check fails."""
        self._check(trainable_tensors(model), self.model, "trainable parameters")
        live_method = method_tensors(model)
        self._check(live_method, self.method, "method state")
        self._drop_empty_groups(len(optimizer.param_groups))
        self._check_optimizer(optimizer)
        file, scheduler_state = self.path / STATE_FILE, self.state["scheduler"]
        if set(scheduler_state) != set(scheduler.state_dict()):
            raise InvalidFileError(file, f"scheduler has keys {sorted(scheduler_state)}, this run's scheduler "
                                         f"{sorted(scheduler.state_dict())}.", "scheduler")
        _check_kinds(file, scheduler_state, scheduler.state_dict(), "scheduler")
        for i, (group, mine) in enumerate(zip(self.state["optimizer"]["param_groups"], optimizer.param_groups)):
            _check_kinds(file, {k: v for k, v in group.items() if k != "params"},
                         {k: v for k, v in mine.items() if k != "params"}, f"optimizer.param_groups[{i}]")
        self._check_rng()
        before = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))
        try:
            optimizer.load_state_dict(self.state["optimizer"])
            scheduler.load_state_dict(scheduler_state)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
            optimizer.load_state_dict(before[0])  # as they were: a failed resume changes nothing
            scheduler.load_state_dict(before[1])
            raise InvalidFileError(file, f"optimizer/scheduler state does not load ({error}).", "optimizer") from None
        params = trainable_tensors(model)
        with torch.no_grad():
            for name, value in self.model.items():
                params[name].copy_(value)
            for name, value in self.method.items():
                live_method[name].copy_(value)
        return self.state["rng"]


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype}"
    return "sequence" if isinstance(value, (list, tuple)) else type(value).__name__


def _check_kinds(file: Path, saved: Any, live: Any, where: str) -> None:
    """``saved`` has the structure of ``live`` (keys, lengths, and leaves of the same kind): settings that would
    load and then fail at the next step (a learning rate that is a string) are refused before anything changes."""
    if isinstance(live, dict) and isinstance(saved, dict):
        if set(saved) != set(live):
            raise InvalidFileError(file, f"{where} has keys {sorted(map(str, saved))}, this run's "
                                         f"{sorted(map(str, live))}.", where)
        for key, value in live.items():
            _check_kinds(file, saved[key], value, f"{where}.{key}")
    elif isinstance(live, (list, tuple)) and isinstance(saved, (list, tuple)):
        if len(saved) != len(live):
            raise InvalidFileError(file, f"{where} has {len(saved)} entries, this run's {len(live)}.", where)
        for i, (a, b) in enumerate(zip(saved, live)):
            _check_kinds(file, a, b, f"{where}[{i}]")
    elif _kind(saved) != _kind(live) and not callable(live):
        raise InvalidFileError(file, f"{where}={saved!r:.60} is a {_kind(saved)}, this run's is a {_kind(live)}.",
                               where)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read checkpoint folder ``path`` and check every file (see the module docstring); change nothing."""
    path = Path(path)
    payload = read_state_file(path)
    if isinstance(payload.get("distributed"), dict):  # (its tensors are torch.distributed.checkpoint's files)
        raise ValueError(f"checkpoint {path} was written by a distributed run ({payload['distributed']}); resume it "
                         "as one: `slimtune train RECIPE --resume --nproc-per-node N` (any N, 1 included), or give "
                         "the recipe its distributed section.")
    _read_files(path, payload["files"])
    tensors = read_tensors(path / TENSORS_FILE)
    file = path / STATE_FILE
    state = {k: v for k, v in payload.items() if k not in ("optimizer", "scheduler", "rng")}
    for key in ("optimizer", "scheduler", "rng"):
        state[key] = decode(payload[key], tensors, file, key)
    model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    method = {k.removeprefix("method/"): v for k, v in tensors.items() if k.startswith("method/")}
    return Checkpoint(path, state, model, method)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, method state, optimizer and scheduler in place; return (trainer state, RNG state)."""
    checkpoint = read_checkpoint(path)
    rng = checkpoint.apply(model, optimizer, scheduler)
    return checkpoint.state, rng
