"""AdapterHub's (the ``adapters`` library's) saved-adapter folders: file names, configs, weights.

A saved bottleneck adapter is a folder with ``adapter_config.json`` — ``{"config": {BnConfig fields},
"hidden_size", "model_class", "model_name", "model_type", "name", "version"}`` — and its weights,
``adapter.safetensors`` or (``adapters``' default, ``use_safetensors=False``) the pickle
``pytorch_adapter.bin``. Keys are module paths of the model, e.g. BERT
``bert.encoder.layer.0.output.adapters.<name>.adapter_down.0.weight``, GPT-2 / Llama
``transformer.h.0.output_adapters.adapters.<name>.adapter_up.weight``. A classification head saved beside
it: ``head_config.json`` + ``model_head.safetensors`` / ``pytorch_model_head.bin`` (keys ``classifier.weight``
…). An AdapterFusion layer: ``adapter_fusion_config.json`` + ``model_adapter_fusion.safetensors`` /
``pytorch_model_adapter_fusion.bin`` (keys ``….adapter_fusion_layer.<a,b>.query.weight`` …).

PEFT's (and slimtune's) folders use the same ``adapter_config.json`` name; the content tells them apart:
``peft_type`` there, ``config`` + ``model_class`` here. Pickle files are read only when asked
(``allow_pickle=True``), with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from slimtune.core.tensor_files import check_finite, read_pickled_tensors

CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's / slimtune's folders
# The format written and checked against (adapters reads "version" to apply its legacy fixes).
FORMAT_VERSION = "adapters.1.3.0"

# BnConfig fields as adapters 1.3.0 writes them; the values are its defaults (phm_* only matter with phm_layer).
BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
# Fields slimtune computes with (the rest must keep the default, or the adapter is refused by name).
BN_FIELDS = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
             "original_ln_after", "residual_before_ln", "adapter_residual_before_ln", "ln_before", "ln_after",
             "scaling", "use_gating", "leave_out", "dropout", "init_weights", "init_weights_seed")
REFUSED = {
    "phm_layer": "Compacter's PHM layers", "inv_adapter": "invertible adapters", "cross_adapter":
    "cross-attention adapters (encoder-decoder models)", "stochastic_depth": "stochastic depth",
}
FUSION_FIELDS = ("key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
                 "value_before_softmax", "value_initialized", "dropout_prob")
LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # folders without "version" (adapter-transformers)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def folder_kind(path: str | os.PathLike) -> str:
    """``"adapterhub"`` (a saved adapter), ``"adapterhub_fusion"`` (a saved fusion layer) or ``"peft"``
    (PEFT's or slimtune's ``adapter_config.json``, which carries ``peft_type``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist.")
    if (folder / CONFIG_NAME).is_file():
        data = read_json(folder / CONFIG_NAME)
        if "peft_type" in data:
            return "peft"
        if "config" in data and ("model_class" in data or str(data.get("version", "")).startswith("adapters")):
            return "adapterhub"
        raise ValueError(f"{folder / CONFIG_NAME} is neither PEFT's/slimtune's (no peft_type) nor AdapterHub's "
                         "(no config/model_class) adapter config.")
    if (folder / FUSION_CONFIG_NAME).is_file():
        return "adapterhub_fusion"
    raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME} or {FUSION_CONFIG_NAME}; is it an adapter folder?")


def read_hub_config(folder: Path, name: str = CONFIG_NAME) -> dict[str, Any]:
    """An AdapterHub config file, with adapters' legacy activation renaming for folders without a version."""
    data = read_json(folder / name)
    config = data.get("config")
    if "version" not in data and isinstance(config, dict) and config.get("non_linearity") in LEGACY_ACTIVATIONS:
        config["non_linearity"] = LEGACY_ACTIVATIONS[config["non_linearity"]]
    return data


