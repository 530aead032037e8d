"""The row layout of a 4-bit layer's storage (slimtune.quant.sharded_nf4): the same bytes and the same decode,
with each row holding whole quantization blocks and their scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtune.quant import Linear4bit
from slimtune.quant.sharded_nf4 import double_quantize_rows, make_model_shardable, make_shardable, quantize_rows


@pytest.mark.parametrize("double_quant", [True, False])
def test_row_layout_keeps_the_bytes_and_the_decode(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(256, 48, bias=True)
    layer = Linear4bit.from_linear(linear, double_quant=double_quant, blocksize=64, compute_dtype=torch.float32)
    flat_weight, flat_absmax, before = layer.weight.clone(), layer.absmax.clone(), layer.dequantize()
    make_shardable(layer)
    assert isinstance(layer.weight, nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.shape == (48, 128) and layer.absmax.shape == (48, 4)
    assert torch.equal(layer.weight.reshape(-1, 1), flat_weight) and torch.equal(layer.absmax.reshape(-1), flat_absmax)
    assert torch.equal(layer.dequantize(), before)
    rows = slice(20, 30)  # any range of rows: whole blocks, with their own scales
    block_rows = layer.dequantize()[rows]
    assert torch.equal(block_rows, before[rows])
    assert "weight" not in dict(layer.named_buffers())
    x = torch.randn(3, 256)
    assert torch.equal(layer(x), layer.float()(x))


def test_layers_whose_rows_are_not_whole_blocks_stay_as_they_are():
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(96, 8), blocksize=64),
                          Linear4bit.from_linear(nn.Linear(128, 8), blocksize=64))
    assert make_model_shardable(model) == 1
    assert not isinstance(model[0].weight, nn.Parameter) and isinstance(model[1].weight, nn.Parameter)
    with pytest.raises(ValueError, match="not a multiple of blocksize"):
        make_shardable(model[0])


def test_rows_quantized_alone_are_the_rows_of_the_whole_layer():
    """Whole blocks per row: a range of rows quantizes as in the whole weight; double quantization needs the
    whole layer's scales (its offset is their mean) and keeps the codes of the rows."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 301)  # 4 blocks of 32 per row: 1,204 scales, 5 nested blocks of 256
    layer = Linear4bit.from_linear(linear, double_quant=True, blocksize=32, compute_dtype=torch.float32)
    make_shardable(layer)
    start, stop = 151, 301
    packed, absmax = quantize_rows(linear.weight[start:stop].detach(), "nf4", 32)
    assert torch.equal(packed, layer.weight[start:stop])
    _, whole_absmax = quantize_rows(linear.weight.detach(), "nf4", 32)
    codes, nested, offset = double_quantize_rows(whole_absmax, start, stop)
    assert torch.equal(codes, layer.absmax[start:stop])
    assert torch.equal(nested, layer.nested_absmax) and torch.equal(offset, layer.nested_offset)
    local_only, _, local_offset = double_quantize_rows(absmax, 0, stop - start)  # what a rank alone would get
    assert not torch.equal(local_offset, layer.nested_offset) and not torch.equal(local_only, codes)
    assert quantize_rows(linear.weight[:0].detach(), "nf4", 32)[0].shape == (0, 64)
