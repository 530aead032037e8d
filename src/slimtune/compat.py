"""What differs between the transformers releases slimtune supports, detected by capability.

Versions are never compared: each helper looks at what the installed release offers (a forward's
parameter names, an attribute) so a renamed argument is followed the day it ships.

- The key/value cache argument of a model's ``forward`` is ``cache`` from transformers 5.24 (the old
  ``past_key_values`` survives there only as a deprecated alias) and ``past_key_values`` before.
  Decoder layers took ``past_key_value`` or ``layer_past`` in older releases.
- The activation-checkpointing flag is ``is_activation_checkpointing`` in transformers 5 and
  ``is_gradient_checkpointing`` before (deprecated in 5).
- transformers 5 renames checkpoint keys while loading (a model's conversion mapping: GPT-NeoX's
  ``embed_out`` is its ``lm_head``) and merges some (a mixture of experts' per-expert matrices into one
  3-D parameter); releases before it load keys as stored.
- transformers 5.25 turns the Hub's layer kernels on in ``from_pretrained`` by default (``use_kernels=None`` means
  on): it needs the ``kernels`` package, fetches kernels from the Hub and swaps layers' forwards. slimtune loads
  with ``use_kernels=False`` wherever the release knows the argument: the model's own forwards, which its adapters
  wrap and its tests check, and no download.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import transformers
from torch import nn

try:  # transformers 5: how a model's checkpoint keys map onto its parameters
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    KEYS_CONVERTED_ON_LOAD = True
except ImportError:  # earlier releases load keys as stored
    KEYS_CONVERTED_ON_LOAD = False


def from_pretrained_kwargs() -> dict[str, Any]:
    """Keyword arguments for every ``from_pretrained`` of a model slimtune makes (see the module docstring)."""
    return {"use_kernels": False} if hasattr(transformers.PreTrainedModel, "set_use_kernels") else {}


# A model's cache argument, newest name first.
MODEL_CACHE_NAMES = ("cache", "past_key_values")
# Every name a model or one of its layers has used for the cache it reads and appends to.
LAYER_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def forward_parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    """The parameters of ``module.forward`` (bound: without ``self``)."""
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def takes_var_keyword(params: dict[str, inspect.Parameter]) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def cache_entry(model: nn.Module) -> tuple[nn.Module, str] | None:
    """Where a key/value cache enters ``model``: ``(module, argument name)``, or None if it takes none.

    The model's own forward when it takes the cache, or passes ``**kwargs`` on to a backbone that does
    (transformers 5's heads); else the backbone (``model.base_model``) itself, for heads whose forward
    neither takes a cache nor passes extra arguments on (BERT's classification head in transformers 4).
    """
    params = forward_parameters(model)
    found = next((name for name in MODEL_CACHE_NAMES if name in params), None)
    if found is not None:
        return model, found
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        return None
    inner = forward_parameters(backbone)
    found = next((name for name in MODEL_CACHE_NAMES if name in inner), None)
    if found is None:
        return None
    return (model if takes_var_keyword(params) else backbone), found


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a forward call's keyword arguments (under any of its names) and return it."""
    found = None
    for name in MODEL_CACHE_NAMES:
        value = kwargs.pop(name, None)
        if value is not None and found is None:
            found = value
    return found


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache passed in a forward call's keyword arguments (under any of its names), or None."""
    return next((kwargs[name] for name in MODEL_CACHE_NAMES if kwargs.get(name) is not None), None)


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' own activation (gradient) checkpointing is on for ``model``."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if flag in dir(type(model)):  # look on the class: reading the old property warns in transformers 5
            return bool(getattr(model, flag))
    return False


def gguf_dequantize_config(gguf_file: str) -> Any:
    """transformers' ``GgufConfig(dequantize=True)`` where it exists (newer releases can keep GGUF blocks
    packed unless told otherwise); None where every GGUF load dequantizes anyway."""
    config_class = getattr(transformers, "GgufConfig", None)
    return None if config_class is None else config_class(gguf_file=gguf_file, dequantize=True)


def checkpoint_key_mapper(model: nn.Module) -> Callable[[str], tuple[str, bool]]:
    """``key → (the model's name for it, whether transformers also merges it with other tensors)`` for the
    checkpoint keys of ``model`` (built, possibly on the meta device), as ``from_pretrained`` reads them."""
    if not KEYS_CONVERTED_ON_LOAD or not isinstance(model, transformers.PreTrainedModel):
        return lambda key: (key, False)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def mapped(key: str) -> tuple[str, bool]:
        name, converter = rename_source_key(key, renamings, converters)
        return name, converter is not None

    return mapped
