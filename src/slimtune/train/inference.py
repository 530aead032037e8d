"""A base model plus saved adapters, ready for `slimtune generate`, `eval` and `merge`.

An adapter trained with QLoRA learned on top of the *dequantized 4-bit* base, so using it on the
full-precision weights changes its output a little. When an adapter sits in a run folder
(``<run>/adapter`` next to ``<run>/recipe.yaml``) the run's ``quantization`` section is reused,
unless the caller decides (``load_in_4bit=True/False``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from slimtune.adapter_files import load_adapter, read_adapter_config
from slimtune.core.dtypes import parse_dtype, resolve_device
from slimtune.core.files import atomic_folder
from slimtune.export import merge_for_export
from slimtune.lifecycle import set_adapter
from slimtune.quant import QuantConfig, quant_summary, quantize
from slimtune.train.models import load_model_and_tokenizer
from slimtune.train.run_folder import RunFolder


def parse_adapter_arg(text: str, index: int) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named "default" for the first, "adapter<i>" for later ones)."""
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name and os.sep not in name:
        return name, Path(path)
    return ("default" if index == 0 else f"adapter{index}"), Path(text)


def run_quantization(adapter_dir: Path) -> QuantConfig | None:
    """The ``quantization`` section of the run that wrote ``adapter_dir``, if it is a run's adapter."""
    run = RunFolder.of_adapter(adapter_dir)
    return None if run is None else run.quantization()


def base_model_of(adapter_dir: Path) -> str:
    """The base model an adapter names (a local folder that exists), else the default model."""
    name = read_adapter_config(adapter_dir).base_model_name_or_path
    return name if name and Path(name).is_dir() else "default"


def load_with_adapters(model_name: str | None, adapters: list[tuple[str, Path]], load_in_4bit: bool | None = None,
                       device: str = "auto", dtype: str = "float32", active: list[str] | None = None,
                       log=print) -> tuple[Any, Any]:
    """(model, tokenizer): the base model, 4-bit if asked (or as its run was), with adapters loaded.

    ``active`` names the adapters to use (several are combined); default: the first one.
    """
    # Clear errors for wrong folders or names before the (slow) model load.
    names = [name for name, _ in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}; name them with --adapter NAME=PATH.")
    chosen = active or names[:1]
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ValueError(f"--active {unknown} is not a loaded adapter; loaded: {names}.")
    for _, path in adapters:
        read_adapter_config(path)
    if model_name is None:
        model_name = base_model_of(adapters[0][1]) if adapters else "default"
    quant = None
    if load_in_4bit or (load_in_4bit is None and adapters):
        quant = (run_quantization(adapters[0][1]) if adapters else None) or (QuantConfig() if load_in_4bit else None)
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype, device=resolve_device(device))
    if quant is not None:
        quantize(model, quant)
        log(str(quant_summary(model)))
    for name, path in adapters:
        load_adapter(model, path, adapter_name=name, activate=False)
    if adapters:
        set_adapter(model, chosen)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def export_merged(model: Any, tokenizer: Any, output: Path, dtype: str = "float32") -> Path:
    """Merge the active adapter into the weights (in ``dtype``) and save a plain transformers folder.

    A 4-bit base is dequantized first (what the adapter was trained on). The folder is written to a
    temporary name and renamed, so it is complete or absent.
    """
    model, _ = merge_for_export(model, dtype=parse_dtype(dtype), inplace=True)
    with atomic_folder(output) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return output
