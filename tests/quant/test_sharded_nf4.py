"""The row layout of a 4-bit layer's storage (slimtune.quant.sharded_nf4): the same bytes and the same decode,
with each row holding whole quantization blocks and their scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtune.quant import Linear4bit
from slimtune.quant.sharded_nf4 import make_model_shardable, make_shardable


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
