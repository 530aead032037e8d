"""State-dict (de)serialization of quantized layers in transformers+bitsandbytes' key layout.

4-bit layer at prefix P (keys as ``Params4bit`` / ``QuantState.as_dict(packed=True)`` write them):
  ``P.weight``                       uint8 ((n + 1) // 2, 1)  packed codes, first in the high nibble
  ``P.bias``                         optional
  ``P.weight.absmax``                uint8 (nb,) with double quant, fp32 (nb,) without
  ``P.weight.quant_map``             fp32 (16,)   the 4-bit code book
  ``P.weight.nested_absmax``         fp32 (ceil(nb / 256),)   double quant only
  ``P.weight.nested_quant_map``      fp32 (256,)  the 8-bit dynamic map, double quant only
  ``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``)  uint8 UTF-8 JSON: quant_type, blocksize,
      dtype, shape, and with double quant nested_blocksize, nested_dtype, nested_offset.
8-bit layer: ``P.weight`` int8 (out, in), ``P.SCB`` fp32 (out,), ``P.weight_format`` uint8 0 ("row").

bitsandbytes' own layers (``Linear4bit`` / ``Linear8bitLt``, what transformers' ``from_pretrained`` makes with a
``BitsAndBytesConfig``) write this layout from their ``state_dict()``: :func:`bitsandbytes_state` reads it, so
slimtune decodes their weights with its own arithmetic, without importing bitsandbytes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from slimtune.core.dtypes import dtype_name, parse_dtype
from slimtune.core.modules import weight_of
from slimtune.quant.codebooks import QUANT_TYPES
from slimtune.quant.nf4 import BLOCKSIZES, NESTED_BLOCKSIZE

__all__ = ["write_4bit_state", "read_4bit_state", "write_8bit_state", "read_8bit_state", "quant_state_key",
           "is_4bit_prefix", "is_8bit_prefix", "is_bitsandbytes_layer", "is_bitsandbytes_quantized",
           "bitsandbytes_state"]

_QS = "weight.quant_state.bitsandbytes__"


def quant_state_key(prefix: str, quant_type: str) -> str:
    return prefix + _QS + quant_type


def is_4bit_prefix(keys, prefix: str) -> bool:
    return any(quant_state_key(prefix, qt) in keys for qt in QUANT_TYPES)


def is_8bit_prefix(keys, prefix: str) -> bool:
    return prefix + "SCB" in keys


def is_bitsandbytes_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of bitsandbytes' linear layers, its weight quantized or not (an 8-bit layer keeping
    16-bit weights, ``has_fp16_weights=True``)."""
    return isinstance(module, nn.Linear) and type(module).__module__.split(".")[0] == "bitsandbytes"


