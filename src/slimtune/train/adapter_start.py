"""A run that trains a saved adapter further (``model.adapter: <folder>``) rather than a new one.

The folder (a finished run's ``adapter/``, or any adapter in PEFT's format) decides the method: its
``adapter_config.json`` is the recipe's ``method`` section, and its weights are where training starts. A
``method`` section in the recipe may only repeat the folder's values, and change what training alone uses
(the dropout fields); anything that would change the adapter's tensors or its function is the folder's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtune.adapter_files import saved_method
from slimtune.config import MethodConfig
from slimtune.errors import InvalidFileError
from slimtune.methods import config_classes
from slimtune.train.schema import RecipeError, build, unknown_key_error


def may_change(field: str) -> bool:
    """Whether a recipe may set ``field`` to another value than the saved adapter's: a dropout rate acts in
    training only (the saved adapter computes the same function)."""
    return field.endswith("dropout")


def method_from_adapter(folder: str, section: Any) -> MethodConfig:
    """The method of the saved adapter in ``folder``, with the dropout ``section`` (the recipe's ``method``
    mapping, or None) sets; any other value there must equal the folder's."""
    try:
        saved = saved_method(folder)
    except (OSError, InvalidFileError) as error:
        raise RecipeError(f"model.adapter: {error}") from None
    saved = saved.replace(inference_mode=False)  # saved adapters are marked for inference; this one trains
    if section is None:
        return saved
    if not isinstance(section, dict):
        raise RecipeError(f"method: expected a mapping, got {type(section).__name__}; with model.adapter the "
                          "method section may be left out (the adapter's folder decides it).")
    given = dict(section)
    peft_type = given.pop("peft_type", saved.peft_type)
    if peft_type != saved.peft_type:
        raise RecipeError(f"method.peft_type: {peft_type!r:.80} differs from the adapter in model.adapter={folder!r}, "
                          f"which is {saved.peft_type}; drop method.peft_type (the folder decides it).")
    fields = {f.name for f in dataclasses.fields(saved) if f.init}
    for key in given:
        if key not in fields:
            raise unknown_key_error(str(key), sorted(fields | {"peft_type"}), f"method.{key}")
    stated = build(config_classes()[saved.peft_type], {**saved.to_dict(), **given}, "method",
                   skip=frozenset({"peft_type"}))
    changes = {}
    for key in given:
        mine, theirs = getattr(stated, key), getattr(saved, key)
        if mine == theirs:
            continue
        if not may_change(key):
            raise RecipeError(f"method.{key}: {mine!r:.80} differs from the adapter in model.adapter={folder!r}, "
                              f"whose {key} is {theirs!r:.80}; training a saved adapter further keeps what it is "
                              f"(only dropout may change): drop method.{key}.")
        changes[key] = mine
    return saved.replace(**changes) if changes else saved
