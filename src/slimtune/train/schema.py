"""Build typed dataclasses from plain dicts (parsed YAML), with errors that name the dotted key.

:func:`build` checks every key against the dataclass's fields and every value against the field's
type hint before the dataclass is constructed, so a recipe with ``training.lerning_rate: 1e-4`` or
``method.r: sixteen`` fails with ``training.lerning_rate: unknown key ...`` /
``method.r: expected an integer, got 'sixteen'`` instead of a traceback from deep inside training.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from slimtune.errors import SlimtuneError


class RecipeError(SlimtuneError, ValueError):
    """A recipe (or one of its overrides) is invalid; the message names the dotted key and the fix (and, read
    from a file, the file)."""


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def describe(hint: Any) -> str:
    """Human words for a type hint: ``int``, ``'cosine' | 'linear'``, ``list of str``, ``null``."""
    if hint is type(None):
        return "null"
    if hint is Any:
        return "any value"
    origin = typing.get_origin(hint)
    if _is_union(hint):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        _, value = typing.get_args(hint) or (str, Any)
        return f"a mapping of name to {describe(value)}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping with keys {sorted(f.name for f in dataclasses.fields(hint) if f.init)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


_NO = object()  # "does not match" marker (None is a legitimate converted value)
_YAML_BOOL_WORDS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}  # what PyYAML reads as booleans


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (only lossless, obvious conversions), or ``_NO``."""
    if hint is Any:
        return value
    if hint is type(None):
        return None if value is None else _NO
    origin = typing.get_origin(hint)
    if _is_union(hint):
        # Exact type matches first, so "16" stays a string for ``int | str`` fields.
        options = typing.get_args(hint)
        for option in options:
            exact = option in (bool, int, float, str) and type(value) is option
            if exact and _convert(value, option, where) is not _NO:  # (_NO: a non-finite float)
                return value
        for option in options:
            converted = _convert(value, option, where)
            if converted is not _NO:
                return converted
        return _NO
    if origin is Literal:
        allowed = typing.get_args(hint)  # also by type, or 1 would match True
        if isinstance(value, bool) and bool not in {type(v) for v in allowed}:
            # YAML 1.1 reads an unquoted no/off/yes/on as a boolean: `mixed_precision: no` means the word
            words = [v for v in allowed if isinstance(v, str) and v.lower() in _YAML_BOOL_WORDS[value]]
            return words[0] if len(words) == 1 else _NO
        return value if value in allowed and type(value) in {type(v) for v in allowed} else _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:  # finite only: a NaN passes every range check (``nan <= 0`` is False) and trains to NaN
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if math.isfinite(value) else _NO
        # YAML 1.1 reads ``2e-4`` (no dot) as a string; accept what is clearly a number.
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            return float(value) if math.isfinite(float(value)) else _NO
        return _NO
    if hint is str:
        return value if isinstance(value, str) else _NO
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NO
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [check(item, item_hint, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            return _NO
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {check(k, key_hint, f"{where} key"): check(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build(hint, value, where) if isinstance(value, dict) else _NO
    return value if isinstance(hint, type) and isinstance(value, hint) else _NO


def check(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and converted where obvious); :class:`RecipeError` if wrong."""
    converted = _convert(value, hint, where)
    if converted is _NO:
        shown = f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"
        raise RecipeError(f"{where}: expected {describe(hint)}, got {shown}.")
    return converted


def unknown_key_error(key: str, allowed: list[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"{where}: unknown key.{hint} Allowed keys here: {', '.join(sorted(allowed))}.")


def prefixed(where: str, error: Exception) -> RecipeError:
    """Turn a dataclass's own ``ValueError("r=0 must be ...")`` into ``"method.r: r=0 must be ..."``."""
    message = str(error)
    match = re.match(r"(\w+)(\[[^\]]*\])?\s*=", message)
    key = f"{where}.{match.group(1)}" if match else where
    return RecipeError(f"{key}: {message}")


def build(cls: type, data: Any, where: str, skip: frozenset[str] = frozenset()) -> Any:
    """Construct dataclass ``cls`` from the dict ``data``; errors name ``where.<key>``.

    ``skip`` lists keys that are accepted but not passed on (e.g. ``peft_type`` of method configs).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected {describe(cls)}, got {type(data).__name__} {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key in skip:
            continue
        if key not in fields:
            raise unknown_key_error(str(key), list(fields) + sorted(skip), f"{where}.{key}")
        kwargs[key] = check(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        if isinstance(error, RecipeError):
            raise
        raise prefixed(where, error) from None


class StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping: PyYAML keeps the last one silently, so a
    second ``training:`` section would replace the whole first one. ``<<`` merges may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: the base class says so
                break
            seen.setdefault(key, line)
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                    "keep one (YAML would silently use the last)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _plain_number(loader: StrictLoader, node: yaml.ScalarNode) -> Any:
    """YAML 1.1 reads ``010`` as 8 (octal) and ``1:30`` as 90 (base 60), never what a recipe means: refused."""
    method = yaml.SafeLoader.construct_yaml_int if node.tag.endswith(":int") else yaml.SafeLoader.construct_yaml_float
    value, text = method(loader, node), str(node.value)
    if ":" in text or re.fullmatch(r"[-+]?0[0-9_]+", text):
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} reads as the YAML 1.1 {'base-60' if ':' in text else 'octal'} number {value}; write "
            f"the number without {'the colon' if ':' in text else 'the leading zero'}, or quote it for a string",
            node.start_mark)
    return value


StrictLoader.add_constructor("tag:yaml.org,2002:int", _plain_number)
StrictLoader.add_constructor("tag:yaml.org,2002:float", _plain_number)


MAX_VALUES = 100_000  # a recipe's values once its aliases are expanded: far more than any recipe needs


def expanded_values(value: Any, sizes: dict[int, int] | None = None) -> int:
    """How many values ``value`` holds once YAML's aliases are expanded (each shared part counted where it is used,
    computed once): what writing it out or walking it costs."""
    if not isinstance(value, (dict, list)):
        return 1
    sizes = {} if sizes is None else sizes
    if id(value) not in sizes:
        parts = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = 1 + sum(expanded_values(part, sizes) for part in parts)
    return sizes[id(value)]


def parse_yaml(text: str) -> Any:
    """YAML text as Python values, refusing duplicate keys (see :class:`StrictLoader`) and aliases that expand
    beyond :data:`MAX_VALUES` values (a few hundred bytes of nested aliases make billions: a "billion laughs")."""
    loader = StrictLoader(text)  # a SafeLoader: plain values only, never objects
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    count = expanded_values(data)
    if count > MAX_VALUES:
        raise yaml.YAMLError(f"its aliases expand to {count:,} values (more than {MAX_VALUES:,}); write the values "
                             "out, or use fewer nested aliases")
    return data
