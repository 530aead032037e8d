"""AdapterHub's saved-adapter folders, both ways: bottleneck adapters (with a classification head saved
beside them) and AdapterFusion layers (the format: :mod:`slimtune.adapterhub.format`).

    name = load_adapterhub(model, "hub/sentiment")         # what adapters' save_adapter wrote
    save_adapterhub(model, "out/sentiment", "sentiment")   # adapters: load_adapter(path, use_safetensors=True)

slimtune writes safetensors (``adapter.safetensors``); ``adapters`` reads them with
``load_adapter(path, use_safetensors=True)`` (its default looks for the pickle ``pytorch_adapter.bin``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from slimtune.adapterhub import format as hubformat
from slimtune.adapterhub.sites import align, hidden_size, hub_tensors
from slimtune.core.files import atomic_folder
from slimtune.core.state import get_state
from slimtune.lifecycle import add_adapter, undone_on_error
from slimtune.methods.bottleneck import BottleneckConfig
from slimtune.methods.contract import saved_modules
from slimtune.methods.fusion import AdapterFusionConfig
from slimtune.methods.layers import ModulesToSave

KNOWN_FILES = {hubformat.CONFIG_NAME, hubformat.HEAD_CONFIG_NAME, hubformat.FUSION_CONFIG_NAME,
               *hubformat.ADAPTER_WEIGHTS, *hubformat.HEAD_WEIGHTS, *hubformat.FUSION_WEIGHTS}


def load_adapterhub(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                    allow_pickle: bool = False, is_trainable: bool = False, activate: bool = True,
                    with_head: bool = True) -> str:
    """Add the adapter (or AdapterFusion layer) that ``adapters`` saved in ``path`` to ``model``; return its name.

    ``adapter_name``: default the name it was saved under. ``allow_pickle``: read ``adapters``' default
    pickle files (``pytorch_adapter.bin`` …) with ``torch.load(weights_only=True)``; without it only
    safetensors files are read. A head saved beside the adapter that differs from the model's becomes the
    adapter's head copy (``modules_to_save``). A fusion folder needs its fused adapters loaded first. On any
    mismatch the model is left as it was; the adapter is frozen unless ``is_trainable``.
    """
    folder = Path(path)
    kind = hubformat.folder_kind(folder)
    if kind == "peft":
        peft_type = hubformat.read_json(folder / hubformat.CONFIG_NAME).get("peft_type")
        raise ValueError(f"{folder} holds a PEFT/slimtune adapter (peft_type={peft_type!r}), not an AdapterHub one; "
                         "load it with slimtune.load_adapter(model, path).")
    if kind == "adapterhub_fusion":
        data = hubformat.read_hub_config(folder, hubformat.FUSION_CONFIG_NAME)
        names = data.get("adapter_names")
        names = names.split(",") if isinstance(names, str) else names
        config: BottleneckConfig | AdapterFusionConfig = AdapterFusionConfig(
            adapter_names=list(names or []), **hubformat.fusion_fields(data, folder))
        weights, container = hubformat.FUSION_WEIGHTS, "adapter_fusion_layer"
        heads: dict[str, dict[str, torch.Tensor]] = {}
    else:
        data = hubformat.read_hub_config(folder)
        heads = _changed_heads(model, folder, allow_pickle) if with_head else {}
        config = BottleneckConfig(**hubformat.bottleneck_fields(data, folder), modules_to_save=sorted(heads) or None)
        weights, container = hubformat.ADAPTER_WEIGHTS, "adapters"
    if data.get("hidden_size") not in (None, hidden_size(model)):
        raise ValueError(f"{folder}: the adapter was saved for hidden size {data['hidden_size']}, this model has "
                         f"{hidden_size(model)}.")
    saved_name = str(data.get("name") or adapter_name or "default")
    name = adapter_name or saved_name
    stored = hubformat.read_weights(folder, weights, allow_pickle)
    assert stored is not None
    with undone_on_error(model, name):
        add_adapter(model, config, name, activate=activate)
        live = hub_tensors(model, name, name)
        stored = align(stored, set(live), model, saved_name, name, container)
        if container == "adapter_fusion_layer":  # AdapterHub also keeps fusion layers where no adapter sits
            paths = {k.split(f".{container}.")[0] for k in live}
            stored = {k: v for k, v in stored.items() if k.split(f".{container}.")[0] in paths}
        hubformat.copy_checked(live, stored, folder)
        for module_name, tensors in heads.items():
            head = model.get_submodule(module_name)
            assert isinstance(head, ModulesToSave)  # add_adapter made it, from modules_to_save
            hubformat.copy_checked(head.adapter_tensors(name), tensors, folder / "head")
    if not is_trainable:
        for tensor in [*live.values(), *_head_tensors(model, name).values()]:
            tensor.requires_grad_(False)
    return name


def _changed_heads(model: nn.Module, folder: Path, allow_pickle: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The head saved beside an adapter, by module, where it differs from the model's (an untouched LM head
    that ``adapters`` saves too is left out)."""
    stored = hubformat.read_weights(folder, hubformat.HEAD_WEIGHTS, allow_pickle, required=False)
    if not stored:
        return {}
    if (folder / hubformat.HEAD_CONFIG_NAME).is_file():
        saved_class = hubformat.read_json(folder / hubformat.HEAD_CONFIG_NAME).get("model_class")
        if saved_class not in (None, type(model).__name__):
            warnings.warn(f"{folder}: its head was saved from a {saved_class}, this model is a {type(model).__name__}; "
                          "the head is not loaded (as adapters does).", stacklevel=3)
            return {}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in stored.items():
        module_name, _, param = key.rpartition(".")
        by_module.setdefault(module_name, {})[param] = value
    changed = {}
    for module_name, tensors in by_module.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"{folder}: the saved head is {module_name!r}, which this {type(model).__name__} "
                             "lacks.") from None
        if isinstance(module, ModulesToSave):
            module = module.original_module
        own = module.state_dict()
        if set(own) != set(tensors):
            raise ValueError(f"{folder}: the saved head {module_name!r} has {sorted(tensors)}, the model's "
                             f"{sorted(own)}.")
        if any(own[p].shape != t.shape or not torch.equal(own[p].cpu(), t) for p, t in tensors.items()):
            changed[module_name] = tensors
    return changed


