"""A 4-bit layer's storage in a block-aligned row layout, so that FSDP2 shards it like any weight.

:class:`~slimtune.quant.linear.Linear4bit` keeps its packed codes as a flat uint8 buffer ``((n + 1) // 2, 1)``
and its block scales as a flat buffer ``(nb,)``; FSDP2 does not shard buffers, so every rank would hold the
whole 4-bit base. :func:`make_shardable` re-registers both as frozen *parameters* in row layout:

    weight  uint8 (out_features, in_features // 2)          packed codes of output row i
    absmax  (out_features, in_features // blocksize)        the scales of row i's blocks (uint8 codes under
                                                             double quantization, else fp32)

A dim-0 shard (a range of rows, which is what ``fully_shard`` makes) therefore starts and ends on
quantization-block boundaries and carries exactly the scales of its own blocks: the quantization state
travels with its shard. FSDP2 all-gathers both as they are stored (integer parameters are never cast by a
mixed-precision policy; the packed bytes are never widened to a float type), in the same all-gather as the
rest of their decoder block, before its forward and again for its backward. Row-major flattening gives back
the original order, so the decode (:mod:`slimtune.quant.nf4`) is unchanged, bit for bit. The double
quantization's statistics — ``nested_absmax`` (one fp32 per 256 blocks) and ``offset`` — are 1/16384 of
the scales and stay replicated buffers: every rank has the same ones, the single-process values.

A rank can also quantize only its own rows (:func:`quantize_rows`): the blocks of a row never reach into
the next one, so the rows' codes and fp32 scales are those of the whole weight. Double quantization is the
exception: its offset is the mean of *all* the layer's block scales and its 256-scale blocks cross shard
boundaries, so :func:`double_quantize_rows` takes the whole layer's fp32 scales (all-gathered by the caller:
1/16 of the fp32 weight's bytes, for one layer at a time) and keeps the codes of the rank's rows.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.quant import nf4
from slimtune.quant.linear import Linear4bit

__all__ = ["can_shard", "make_shardable", "make_model_shardable", "quantize_rows", "double_quantize_rows"]


def can_shard(layer: Linear4bit) -> bool:
    """Whether ``layer``'s rows are whole blocks (``in_features`` a multiple of the block size: every LLM). A layer
    still on the meta device qualifies too (a sharded load lays it out before any rank fills its rows)."""
    return layer.in_features % layer.blocksize == 0


def make_shardable(layer: Linear4bit) -> None:
    """Re-register ``layer``'s packed codes and scales as frozen parameters in row layout (see above)."""
    if not can_shard(layer):
        raise ValueError(f"{layer!r}: in_features={layer.in_features} is not a multiple of blocksize="
                         f"{layer.blocksize}, so its rows are not whole quantization blocks.")
    rows = layer.out_features
    packed = layer.weight.reshape(rows, layer.in_features // 2)
    absmax = layer.absmax.reshape(rows, layer.in_features // layer.blocksize)
    layer.weight = nn.Parameter(packed, requires_grad=False)  # replaces the buffer of the same name
    layer.absmax = nn.Parameter(absmax, requires_grad=False)


def make_model_shardable(model: nn.Module) -> int:
    """:func:`make_shardable` on every 4-bit layer of ``model`` that allows it; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and not isinstance(m.weight, nn.Parameter)
              and can_shard(m)]
    for layer in layers:
        make_shardable(layer)
    return len(layers)


def quantize_rows(rows: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes and fp32 scales of some whole rows ``(k, in)`` of a weight, in row layout:
    ``(packed uint8 (k, in // 2), absmax fp32 (k, in // blocksize))``, bit for bit those rows of the whole
    weight's (``in`` a multiple of ``blocksize``)."""
    k, width = rows.shape
    if width % blocksize:
        raise ValueError(f"rows of {width} values are not whole blocks of {blocksize}; quantize the whole weight.")
    if k == 0:  # a rank with no rows of this layer (more ranks than rows)
        return rows.new_empty((0, width // 2), dtype=torch.uint8), rows.new_empty((0, width // blocksize),
                                                                                   dtype=torch.float32)
    packed, absmax = nf4.quantize_4bit(rows, quant_type, blocksize)
    return packed.view(k, width // 2), absmax.view(k, width // blocksize)


def double_quantize_rows(absmax: torch.Tensor, start: int, stop: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of a whole layer's fp32 block scales ``absmax (out, in // blocksize)``, as
    :func:`slimtune.quant.nf4.double_quantize` does it in one process; returns the uint8 codes of rows
    ``start:stop`` only, and the replicated ``nested_absmax`` and ``offset``."""
    codes, nested_absmax, offset = nf4.double_quantize(absmax.reshape(-1))
    return codes.view(absmax.shape)[start:stop].clone(), nested_absmax, offset
