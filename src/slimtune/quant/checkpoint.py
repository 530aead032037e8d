"""Quantized checkpoints in safetensors, in transformers+bitsandbytes' key layout.

A model quantized by slimtune saves the same keys and bytes that transformers writes for a
bitsandbytes 4-bit / 8-bit model (see :mod:`slimtune.quant.state`), so either side reads the other's
files. Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimtune.core.files import atomic_file, check_creatable
from slimtune.core.state import find_state
from slimtune.quant.model import quant_summary
from slimtune.quant.streaming import ModelSource, load_quantized

__all__ = ["save_quantized", "load_quantized_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "model.safetensors"


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per shared storage (tied embeddings): safetensors refuses aliases, and
    transformers drops the later name the same way; ``tie_weights`` restores it on load."""
    seen: set[tuple] = set()
    out = {}
    for key, t in state.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else (key,)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = t.detach().to("cpu").contiguous()
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save ``model.state_dict()`` (quantized layers included) to ``path``.

    ``path`` is a ``.safetensors`` file or a folder (then ``model.safetensors`` inside). Returns the file.
    """
    state = find_state(model)
    if state is not None and state.configs:
        raise ValueError(f"the model holds adapter(s) {sorted(state.configs)}, whose wrapped layers a quantized "
                         "checkpoint cannot hold: save them with slimtune.save_adapter, and the base with "
                         "save_quantized after slimtune.unload(model) (or before adding them).")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / CHECKPOINT_NAME
    _check_replaceable(path)
    check_creatable(path, "the quantized checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = quant_summary(model)
    if summary.layers == 0:
        raise ValueError("the model has no quantized layer; quantize(model, QuantConfig(...)) first, or save it "
                         "with save_pretrained / safetensors directly")
    tensors = _dedupe_shared(model.state_dict())
    meta = {"format": "pt", "slimtune_quant": json.dumps({"layers": summary.layers, "params": summary.params})}
    meta.update(metadata or {})
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def _check_replaceable(path: Path) -> None:
    """Refuse to write over a safetensors file that is not a quantized checkpoint (a base model's full-precision
    weights, in the folder they came from, would be lost)."""
    if not path.exists():
        return
    try:
        with safe_open(path, "pt") as handle:
            ours = "slimtune_quant" in (handle.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file: not ours either
        ours = False
    if not ours:
        raise ValueError(f"cannot save the quantized checkpoint to {path}: that file holds other weights (not a "
                         "quantized checkpoint), which it would replace; save into another folder or file.")


def load_quantized_checkpoint(model: ModelSource, path: str | os.PathLike | list,
                              device: torch.device | str = "cpu") -> nn.Module:
    """Load a quantized checkpoint (slimtune's or transformers+bitsandbytes') into ``model``.

    ``model`` is an (empty) module of the checkpoint's architecture or a function building one;
    each quantized layer is recreated from its stored state (quant type, block size, double quant).
    """
    return load_quantized(model, path, config=None, device=device)
