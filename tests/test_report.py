"""trainable_parameters: quantized weights count by their logical size, however they are stored."""

from __future__ import annotations

import copy

import torch
from oracles import bitsandbytes_oracle
from tiny_models import tiny_llama
from torch import nn

import slimtune
from slimtune.quant import QuantConfig, quantize
from slimtune.quant.sharded_nf4 import make_model_shardable


def _full_precision_total() -> int:
    return sum(p.numel() for p in tiny_llama().parameters())


def test_a_4bit_model_counts_as_many_weights_as_its_full_precision_self_also_when_fsdp_can_shard_it():
    model = quantize(tiny_llama(), QuantConfig(bits=4, blocksize=32))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    before = slimtune.trainable_parameters(model)
    assert before.total == _full_precision_total() + before.trainable
    assert make_model_shardable(model) > 0  # codes and scales become (frozen) parameters: still the same weights
    assert slimtune.trainable_parameters(model).total == before.total


def test_bitsandbytes_4bit_weights_count_as_peft_counts_them():
    """A model quantized by bitsandbytes (a Params4bit packs two weights per byte): PEFT's total."""
    bnb = bitsandbytes_oracle()
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    fp_total = sum(p.numel() for p in base.parameters())
    for module in list(base.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in ("gate_proj", "down_proj"):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.float32, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.detach().clone(), requires_grad=False,
                                                 blocksize=64, quant_type="nf4")
                setattr(module, child_name, layer.to("cpu"))  # moving a Params4bit to a device quantizes it
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"]))
    ours = slimtune.add_adapter(base, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    report = slimtune.trainable_parameters(ours)
    assert report.total == fp_total + report.trainable
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
