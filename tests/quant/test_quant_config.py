"""QuantConfig: QLoRA defaults, validation messages, dict round trip, module skipping."""

from __future__ import annotations

import pytest
import torch

from slimtune.quant import QuantConfig


def test_defaults_are_qlora():
    c = QuantConfig()
    assert (c.bits, c.quant_type, c.double_quant, c.blocksize) == (4, "nf4", True, 64)
    assert c.skip_modules == ["lm_head"]
    assert c.resolved_compute_dtype("cpu") == torch.float32
    assert c.resolved_compute_dtype("cuda:0") == torch.bfloat16


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=3), r"bits=3 .*use 4 \(NF4/FP4\) or 8"),
    (dict(quant_type="int4"), r"quant_type='int4' .*\['nf4', 'fp4'\]"),
    (dict(blocksize=100), r"blocksize=100 .*power of two from 32 to 4096"),
    (dict(blocksize=8192), r"blocksize=8192"),
    (dict(compute_dtype="float64"), r"compute_dtype='float64' .*'bfloat16'"),
    (dict(skip_modules="lm_head"), r"skip_modules='lm_head' must be a list"),
    (dict(double_quant="yes"), r"double_quant='yes' must be True or False"),
    (dict(blocksize=64.0), r"blocksize=64.0 is not supported; use an integer power of two"),
    (dict(bits=4.0), r"bits=4.0 is not supported; use 4 .* an int"),
    (dict(bits=True), r"bits=True is not supported"),
    (dict(bits=8, quant_type="fp4"), r"^quant_type='fp4': a 4-bit option; bits=8 .*ignore"),  # (not the defaults)
    (dict(bits=8, blocksize=128), r"^blocksize=128: a 4-bit option"),
    (dict(bits=8, quant_type="fp4", blocksize=128), r"^quant_type='fp4' and blocksize=128: 4-bit options; .*them"),
])
def test_bad_values_are_named_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_compute_dtype_strings_and_dict_round_trip():
    c = QuantConfig(bits=4, quant_type="fp4", double_quant=False, blocksize=128, compute_dtype="bfloat16",
                    skip_modules=["lm_head", "score"])
    assert c.compute_dtype is torch.bfloat16
    d = c.to_dict()
    assert d["compute_dtype"] == "bfloat16" and d["skip_modules"] == ["lm_head", "score"]
    assert QuantConfig.from_dict(d) == c
    assert QuantConfig(compute_dtype=torch.float16).to_dict()["compute_dtype"] == "float16"
    with pytest.raises(ValueError, match=r"unknown QuantConfig fields \['load_in_4bit'\]"):
        QuantConfig.from_dict({"load_in_4bit": True})


def test_skip_matching_by_name_suffix_and_inside():
    c = QuantConfig(skip_modules=["lm_head", "mlp.down_proj"])
    assert c.skips("lm_head") and c.skips("model.lm_head")
    assert c.skips("model.layers.0.mlp.down_proj") and c.skips("lm_head.inner")
    assert not c.skips("model.layers.0.mlp.up_proj") and not c.skips("my_lm_head")


def test_stored_quantization_reads_what_bitsandbytes_wrote():
    """config.json's quantization_config as transformers writes it (quant_method missing before transformers 4.32,
    where it still means bitsandbytes); other methods and plain configs are not bitsandbytes'."""
    from slimtune.quant.config import stored_quantization

    four = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": ["lm_head", "q_proj"]}
    assert stored_quantization({"quantization_config": four}) == QuantConfig(
        bits=4, quant_type="nf4", double_quant=True, skip_modules=["lm_head", "q_proj"])
    assert stored_quantization({"quantization_config": {"load_in_4bit": True}}) == QuantConfig(
        bits=4, quant_type="fp4", double_quant=False)  # bitsandbytes' own defaults
    assert stored_quantization({"quantization_config": {"load_in_8bit": True}}).bits == 8
    for other in ({"quant_method": "gptq", "bits": 4}, {"quant_method": "awq"}, {}):
        assert stored_quantization({"quantization_config": other}) is None
    assert stored_quantization({"model_type": "llama"}) is None
