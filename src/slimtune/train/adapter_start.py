"""A run that trains a saved adapter further (``model.adapter: <folder>``) rather than a new one.

The folder (a finished run's ``adapter/``, or any adapter in PEFT's format) decides the method: its
``adapter_config.json`` is the recipe's ``method`` section, and its weights are where training starts. A
``method`` section in the recipe may only repeat the folder's values, and change what training alone uses
(the dropout fields); anything that would change the adapter's tensors or its function is the folder's. A
LoRA folder (LoRA-FA and LoRA+ save as PEFT's LoRA) may be trained further as either, naming it in
``method.peft_type``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtune.adapter_files import INIT_ONLY, folded_encoder, saved_method
from slimtune.config import LoraConfig, MethodConfig
from slimtune.errors import InvalidFileError
from slimtune.methods import config_classes
from slimtune.train.schema import RecipeError, build, unknown_key_error

SWITCHABLE = ("LORA_FA", "LORA_PLUS")  # LoRA variants whose tensors are LoRA's own
ORDERLESS = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform")  # PEFT writes sets


def may_change(field: str) -> bool:
    """Whether a recipe may set ``field`` to another value than the saved adapter's: a dropout rate acts in
    training only (the saved adapter computes the same function)."""
    return field.endswith("dropout")


def ignored(field: str) -> bool:
    """Fields a recipe may repeat from the file whatever their value there: how the adapter was first initialized
    (its weights now come from the file) and whether it was saved for inference (this run trains it)."""
    return field in INIT_ONLY or field.startswith("init_") or field == "inference_mode"


def _same(field: str, mine: Any, theirs: Any) -> bool:
    if field in ORDERLESS and isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
        return sorted(map(str, mine)) == sorted(map(str, theirs))
    return bool(mine == theirs)


def _trainable(saved: MethodConfig, folder: str) -> None:
    """Refuse an adapter whose file holds an encoder's output, not the encoder (PEFT refuses to train it too)."""
    if folded_encoder(saved):
        raise RecipeError(f"model.adapter: {folder!r} is {folded_encoder(saved)}: its file "
                          "holds what its encoder computed, not the encoder, so it cannot be trained further (PEFT "
                          "refuses it too); train a new adapter, or start from this one's virtual tokens with "
                          "peft_type PROMPT_TUNING in Python.")


def method_from_adapter(folder: str, section: Any) -> MethodConfig:
    """The method of the saved adapter in ``folder``, with the dropout ``section`` (the recipe's ``method``
    mapping, or None) sets; any other value there must equal the folder's."""
    try:
        saved = saved_method(folder)
    except (OSError, InvalidFileError) as error:
        raise RecipeError(f"model.adapter: {error}") from None
    _trainable(saved, folder)
    saved = saved.replace(inference_mode=False)  # saved adapters are marked for inference; this one trains
    if section is None:
        return saved
    if not isinstance(section, dict):
        raise RecipeError(f"method: expected a mapping, got {type(section).__name__}; with model.adapter the "
                          "method section may be left out (the adapter's folder decides it).")
    given = dict(section)
    peft_type = given.pop("peft_type", saved.peft_type)
    classes = config_classes()
    cls = classes.get(peft_type) if isinstance(peft_type, str) else None
    # a plain LoRA file trains further as LoRA-FA or LoRA+ too (the same tensors; Delta-LoRA's and DoRA's differ)
    family = type(saved) is LoraConfig and not saved.use_dora and peft_type in SWITCHABLE
    if peft_type != saved.peft_type and not family:
        options = f" (or {' / '.join(SWITCHABLE)})" if type(saved) is LoraConfig and not saved.use_dora else ""
        raise RecipeError(f"method.peft_type: {peft_type!r:.80} differs from the adapter in model.adapter={folder!r}, "
                          f"which is {saved.peft_type}{' with DoRA' if getattr(saved, 'use_dora', False) else ''}; "
                          f"drop method.peft_type (the folder decides it){options}.")
    cls = cls or type(saved)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in given:
        if key not in fields:
            raise unknown_key_error(str(key), sorted(fields | {"peft_type"}), f"method.{key}")
    stored = {k: v for k, v in saved.to_dict().items() if k in fields}
    stated = build(cls, {**stored, **given}, "method", skip=frozenset({"peft_type"}))
    changes = {}
    for key in given:
        mine, theirs = getattr(stated, key), getattr(saved, key, None)
        if ignored(key) or not hasattr(saved, key) or _same(key, mine, theirs):
            continue  # a field of the chosen LoRA variant the file does not have (delta_lambda …) is the recipe's
        if not may_change(key):
            raise RecipeError(f"method.{key}: {mine!r:.80} differs from the adapter in model.adapter={folder!r}, "
                              f"whose {key} is {theirs!r:.80}; training a saved adapter further keeps what it is "
                              f"(only dropout may change): drop method.{key}.")
        changes[key] = mine
    kept = {key: getattr(saved, key) for key in stored if not may_change(key)}  # the file's, ignored fields too
    return stated.replace(**kept, **changes)
