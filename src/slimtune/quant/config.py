"""``QuantConfig``: how to quantize a model's linear layers (QLoRA defaults, not bitsandbytes').

bitsandbytes and transformers default to FP4, no double quantization and fp32 compute; QLoRA
(Dettmers et al. 2023) uses NF4 + double quantization + bf16 compute, which is what we default to
(fp32 compute on CPUs, which lack fast bf16 matmuls).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from slimtune.core.dtypes import default_compute_dtype, dtype_name, parse_dtype
from slimtune.quant.codebooks import QUANT_TYPES
from slimtune.quant.nf4 import BLOCKSIZES

__all__ = ["QuantConfig", "DEFAULT_SKIP_MODULES", "stored_quantization"]

# The output head stays in full precision (QLoRA keeps it 16-bit; it is often tied to the embedding).
DEFAULT_SKIP_MODULES = ("lm_head",)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class QuantConfig:
    """Quantization of the frozen base model.

    Args:
        bits: 4 (NF4 / FP4 block-wise, QLoRA) or 8 (row-wise absmax int8, LLM.int8() storage).
        quant_type: "nf4" (normal float, best for normally distributed weights) or "fp4" (4-bit only: with
            bits=8 it must stay "nf4", the default).
        double_quant: quantize the per-block scales too (4-bit only; ~0.37 bits per weight saved; bits=8
            ignores it).
        blocksize: weights per scale for 4-bit, a power of two from 32 to 4096 (4-bit only: with bits=8
            it must stay 64, the default).
        compute_dtype: dtype of the matmuls: "bfloat16" | "float16" | "float32" or a torch dtype;
            None picks bf16 on CUDA and fp32 on CPU when the model is quantized.
        skip_modules: module names kept in full precision; a module is skipped when its name equals
            an entry or ends with "." + entry, and everything inside it too. None = ["lm_head"]
            (the model's output embedding is always skipped as well).
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str | torch.dtype | None = None
    skip_modules: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r} is not supported; use 4 (NF4/FP4) or 8 (int8), an int")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; use one of {list(QUANT_TYPES)}")
        if not _is_int(self.blocksize) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize!r} is not supported; use an integer power of two from 32 "
                             f"to 4096: {list(BLOCKSIZES)}")
        if self.bits == 8 and (self.quant_type != "nf4" or self.blocksize != 64):
            changed = [f"{name}={value!r}" for name, value, default in (("quant_type", self.quant_type, "nf4"),
                                                                        ("blocksize", self.blocksize, 64))
                       if value != default]
            what, them = ("4-bit options", "them") if len(changed) > 1 else ("a 4-bit option", "it")
            raise ValueError(f"{' and '.join(changed)}: {what}; bits=8 stores row-wise int8 and would ignore {them}: "
                             "leave quant_type and blocksize at their defaults (\"nf4\", 64) with bits=8, or use "
                             "bits=4")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False")
        if self.compute_dtype is not None:
            self.compute_dtype = parse_dtype(self.compute_dtype, "compute_dtype")
        if self.skip_modules is None:
            self.skip_modules = list(DEFAULT_SKIP_MODULES)
        elif isinstance(self.skip_modules, str) or not all(isinstance(m, str) for m in self.skip_modules):
            raise ValueError(f"skip_modules={self.skip_modules!r} must be a list of module names, e.g. ['lm_head']")
        else:
            self.skip_modules = list(self.skip_modules)

    def resolved_compute_dtype(self, device: torch.device | str | None) -> torch.dtype:
        if self.compute_dtype is not None:
            assert isinstance(self.compute_dtype, torch.dtype)
            return self.compute_dtype
        return default_compute_dtype(device)

    def skips(self, name: str) -> bool:
        """Whether the module called ``name`` stays in full precision."""
        skip_modules = self.skip_modules
        assert skip_modules is not None  # __post_init__ sets the default list
        return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or f".{s}." in f".{name}"
                   for s in skip_modules)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.compute_dtype is not None:
            assert isinstance(self.compute_dtype, torch.dtype)  # __post_init__ parsed it
            d["compute_dtype"] = dtype_name(self.compute_dtype)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        unknown = set(d) - {"bits", "quant_type", "double_quant", "blocksize", "compute_dtype", "skip_modules"}
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; allowed: bits, quant_type, "
                             "double_quant, blocksize, compute_dtype, skip_modules")
        return cls(**d)


def stored_quantization(config: Any) -> QuantConfig | None:
    """What a checkpoint quantized by transformers + bitsandbytes says of itself (``config.json``'s
    ``quantization_config``; ``config``: that file's dict or a transformers config), None for any other checkpoint.
    Its layers load as stored: the fields describe them (bitsandbytes' defaults: FP4, no double quantization)."""
    stored = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                         None)
    if stored is not None and not isinstance(stored, dict):
        stored = stored.to_dict()  # a transformers BitsAndBytesConfig
    bitsandbytes = stored and (stored.get("load_in_4bit") or stored.get("load_in_8bit"))
    if not stored or stored.get("quant_method", "bitsandbytes" if bitsandbytes else None) != "bitsandbytes":
        return None  # (transformers before 4.32 wrote no quant_method; it reads such a config as bitsandbytes')
    skip = stored.get("llm_int8_skip_modules")
    if stored.get("load_in_8bit"):
        return QuantConfig(bits=8, skip_modules=skip)
    if not stored.get("load_in_4bit"):
        return None
    return QuantConfig(bits=4, quant_type=stored.get("bnb_4bit_quant_type") or "fp4",
                       double_quant=bool(stored.get("bnb_4bit_use_double_quant")), skip_modules=skip)
