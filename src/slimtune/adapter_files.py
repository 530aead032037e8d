"""Adapters on disk in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: the module path prefixed with ``base_model.model.`` and without the adapter name
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). An adapter folder is written
as one unit (:func:`slimtune.core.files.atomic_folder`): a reader finds the previous adapter or the
new one, never half of each, and a reader of a folder a crash interrupted repairs it first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from slimtune.config import MethodConfig
from slimtune.core.files import atomic_folder, recover_folder
from slimtune.core.state import get_state
from slimtune.lifecycle import add_adapter, bias_mode, bias_names, remove_adapter
from slimtune.methods import config_from_dict, method_for
from slimtune.methods.contract import PEFT_PREFIX, saved_modules, tuner_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of one adapter, keyed as PEFT keys them on disk."""
    state = get_state(model)
    state.check_known([adapter_name])
    config = state.configs[adapter_name]
    method = method_for(config)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner_layers(model):
        if adapter_name in layer.adapter_names:
            out.update({f"{PEFT_PREFIX}{name}.{k}": v for k, v in layer.adapter_tensors(adapter_name).items()})
    for name, module in saved_modules(model):
        if adapter_name in module.adapter_names:
            out.update({f"{method.saved_modules_prefix}{name}.{k}": v
                        for k, v in module.adapter_tensors(adapter_name).items()})
    params = dict(model.named_parameters())
    out.update({PEFT_PREFIX + name: params[name] for name in bias_names(model, {bias_mode(config)})})
    out.update(method.adapter_tensors(model, adapter_name, state))
    return out


def serialize_adapter(model: nn.Module, adapter_name: str = "default") -> bytes:
    """The adapter's safetensors file content (also used to report its size on disk)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_tensors(model, adapter_name).items()}
    return save(tensors, metadata={"format": "pt"})


def adapter_config_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """What ``adapter_config.json`` holds for one adapter (PEFT's fields; the base model's name)."""
    config = get_state(model).configs[adapter_name]
    data = method_for(config).saved_config(config)
    data["inference_mode"] = True
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    data["base_model_name_or_path"] = name_or_path or None
    return data


ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, "README.md"}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write one adapter to the folder ``path`` in PEFT's format, as one unit, and return the folder.

    An existing adapter folder is replaced whole; a folder holding anything else is refused (nothing
    of the user's is ever deleted)."""
    get_state(model).check_known([adapter_name])
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save the adapter to {folder}: it is a file; pass a folder path.")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in ADAPTER_FILES)
        if foreign:
            raise ValueError(f"cannot save the adapter to {folder}: the folder holds other files ({foreign[:3]}), "
                             "which replacing it would delete; save into an empty or new folder.")
    weights = serialize_adapter(model, adapter_name)
    config = (json.dumps(adapter_config_dict(model, adapter_name), indent=2, sort_keys=True) + "\n").encode()
    try:
        with atomic_folder(folder) as tmp:
            (tmp / WEIGHTS_NAME).write_bytes(weights)
            (tmp / CONFIG_NAME).write_bytes(config)
    except OSError as error:
        raise OSError(error.errno, f"cannot create adapter folder {folder}: {error.strerror or error}; choose a "
                                   "writable path with free space (the previous adapter there is intact)") from error
    return folder


def read_adapter_config(path: str | os.PathLike) -> MethodConfig:
    folder = Path(path)
    recover_folder(folder)
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
    add_adapter(model, config, adapter_name, activate=activate)
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
