"""Loading a model whose linear layers are, or become, quantized: streamed from safetensors with a quantization
config, a checkpoint bitsandbytes quantized loaded as its producer stored it, and quantized weights that
config.json does not announce refused by name."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers

from slimtune.compat import from_pretrained_kwargs
from slimtune.core.modules import is_dense_linear, weight_of
from slimtune.core.tensor_files import SafetensorsReader
from slimtune.errors import InvalidFileError
from slimtune.quant import CheckpointNeedsMerging, QuantConfig, init_empty_weights, load_quantized, quantize
from slimtune.quant.streaming import folder_weight_files

logger = logging.getLogger("slimtune")


def checkpoint_keys(folder: Path) -> list[str]:
    keys: list[str] = []
    for path in folder_weight_files(folder) if any(folder.glob("*.safetensors")) else []:
        with SafetensorsReader(path) as reader:
            keys += reader.keys()
    return keys


def refuse_unannounced_quantization(folder: Path, keys: Iterable[str]) -> None:
    quantized = sorted(k for k in keys if k.endswith((".SCB", ".weight_format")) or ".quant_state." in k)
    if quantized:
        raise InvalidFileError(folder, f"its weights are stored quantized (e.g. {quantized[0]}) but config.json has no "
                                       "quantization_config saying so; load it with a quantization section (its "
                                       "layers then load as stored), or add the quantization_config it was saved "
                                       "with.")


def as_stored(folder: Path, stored: QuantConfig, asked: QuantConfig | None) -> QuantConfig:
    """A bitsandbytes checkpoint loads as its producer stored it (as transformers does, which ignores a config passed
    for one): the recipe's quantization gives the compute dtype only, and says so where it asked for another."""
    if asked is None:
        return stored
    if (asked.bits, asked.quant_type, asked.double_quant) != (stored.bits, stored.quant_type, stored.double_quant):
        described = f"{stored.bits}-bit" + (f" {stored.quant_type}{' + double quant' * stored.double_quant}"
                                            if stored.bits == 4 else "")
        logger.warning("%s is already quantized by bitsandbytes (%s, config.json's quantization_config): its layers "
                       "load as stored, and the quantization section's bits=%s quant_type=%s double_quant=%s do not "
                       "apply", folder, described, asked.bits, asked.quant_type, asked.double_quant)
    return dataclasses.replace(stored, compute_dtype=asked.compute_dtype)


def load_quantized_model(model_cls: Any, folder: Path, dtype: torch.dtype, device: torch.device,
                         quantization: QuantConfig, extra: dict[str, Any], stored_only: bool = False) -> Any:
    """The model built on the meta device, then filled from ``folder`` tensor by tensor, quantizing linear weights
    (``stored_only``: only those stored quantized); loaded whole and then quantized where transformers merges
    checkpoint tensors (a mixture of experts)."""
    config = transformers.AutoConfig.from_pretrained(folder, **extra)
    with init_empty_weights():
        model = model_cls.from_config(config, dtype=dtype)
    try:
        return load_quantized(model, folder, quantization, device, stored_only)
    except CheckpointNeedsMerging as why:
        prequantized = getattr(config, "quantization_config", None) is not None
        if prequantized:
            logger.warning("Loading %s whole with transformers (%s); the layers bitsandbytes stored quantized are kept "
                           "as stored (this needs bitsandbytes installed)", folder, why)
        else:
            logger.warning("Loading %s in full precision, then quantizing it: %s", folder, why)
    try:
        model = model_cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, **from_pretrained_kwargs(),
                                          **extra).to(device)
    except ImportError as error:
        if not prequantized:
            raise
        raise ValueError(f"{folder} was quantized by bitsandbytes and transformers merges its tensors while loading "
                         f"({error}): install bitsandbytes to load it, or load its full-precision original with a "
                         "quantization section.") from error
    if stored_only:  # bitsandbytes' layers become slimtune's as stored; its full-precision ones stay so
        kept = [name for name, module in model.named_modules() if is_dense_linear(module)
                and weight_of(module).is_floating_point()]
        quantization = dataclasses.replace(quantization, skip_modules=kept)
    quantize(model, quantization)
    return model