def is_bitsandbytes_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer holding a quantized weight: a quantized ``Params4bit`` (its
    packed bytes may be stored in a float ``quant_storage`` dtype, bf16 …) or an ``Int8Params`` holding int8 codes
    (not one kept in fp16, ``has_fp16_weights=True``). Such layers subclass ``nn.Linear``, yet their ``weight`` is
    no (out, in) matrix of values. (An adapter wrapper around one, which shows its base layer's weight, is not.)"""
    if not isinstance(module, nn.Linear):
        return False
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit":
        return getattr(weight, "quant_state", None) is not None  # (None until bitsandbytes quantized it)
    return kind == "Int8Params" and isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def bitsandbytes_state(linear: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state of a linear layer whose weight bitsandbytes quantized (:func:`is_bitsandbytes_quantized`), from its
    own ``state_dict()``, in the layout :func:`read_4bit_state` / :func:`read_8bit_state` read; None for a
    full-precision layer. Raises for a layer with a weight that is not floating point in another layout."""
    if not is_bitsandbytes_quantized(linear) and weight_of(linear).is_floating_point():
        return None
    state = dict(linear.state_dict())
    if not (is_4bit_prefix(state, "") or is_8bit_prefix(state, "")):
        raise ValueError(f"its weight is {weight_of(linear).dtype}, not a full-precision weight, and the layer "
                         f"({type(linear).__module__}.{type(linear).__name__}) holds no 4-bit or 8-bit state in "
                         "bitsandbytes' layout: quantize the full-precision model instead")
    return state


def _out(t: torch.Tensor, keep_vars: bool) -> torch.Tensor:
    return t if keep_vars else t.detach()


def write_4bit_state(layer, dest: dict, prefix: str, keep_vars: bool) -> None:
    dest[prefix + "weight"] = _out(layer.weight, keep_vars)
    if layer.bias is not None:
        dest[prefix + "bias"] = _out(layer.bias, keep_vars)
    dest[prefix + "weight.absmax"] = _out(layer.absmax, keep_vars)
    dest[prefix + "weight.quant_map"] = _out(layer.quant_map, keep_vars)
    meta: dict[str, Any] = {"quant_type": layer.quant_type, "blocksize": layer.blocksize,
                            "dtype": dtype_name(layer.dtype), "shape": [layer.out_features, layer.in_features]}
    if layer.double_quant:
        dest[prefix + "weight.nested_absmax"] = _out(layer.nested_absmax, keep_vars)
        dest[prefix + "weight.nested_quant_map"] = _out(layer.nested_quant_map, keep_vars)
        offset = 0.0 if layer.nested_offset.is_meta else layer.nested_offset.item()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    # json.dumps' default separators give byte-identical blobs to bitsandbytes' pack_dict_to_tensor.
    blob = json.dumps(meta).encode("utf-8")
    dest[quant_state_key(prefix, layer.quant_type)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _require(state_dict: dict, key: str, why: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"quantized checkpoint is missing key {key!r} ({why})")
    return state_dict[key]


def _check_numel(key: str, t: torch.Tensor, numel: int, detail: str) -> None:
    if t.numel() != numel:
        raise ValueError(f"{key} has {t.numel()} values but {detail} needs {numel}")


def read_4bit_state(state_dict: dict, prefix: str, shape: tuple[int, int], unexpected: list[str]) -> dict:
    """Validate and decode the 4-bit state at ``prefix`` for a layer of weight ``shape`` (out, in)."""
    own = [k for k in state_dict if k.startswith(prefix + _QS)]
    if not own:
        w = state_dict[prefix + "weight"]
        raise ValueError(f"{prefix}weight is a {w.dtype} tensor of shape {tuple(w.shape)} without a 4-bit quant "
                         f"state (expected key {quant_state_key(prefix, 'nf4')!r} or ...__fp4); load full-precision "
                         "weights with load_quantized(..., config=QuantConfig(...)) to quantize them")
    if len(own) > 1:
        raise ValueError(f"several 4-bit quant states for {prefix!r}: {own}")
    qs_key = own[0]
    quant_type = qs_key[len(prefix + _QS):]
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{qs_key}: quant type {quant_type!r} is not supported; use one of {list(QUANT_TYPES)}")
    try:
        meta = json.loads(bytes(state_dict[qs_key].to(torch.uint8).cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{qs_key} is not a UTF-8 JSON quant state: {e}") from None
    if meta.get("quant_type", quant_type) != quant_type:
        raise ValueError(f"{qs_key} says quant_type={meta['quant_type']!r}, its key says {quant_type!r}")
    blocksize = meta.get("blocksize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{qs_key}: blocksize={blocksize!r} is not supported; use one of {list(BLOCKSIZES)}")
    stored_shape = tuple(meta.get("shape") or ())
    if stored_shape != tuple(shape):
        raise ValueError(f"{qs_key}: the stored weight has shape {list(stored_shape)} but the module at "
                         f"{prefix.rstrip('.')!r} is (out_features, in_features) = {tuple(shape)}")
    n = shape[0] * shape[1]
    nb = -(-n // blocksize)
    weight = state_dict[prefix + "weight"]
    if weight.dtype != torch.uint8:  # bitsandbytes' quant_storage may hold the bytes in a wider dtype
        weight = weight.contiguous().view(-1).view(torch.uint8)
    weight = weight.reshape(-1, 1)
    _check_numel(prefix + "weight", weight, (n + 1) // 2, f"a packed {tuple(shape)} weight")
    absmax = _require(state_dict, prefix + "weight.absmax", "per-block scales")
    _check_numel(prefix + "weight.absmax", absmax, nb, f"blocksize {blocksize} over {n} weights")
    quant_map = _require(state_dict, prefix + "weight.quant_map", "the 4-bit code book").float()
    _check_numel(prefix + "weight.quant_map", quant_map, 16, "a 4-bit code book")
    state = {"weight": weight, "quant_type": quant_type, "blocksize": blocksize, "quant_map": quant_map,
             "dtype": parse_dtype(meta.get("dtype", "float32"), f"{qs_key} dtype")}
    known = {prefix + "weight", prefix + "bias", prefix + "weight.absmax", prefix + "weight.quant_map", qs_key}
    nested = "nested_offset" in meta or prefix + "weight.nested_absmax" in state_dict
    if nested:
        if "nested_offset" not in meta:
            raise ValueError(f"{qs_key} lacks 'nested_offset' although {prefix}weight.nested_absmax is present")
        if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise ValueError(f"{qs_key}: nested_blocksize={meta['nested_blocksize']!r} is not supported; "
                             f"bitsandbytes and slimtune use {NESTED_BLOCKSIZE}")
        state["nested_absmax"] = _require(state_dict, prefix + "weight.nested_absmax", "double quantization").float()
        _check_numel(prefix + "weight.nested_absmax", state["nested_absmax"], -(-nb // NESTED_BLOCKSIZE),
                     f"{nb} block scales in groups of {NESTED_BLOCKSIZE}")
        state["nested_quant_map"] = _require(state_dict, prefix + "weight.nested_quant_map",
                                             "double quantization").float()
        _check_numel(prefix + "weight.nested_quant_map", state["nested_quant_map"], 256, "an 8-bit map")
        state["nested_offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        state["absmax"] = absmax.to(torch.uint8).reshape(-1)
        known |= {prefix + "weight.nested_absmax", prefix + "weight.nested_quant_map"}
    else:
        state["absmax"] = absmax.float().reshape(-1)
    for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"):
        _check_finite(f"{prefix}weight.{name}", state.get(name))
    unexpected.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
    return state


def _check_finite(key: str, value: torch.Tensor | None) -> None:
    """Refuse a quantization statistic holding inf or NaN: every weight it scales would decode to NaN."""
    if value is not None and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{key} holds inf/NaN values: the checkpoint is damaged (the layer's weights would decode "
                         "to NaN); use another copy of it.")


def write_8bit_state(layer, dest: dict, prefix: str, keep_vars: bool) -> None:
    dest[prefix + "weight"] = _out(layer.weight, keep_vars)
    if layer.bias is not None:
        dest[prefix + "bias"] = _out(layer.bias, keep_vars)
    dest[prefix + "SCB"] = _out(layer.SCB, keep_vars)
    dest[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # bitsandbytes: 0 = "row"


def read_8bit_state(state_dict: dict, prefix: str, shape: tuple[int, int],
                    unexpected: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    weight = state_dict[prefix + "weight"]
    scb = _require(state_dict, prefix + "SCB", "row scales of an 8-bit weight")
    if weight.dtype != torch.int8:
        raise ValueError(f"{prefix}weight is {weight.dtype}; an 8-bit layer stores int8")
    if tuple(weight.shape) != tuple(shape) or tuple(scb.shape) != (shape[0],):
        raise ValueError(f"8-bit state at {prefix.rstrip('.')!r}: weight {tuple(weight.shape)} and SCB "
                         f"{tuple(scb.shape)} do not fit the module's (out, in) = {tuple(shape)}")
    fmt = state_dict.get(prefix + "weight_format", 0)
    fmt = fmt.item() if isinstance(fmt, torch.Tensor) else fmt
    if fmt not in (0, "row"):
        raise ValueError(f"{prefix}weight_format={fmt!r} is not supported; only row-major (0 / 'row') is")
    _check_finite(prefix + "SCB", scb)
    known = {prefix + "weight", prefix + "bias", prefix + "SCB", prefix + "weight_format"}
    unexpected.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
    return weight, scb.float()
