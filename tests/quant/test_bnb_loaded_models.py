"""Models transformers loaded through bitsandbytes (``from_pretrained(..., quantization_config=...)``): merging into
their layers, dequantizing and exporting them give what the adapted model computes, and plain folders."""

from __future__ import annotations

import pytest
import torch
from oracles import bitsandbytes_oracle
from tiny_models import tiny_gpt2, tiny_llama

import slimtune
from slimtune.export import merge_for_export
from slimtune.quant import dequantize_model

IDS = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))


def _loaded(base, folder, dtype=torch.float32, **options):
    bitsandbytes_oracle()
    from transformers import BitsAndBytesConfig

    base.save_pretrained(folder)
    return type(base).from_pretrained(folder, quantization_config=BitsAndBytesConfig(**options), device_map="cpu",
                                      dtype=dtype).eval()


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_merging_into_8bit_layers_that_keep_16bit_weights_uses_the_merged_weight(tmp_path):
    """Such a layer caches its weight's int8 codes at its first forward: a merge must drop them (as PEFT's does),
    or the merged model computes the base's outputs."""
    model = _loaded(tiny_llama(), tmp_path, load_in_8bit=True, llm_int8_has_fp16_weight=True)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_lora_weights=False))
    with slimtune.disable_adapters(model):
        base = _logits(model)
    adapted = _logits(model)  # (the codes are cached from here on)
    assert (adapted - base).abs().max() > 0.1
    merged = _logits(slimtune.merge_and_unload(model))
    assert (merged - adapted).abs().max() < 0.05 < (merged - base).abs().max()


FOUR_BITS = {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32}
SIXTEEN_BIT_WEIGHTS = {"load_in_8bit": True, "llm_int8_has_fp16_weight": True}


@pytest.mark.parametrize("family, options", [("llama", FOUR_BITS), ("gpt2", FOUR_BITS), ("gpt2", SIXTEEN_BIT_WEIGHTS)],
                         ids=["llama-4bit", "gpt2-4bit", "gpt2-8bit-16-bit-weights"])
def test_an_export_of_a_bitsandbytes_model_is_a_plain_folder_with_its_layers(family, options, tmp_path):
    """merge_for_export drops transformers' quantization marks (the saved folder would load quantized again) and
    gives GPT-2's Conv1D layers back (a folder of nn.Linear weights loads transposed or not at all), also from
    8-bit layers that keep 16-bit weights."""
    build = tiny_llama if family == "llama" else tiny_gpt2
    model = _loaded(build(), tmp_path / "base", **options)
    targets = ["q_proj", "v_proj"] if family == "llama" else ["c_attn", "c_proj", "c_fc"]
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    adapted = _logits(model)
    merged, report = merge_for_export(model)
    assert (report.dequantized_layers > 0) == (options is FOUR_BITS)  # (16-bit weights are no quantized layers)
    assert not getattr(merged.config, "quantization_config", None)
    merged.save_pretrained(tmp_path / "merged")
    back = type(merged).from_pretrained(tmp_path / "merged").eval()
    if family == "gpt2":
        from transformers.pytorch_utils import Conv1D

        assert isinstance(back.transformer.h[0].attn.c_attn, Conv1D)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in back.modules())
    # (8-bit layers compute with int8 codes of their 16-bit weights; the export, with the weights)
    torch.testing.assert_close(_logits(back), adapted, atol=1e-4 if options is FOUR_BITS else 1e-2, rtol=0)


def test_dequantizing_an_8bit_model_keeps_the_models_dtype(tmp_path):
    model = _loaded(tiny_llama(), tmp_path, dtype=torch.bfloat16, load_in_8bit=True)
    dequantize_model(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(model)).all()  # (float32 layers in a bf16 model failed: mixed dtypes)
