"""Adapters on disk in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: the module path prefixed with ``base_model.model.`` and without the adapter name
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Files are written to a
temporary name and renamed, so an interrupted save never leaves a half-written adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from slimtune.config import MethodConfig, config_from_dict
from slimtune.inject import bias_names, get_state, inject, remove_adapter, saved_modules, tuner_layers

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of one adapter, keyed as PEFT keys them on disk."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}.")
    config = state.configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner_layers(model):
        if adapter_name in layer.adapter_names:
            out.update({f"{PEFT_PREFIX}{name}.{k}": v for k, v in layer.adapter_tensors(adapter_name).items()})
    prefix = getattr(config, "saved_modules_prefix", PEFT_PREFIX)  # PEFT's prompt methods use "base_model."
    for name, module in saved_modules(model):
        if adapter_name in module.adapter_names:
            out.update({f"{prefix}{name}.{k}": v for k, v in module.adapter_tensors(adapter_name).items()})
    out.update({PEFT_PREFIX + k: v for k, v in _bias_tensors(model, getattr(config, "bias", "none")).items()})
    custom = getattr(config, "adapter_tensors", None)
    if custom:
        out.update(custom(model, adapter_name))
    return out


def _bias_tensors(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in bias_names(model, {mode})}


def serialize_adapter(model: nn.Module, adapter_name: str = "default") -> bytes:
    """The adapter's safetensors file content (also used to report its size on disk)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, adapter_name).items()}
    return save(tensors, metadata={"format": "pt"})


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write one adapter to the folder ``path`` in PEFT's format and return the folder."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(state.configs)}.")
    config = state.configs[adapter_name]
    # LoRA variants PEFT knows as plain LoRA (LoRA-FA, Delta-LoRA, LoRA+) export a "LORA" config.
    data = config.to_peft_dict() if hasattr(config, "to_peft_dict") else config.to_dict()
    data["inference_mode"] = True
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    data["base_model_name_or_path"] = name_or_path or None
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create adapter folder {folder}: {err.strerror}; choose a writable path.") from err
    atomic_write(folder / WEIGHTS_NAME, serialize_adapter(model, adapter_name))
    atomic_write(folder / CONFIG_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return folder


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OSError(f"cannot write to {path.parent}: {err.strerror}; choose a writable output folder.") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` whole, on any
    error it is removed and ``final`` stays as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_config(path: str | os.PathLike) -> MethodConfig:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist; pass the folder written by save_adapter.")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the adapter is corrupt, save it again.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object, found {type(data).__name__}.")
    return config_from_dict(data)


def read_adapter_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    folder = Path(path)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickle_file = folder / PICKLE_NAME
        if not pickle_file.is_file():
            raise FileNotFoundError(f"{weights} is missing; the adapter folder has no weights.")
        if not allow_pickle:
            raise ValueError(
                f"refusing to load {pickle_file}: it is a pickle file, and unpickling can run arbitrary code. "
                "Re-save the adapter as safetensors (PEFT: save_pretrained(..., safe_serialization=True)), or "
                "pass allow_pickle=True if you trust its source."
            )
        return torch.load(pickle_file, map_location="cpu", weights_only=True)
    try:
        return load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file ({err}); the adapter is corrupt.") from err


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_pickle: bool = False,
    activate: bool = True,
) -> nn.Module:
    """Add the adapter saved in ``path`` (by slimtune or HF PEFT) to ``model`` in place.

    On any mismatch (missing keys, unexpected keys, wrong shapes) the model is left as it was.
    The adapter is frozen unless ``is_trainable``.
    """
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path, allow_pickle)
    inject(model, config, adapter_name, activate=activate)
    try:
        live = adapter_tensors(model, adapter_name)
        _copy_checked(live, tensors, model, path)
    except BaseException:
        remove_adapter(model, adapter_name)
        raise
    if not is_trainable:
        for tensor in live.values():
            tensor.requires_grad_(False)
    return model


def _copy_checked(live: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], model: nn.Module, path) -> None:
    params = {PEFT_PREFIX + n: p for n, p in model.named_parameters()}
    resolved = {}
    for key, value in stored.items():
        target_key = key if key in live or key in params else PEFT_PREFIX + key
        target = live.get(target_key, params.get(target_key))
        if target is None:
            raise ValueError(f"{path}: tensor {key!r} does not belong to any module of this model; "
                             "was the adapter trained on another architecture?")
        if target.shape != value.shape:
            raise ValueError(f"{path}: {key!r} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(target.shape)}; the adapter was trained for a different model size.")
        resolved[target_key] = (target, value)
    missing = sorted(set(live) - set(resolved))
    if missing:
        raise ValueError(f"{path}: {len(missing)} adapter tensors are missing from the file, e.g. {missing[:3]}.")
    with torch.no_grad():
        for target, value in resolved.values():
            target.copy_(value.to(device=target.device, dtype=target.dtype))
