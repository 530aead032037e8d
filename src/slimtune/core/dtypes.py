"""Dtypes by name, the default compute dtype, and devices: one rule for each, used everywhere."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """``"bfloat16"`` / ``"float32"`` / ``"float16"`` (``torch.`` prefix allowed) or such a torch dtype."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{what}={value!r} is not supported; use one of {list(DTYPES)}.")


def default_compute_dtype(device: torch.device | str | None) -> torch.dtype:
    """bf16 on CUDA (QLoRA's choice), fp32 elsewhere: CPUs without native bf16 run bf16 matmuls
    tens of times slower than fp32."""
    return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but no CUDA GPU is available; use 'auto' or 'cpu'.")
    return device
