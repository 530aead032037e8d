"""Code books of bitsandbytes' 4-bit and 8-bit data types, built as plain tensors.

- NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314): 16 quantiles of N(0, 1) with outer
  quantile 0.9677083, normalised to [-1, 1]; 7 negative values, an exact zero, 8 positive values.
  Stored ascending, so the 4-bit index is the rank of the value.
- FP4: bitsandbytes' own 1-sign / 2-exponent / 1-mantissa float (exponent bias 2, not OCP E2M1),
  in bit-pattern order ``[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12`` and the negations for indices 8..15
  (bit 3 is the sign). Not sorted, so rounding goes through a sort permutation.
- Signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561): a dynamic exponent with a shrinking
  fraction; 256 values in [-0.993, 1]. Used for double quantization of the 4-bit block scales.

The values are checked against bitsandbytes' own tables in ``tests/quant``.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "NF4_VALUES",
    "FP4_VALUES",
    "QUANT_TYPES",
    "codebook",
    "dynamic_map",
    "rounding_table",
    "byte_pair_table",
]

QUANT_TYPES = ("nf4", "fp4")

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Unnormalised FP4 magnitudes in bit-pattern order; divided by 12 (the largest) in ``codebook``.
FP4_VALUES = (
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
    0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,  # code 8 (sign bit alone) is +0 in bitsandbytes too
)  # fmt: skip


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; use one of {list(QUANT_TYPES)}")
    return quant_type


@functools.cache
def _codebook_cpu(quant_type: str) -> torch.Tensor:
    check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
    # Division in fp32 by the largest magnitude, exactly as bitsandbytes normalises its table.
    return fp4 / fp4.abs().max()


def codebook(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 fp32 code values of ``quant_type`` ("nf4" | "fp4"), indexed by the 4-bit code."""
    return _codebook_cpu(quant_type).to(device or "cpu", copy=True)


# Grid of the fast nearest-code search: bins of width 2 / 16384 over [-1, 1]. Each bin (widened by
# fp32 rounding) holds at most one midpoint, since the closest midpoints (FP4 around 0) are 2.6e-3 apart.
GRID_BINS = 1 << 14


@functools.cache
def _rounding_table_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    code = _codebook_cpu(quant_type)
    # A stable sort keeps +0 (index 0) before -0 (index 8) for FP4, the order bitsandbytes gets.
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2  # (15,) fp32
    # grid[g] = number of midpoints below the lower edge of bin g (minus a margin larger than the
    # fp32 rounding of ``(x + 1) * GRID_BINS / 2``), so the bucket of x is grid[g] or grid[g] + 1.
    edges = torch.arange(GRID_BINS + 1, dtype=torch.float64) / (GRID_BINS / 2) - 1.0 - 1e-6
    grid = torch.searchsorted(midpoints.double(), edges, right=False).to(torch.uint8)  # (GRID_BINS + 1,)
    return midpoints, order.to(torch.uint8), grid


def rounding_table(quant_type: str, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(midpoints (15,) fp32, order (16,) uint8, grid (GRID_BINS + 1,) uint8)`` for rounding.

    The nearest code of a scaled value ``x`` is ``order[#{k: midpoints[k] < x}]``: a value exactly
    on a midpoint goes to the LOWER code (``torch.bucketize`` with right=False), the tie rule of
    bitsandbytes' CPU/torch path. ``grid`` turns that count into one table lookup and one
    comparison (see :func:`slimtune.quant.nf4.nearest_code`).
    """
    midpoints, order, grid = _rounding_table_cpu(quant_type)
    device = device or "cpu"
    return midpoints.to(device), order.to(device), grid.to(device)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """``(256, 2)`` table: byte ``b`` -> ``(code[b >> 4], code[b & 15])``.

    One gather per packed byte decodes both nibbles (high nibble = first element).
    """
    b = torch.arange(256, device=code.device)
    return torch.stack((code[b >> 4], code[b & 15]), dim=1)


def byte_pair_words(code: torch.Tensor) -> torch.Tensor:
    """:func:`byte_pair_table` as 256 eight-byte words (float64 holding the two fp32 values): gathering one
    word per byte from a 1-D table is ~4x faster on CPUs than gathering rows of two floats, bit for bit."""
    return byte_pair_table(code.float()).contiguous().view(torch.float64).view(256)


@functools.cache
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    values: list[float] = []
    # Exponent e = 10^(i - 6) for i = 0..6; each decade gets 2^i (signed) fraction steps, the
    # midpoints of a linspace over [0.1, 1]. All arithmetic in fp32, like bitsandbytes.
    for i in range(max_exponent_bits):
        steps = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    # additional_items = 2^(non_sign_bits - max_exponent_bits) - 1 = 0 for the 8-bit map.
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic quantization map (``create_dynamic_map(signed)``), (256,) fp32."""
    return _dynamic_map_cpu(signed).to(device or "cpu", copy=True)


@functools.cache
def dynamic_map_on(signed: bool, device: str) -> torch.Tensor:
    """:func:`dynamic_map` placed on ``device`` once and shared (read it, never write to it): for callers that
    decode on a GPU every step."""
    return _dynamic_map_cpu(signed).to(device, copy=True)