def bottleneck_fields(data: dict[str, Any], where: Path) -> dict[str, Any]:
    """``BottleneckConfig`` fields (placement "adapterhub") for an AdapterHub adapter config; what slimtune
    does not implement is refused by name."""
    config = data.get("config")
    if not isinstance(config, dict) or config.get("architecture") not in (None, "bottleneck"):
        kind = None if not isinstance(config, dict) else config.get("architecture")
        raise ValueError(f"{where}: an AdapterHub {kind!r} adapter; slimtune reads AdapterHub's bottleneck adapters "
                         "(seq_bn, double_seq_bn, par_bn and their variants) only.")
    for key, what in REFUSED.items():
        if config.get(key, BN_DEFAULTS[key]) not in (None, False, 0, 0.0):
            raise ValueError(f"{where}: {key}={config[key]!r} ({what}) is not supported by slimtune.")
    unknown = sorted(k for k in config if k not in BN_DEFAULTS and k != "architecture")
    if unknown:
        warnings.warn(f"{where}: ignoring AdapterHub config keys slimtune does not know: {unknown}.", stacklevel=3)
    fields = {k: config.get(k, BN_DEFAULTS[k]) for k in BN_FIELDS}
    fields["non_linearity"] = str(fields["non_linearity"]).lower()
    if isinstance(fields["scaling"], int) and not isinstance(fields["scaling"], bool):
        fields["scaling"] = float(fields["scaling"])
    parallel = bool(config.get("is_parallel", False))
    fields["adapter_type"] = "parallel" if parallel else "houlsby" if fields["mh_adapter"] else "pfeiffer"
    fields["placement"] = "adapterhub"
    return fields


def hub_bottleneck_config(fields: dict[str, Any]) -> dict[str, Any]:
    """AdapterHub's ``config`` dict for a slimtune adapter with AdapterHub placement (its fields by name)."""
    out = dict(BN_DEFAULTS)
    out.update({k: fields[k] for k in BN_FIELDS})
    out["is_parallel"] = fields["adapter_type"] == "parallel"
    out["leave_out"] = list(fields["leave_out"] or [])
    if isinstance(out["scaling"], (int, float)) and not isinstance(out["scaling"], bool):
        out["scaling"] = float(out["scaling"])  # adapters accepts a float, not an int
    return out


def fusion_fields(data: dict[str, Any], where: Path) -> dict[str, Any]:
    config = data.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{where}: no AdapterFusion config in {FUSION_CONFIG_NAME}.")
    missing = [k for k in FUSION_FIELDS if k not in config]
    if missing:
        raise ValueError(f"{where}: the AdapterFusion config lacks {missing}.")
    return {k: config[k] for k in FUSION_FIELDS}


def model_fields(model: torch.nn.Module, hidden_size: int) -> dict[str, Any]:
    """What AdapterHub's configs say about the model an adapter belongs to."""
    config = getattr(model, "config", None)
    return {"hidden_size": hidden_size, "model_class": type(model).__name__,
            "model_name": getattr(config, "_name_or_path", "") or "",
            "model_type": getattr(config, "model_type", None), "version": FORMAT_VERSION}


def read_weights(folder: Path, names: tuple[str, str], allow_pickle: bool, required: bool = True
                 ) -> dict[str, torch.Tensor] | None:
    """The tensors of ``names`` = (safetensors file, pickle file) in ``folder``; the safetensors file first."""
    safe, pickled = folder / names[0], folder / names[1]
    if safe.is_file():
        try:
            return load_file(safe)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{safe} is not a readable safetensors file ({error}).") from error
    if pickled.is_file():
        if not allow_pickle:
            raise ValueError(
                f"refusing to read {pickled}: it is a pickle file (adapters' default, use_safetensors=False), and "
                "unpickling can run code. Pass allow_pickle=True if you trust its source (read with "
                "torch.load(weights_only=True)), or save it again in adapters with use_safetensors=True."
            )
        return read_pickled_tensors(pickled)
    if required:
        raise FileNotFoundError(f"{folder} has neither {names[0]} nor {names[1]}.")
    return None


def check_matching(shapes: dict[str, torch.Size], stored: dict[str, torch.Tensor], where: Any) -> None:
    """Raise unless ``stored`` has exactly the keys of ``shapes``, each with its shape."""
    unexpected = sorted(set(stored) - set(shapes))
    missing = sorted(set(shapes) - set(stored))
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} tensors belong to no adapter module of this model, e.g. "
                         f"{unexpected[:3]}; was the adapter made for another architecture?")
    if missing:
        raise ValueError(f"{where}: {len(missing)} adapter tensors are missing from the file, e.g. {missing[:3]}.")
    for key, value in stored.items():
        if shapes[key] != value.shape:
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(shapes[key])}; the adapter was made for a different model size.")


def copy_checked(live: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], where: Any) -> None:
    """Copy ``stored`` into ``live`` (same keys): every live tensor must be there, with its shape."""
    check_matching({k: v.shape for k, v in live.items()}, stored, where)
    check_finite(stored, where)
    with torch.no_grad():
        for key, value in stored.items():
            live[key].copy_(value.to(device=live[key].device, dtype=live[key].dtype))