def _head_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, module in saved_modules(model) if adapter_name in module.adapter_names
            for k, v in module.adapter_tensors(adapter_name).items()}


def save_adapterhub(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write one adapter (bottleneck with ``placement="adapterhub"``, or AdapterFusion) as ``adapters`` saves it,
    in safetensors, as one unit; a head copy (``modules_to_save``) goes beside it. Returns the folder."""
    state = get_state(model)
    state.check_known([adapter_name])
    config = state.configs[adapter_name]
    fields = hubformat.model_fields(model, hidden_size(model))
    files: dict[str, bytes] = {}
    if isinstance(config, AdapterFusionConfig):
        hub_name = config.hub_name
        fusion = {k: getattr(config, k) for k in hubformat.FUSION_FIELDS}
        files[hubformat.FUSION_CONFIG_NAME] = _json({**fields, "adapter_names": list(config.adapter_names),
                                                     "config": fusion, "name": hub_name})
        files[hubformat.FUSION_WEIGHTS[0]] = _safetensors(hub_tensors(model, adapter_name, hub_name, saving=True))
    elif isinstance(config, BottleneckConfig) and config.placement == "adapterhub":
        files[hubformat.CONFIG_NAME] = _json({**fields, "config": hubformat.hub_bottleneck_config(vars(config)),
                                              "name": adapter_name})
        files[hubformat.ADAPTER_WEIGHTS[0]] = _safetensors(hub_tensors(model, adapter_name, adapter_name, saving=True))
        heads = _head_tensors(model, adapter_name)
        if heads:
            model_config = getattr(model, "config", None)
            files[hubformat.HEAD_CONFIG_NAME] = _json({
                **fields, "config": None, "name": None, "num_labels": getattr(model_config, "num_labels", None),
                "label2id": getattr(model_config, "label2id", None)})
            files[hubformat.HEAD_WEIGHTS[0]] = _safetensors(heads)
    else:
        placement = f" placed {config.placement!r}" if isinstance(config, BottleneckConfig) else ""
        raise ValueError(f"AdapterHub's format holds bottleneck adapters with placement='adapterhub' and AdapterFusion "
                         f"layers; {adapter_name!r} is a {config.peft_type} adapter{placement}. Save it with "
                         "slimtune.save_adapter (slimtune's format).")
    folder = Path(path)
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in KNOWN_FILES)
        if foreign:
            raise ValueError(f"cannot save to {folder}: it holds other files ({foreign[:3]}), which replacing it would "
                             "delete; save into an empty or new folder.")
    with atomic_folder(folder) as tmp:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
    return folder


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata={"format": "pt"})
