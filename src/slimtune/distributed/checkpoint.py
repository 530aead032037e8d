"""Checkpoints of a distributed run: the training state with ``torch.distributed.checkpoint`` (DCP).

``<run>/checkpoints/step-000040/`` holds, besides what rank 0 writes as in a single-process checkpoint
(``adapter/`` in PEFT's format and ``trainer_state.json``: step, data position, schedule, evaluations, the
recipe's comparable parts, a manifest with the SHA-256 of every other file):

- ``dcp/``: the trainable parameters and the optimizer state, written by every rank for its shards. DCP
  records each tensor's global layout, so a checkpoint loads at any world size (2 → 1, 1 → 2: resharded
  on load) and with either strategy;
- ``rng/rank-NNNNN.json``: each rank's random generators (a rank that did not exist at save time takes
  rank 0's).

The folder appears whole or not at all: rank 0 owns the :func:`~slimtune.core.files.atomic_folder`, the
other ranks write into it, and it is renamed into place only after every rank has finished.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from slimtune.adapter_files import adapter_file_contents
from slimtune.core.files import atomic_folder, inside, remove_folder, write_file
from slimtune.distributed.context import DistContext
from slimtune.distributed.wrap import full_trainable_parameters, unwrap
from slimtune.errors import InvalidFileError
from slimtune.train.checkpoint import (
    ADAPTER_DIR,
    FORMAT,
    STATE_FILE,
    _self_digest,
    decode,
    encode,
    list_checkpoints,
    read_state_file,
    rng_state,
)
from slimtune.train.run_folder import RunFolder

__all__ = ["save_distributed_checkpoint", "load_distributed_checkpoint", "read_distributed_state", "DCP_DIR",
           "world_size_note"]

DCP_DIR = "dcp"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # the frozen base is the recipe's, not the run's


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP saves and loads in place: the trainable parameters themselves (shards under FSDP), by name, and
    the optimizer's state keyed by parameter name. (Not ``get_model_state_dict``: a 4-bit layer's state dict
    uses bitsandbytes' keys such as ``weight.absmax``, which are no module paths.)"""
    inner = unwrap(model)
    params = {name: p.detach() for name, p in inner.named_parameters() if p.requires_grad}
    return {"model": params, "optimizer": get_optimizer_state_dict(inner, optimizer, options=_OPTIONS)}


def _rng_json(state: dict[str, Any]) -> bytes:
    version, internal, gauss = state["python"]
    data = {"python": [version, list(internal), gauss], "torch": state["torch"].tolist()}
    if "cuda" in state:
        data["cuda"] = [t.tolist() for t in state["cuda"]]
    return json.dumps(data).encode()


def _rng_from_json(text: str) -> dict[str, Any]:
    data = json.loads(text)
    version, internal, gauss = data["python"]
    state: dict[str, Any] = {"python": (version, tuple(internal), gauss),
                             "torch": torch.tensor(data["torch"], dtype=torch.uint8)}
    if "cuda" in data:
        state["cuda"] = [torch.tensor(t, dtype=torch.uint8) for t in data["cuda"]]
    return state


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE):
        data = path.read_bytes()
        out[path.relative_to(folder).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return out


def _write_shards(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rng: dict[str, Any],
                  ctx: DistContext) -> None:
    dcp.save(_training_state(model, optimizer), checkpoint_id=tmp / DCP_DIR)
    (tmp / "rng").mkdir(exist_ok=True)
    write_file(tmp / "rng" / f"rank-{ctx.rank:05d}.json", _rng_json(rng))


def save_distributed_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                                scheduler: Any, rng: dict[str, Any], state: dict[str, Any], keep: int,
                                ctx: DistContext, strategy: str) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and keep the newest ``keep``."""
    root = inside(RunFolder(run_dir).path, RunFolder.CHECKPOINTS)
    final = root / f"step-{step:06d}"
    with full_trainable_parameters(model, ctx):
        adapter = adapter_file_contents(unwrap(model)) if ctx.is_main else {}
    if not ctx.is_main:
        tmp = Path(str(ctx.broadcast_object(None)))
        _write_shards(tmp, model, optimizer, rng, ctx)
        ctx.barrier()  # every shard written
        ctx.barrier()  # rank 0 renamed the folder into place
        return final
    root.mkdir(parents=True, exist_ok=True)
    with atomic_folder(final) as tmp:
        ctx.broadcast_object(str(tmp))
        _write_shards(tmp, model, optimizer, rng, ctx)
        (tmp / ADAPTER_DIR).mkdir()
        for name, data in adapter.items():
            write_file(tmp / ADAPTER_DIR / name, data)
        ctx.barrier()
        payload = {"format": FORMAT, **state, "optimizer": {"dcp": DCP_DIR},
                   "scheduler": encode(scheduler.state_dict(), {}, "scheduler"), "rng": {"per_rank": "rng"},
                   "distributed": {"world_size": ctx.world_size, "strategy": strategy}, "files": _files(tmp)}
        payload["checksum"] = _self_digest(payload)
        write_file(tmp / STATE_FILE, (json.dumps(payload, indent=1) + "\n").encode())
    ctx.barrier()
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_folder(old)
    return final


def read_distributed_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a distributed checkpoint, every file it lists checked (size, SHA-256)."""
    payload = read_state_file(path)
    file = path / STATE_FILE
    if not isinstance(payload.get("distributed"), dict):
        raise InvalidFileError(file, "is a single-process checkpoint; resume it without torchrun and without a "
                                     "`distributed` recipe section.", "distributed")
    found = _files(path)
    for name, entry in payload["files"].items():
        if found.get(name) != entry:
            raise InvalidFileError(path / name, "is missing or differs from what was written: the checkpoint is "
                                                "damaged. Delete this step's folder to resume from the one before.",
                                   name)
    return payload


def saved_world_size(path: Path) -> int:
    """How many ranks wrote checkpoint ``path`` (one random-state file each)."""
    return len(list((path / "rng").glob("rank-*.json")))


def world_size_note(path: Path, world_size: int) -> str | None:
    """What a resume on another number of ranks changes: each rank's random stream (dropout masks) is its own, so
    the run continues with other masks than an uninterrupted one (bit-identical only without dropout)."""
    saved = saved_world_size(path)
    if not saved or saved == world_size:
        return None
    return (f"{path.name} was saved by {saved} ranks and resumes on {world_size}: the ranks' random streams (dropout "
            f"masks) differ from an uninterrupted run's from here on, so the result will too unless the method has no "
            f"dropout; resume on {saved} processes for the same adapter as an uninterrupted run.")


def load_distributed_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                                ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and scheduler from ``path`` (collective); return (trainer state, this rank's RNG)."""
    payload = read_distributed_state(path)
    state = _training_state(model, optimizer)
    dcp.load(state, checkpoint_id=path / DCP_DIR)  # in place: into the parameters (their shards) and a fresh state
    set_optimizer_state_dict(unwrap(model), optimizer, state["optimizer"], options=_OPTIONS)
    scheduler.load_state_dict(decode(payload["scheduler"], {}, path / STATE_FILE, "scheduler"))
    own = path / "rng" / f"rank-{ctx.rank:05d}.json"
    rng_file = own if own.is_file() else path / "rng" / "rank-00000.json"
    rng = _rng_from_json(rng_file.read_text(encoding="utf-8")) if rng_file.is_file() else rng_state()
    return payload, rng
