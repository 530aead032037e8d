"""Whole-model quantization on tiny transformers models built from configs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from torch import nn

import slimtune
from slimtune.quant import (
    Linear4bit,
    Linear8bit,
    QuantConfig,
    QuantizedLinear,
    dequantize_model,
    load_quantized,
    quant_summary,
    quantize,
    requantization_error,
)
from slimtune.quant.model import absmax_int4_error, forget_quantization


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_quantized_llama_is_close_and_equals_its_dequantized_self(make_llama, input_ids):
    model = make_llama()
    ref = model(input_ids).logits
    q = quantize(copy.deepcopy(model), QuantConfig())
    assert isinstance(q.model.layers[0].self_attn.q_proj, Linear4bit)
    assert type(q.lm_head) is nn.Linear  # the output head stays full precision
    out = q(input_ids).logits
    assert _rel_err(out, ref) < 0.15
    deq = dequantize_model(copy.deepcopy(q))
    assert not any(isinstance(m, QuantizedLinear) for m in deq.modules())
    torch.testing.assert_close(deq(input_ids).logits, out, atol=1e-5, rtol=1e-5)
    q8 = quantize(copy.deepcopy(model), QuantConfig(bits=8))
    assert isinstance(q8.model.layers[1].mlp.down_proj, Linear8bit)
    assert _rel_err(q8(input_ids).logits, ref) < _rel_err(out, ref) / 4


def test_summary_counts_layers_bytes_and_kept_modules(make_llama):
    q = quantize(make_llama(), QuantConfig(skip_modules=["lm_head", "down_proj"]))
    s = quant_summary(q)
    assert s.layers == 2 * 6  # q, k, v, o, gate, up per layer; down_proj skipped
    assert s.unquantized == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    assert s.params == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 2)
    assert s.bytes_before == 4 * s.params
    assert 4.1 < s.bits_per_param < 4.3 and "12 linear layers" in str(s)


def test_quantizing_twice_is_refused(make_llama):
    q = quantize(make_llama())
    with pytest.raises(ValueError, match=r"already quantized \(14 quantized layers"):
        quantize(q)


def test_tied_output_head_is_skipped_by_default(make_llama, input_ids):
    model = make_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    q = quantize(model, QuantConfig(skip_modules=[]))  # the output embedding is skipped regardless
    assert type(q.lm_head) is nn.Linear and q.lm_head.weight is q.model.embed_tokens.weight


@torch.no_grad()
def test_gpt2_conv1d_layers_are_quantized():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 100, (2, 10))
    ref = model(ids).logits
    q = quantize(copy.deepcopy(model), QuantConfig())
    assert isinstance(q.transformer.h[0].attn.c_attn, Linear4bit)
    assert q.transformer.h[0].attn.c_attn.out_features == 192
    assert _rel_err(q(ids).logits, ref) < 0.15


def test_requantization_error_orders_the_formats():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    nf4 = requantization_error(w, QuantConfig())
    fp4 = requantization_error(w, QuantConfig(quant_type="fp4", double_quant=False))
    int8 = requantization_error(w, QuantConfig(bits=8))
    int4 = absmax_int4_error(w, 64)
    assert int8["rel_frobenius"] < nf4["rel_frobenius"] < fp4["rel_frobenius"]
    assert nf4["rel_frobenius"] < int4["rel_frobenius"]
    assert nf4["bits_per_param"] < fp4["bits_per_param"] == pytest.approx(4.5)


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(double_quant=False), QuantConfig(bits=8)],
                         ids=["nf4-dq", "nf4", "int8"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_an_inf_or_nan_weight_is_refused_and_the_model_left_unchanged(make_llama, config, bad, tmp_path):
    """One inf weight would turn its block (with double quant: its whole layer) into NaN; refused, naming the
    layer, before any layer is quantized; the streaming load refuses it too."""
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj: the weight has inf or NaN values"):
        quantize(model, config)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in model.modules())
    assert all(torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: the weight has inf or NaN values in 1 "):
        load_quantized(lambda: AutoModelForCausalLM.from_config(model.config), tmp_path, config)


@pytest.mark.parametrize("extra, what", [(lambda: nn.Linear(5, 5, dtype=torch.float64), "is torch.float64"),
                                         (lambda: nn.Linear(32, 0), r"is empty \(0, 32\)")], ids=["float64", "empty"])
def test_a_layer_that_cannot_be_quantized_is_refused_before_any_is(make_llama, extra, what):
    """A layer registered after the decoder that cannot be quantized: refused before the others change (they were
    quantized first, and a retry skipping it was refused as "already quantized")."""
    model = make_llama()
    model.extra = extra()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"extra: the weight {what}, .*the model is unchanged.*skip_modules"):
        quantize(model, QuantConfig())
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    quantize(model, QuantConfig(skip_modules=["extra"]))
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit) and type(model.extra) is nn.Linear


def test_a_model_holding_adapters_is_refused(make_llama):
    """Quantizing after add_adapter would turn the adapters' own A and B into frozen 4-bit layers (also when a part of
    the model is given alone)."""
    model = slimtune.add_adapter(make_llama(), slimtune.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds slimtune adapters \['default'\]: quantize the base model before"):
        quantize(model, QuantConfig())
    with pytest.raises(ValueError, match=r"holds an adapter \(layers.0.self_attn.q_proj.base_layer\)"):
        quantize(model.model, QuantConfig())
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_an_empty_layer_stays_quantizable_to_8_bits_where_it_has_inputs(make_llama):
    model = make_llama()
    model.extra = nn.Linear(32, 0)
    quantize(model, QuantConfig(bits=8))
    assert isinstance(model.extra, Linear8bit)
    model = make_llama()
    model.extra = nn.Linear(0, 8)  # row scales over no inputs: refused before any layer changes
    with pytest.raises(ValueError, match=r"extra: the weight is empty \(8, 0\).*the model is unchanged"):
        quantize(model, QuantConfig(bits=8))
    assert not any(isinstance(m, Linear8bit) for m in model.modules())


def test_a_weight_that_overflows_the_dtype_asked_for_is_named_as_such(make_llama, tmp_path):
    """A finite fp32 weight of 1e6 loaded as fp16 becomes inf: the error says the cast overflowed, not the file."""
    from transformers import AutoModelForCausalLM

    model = make_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"up_proj.weight: its torch.float32 values overflow torch.float16 \(largest "
                                         r"\|value\| 1e\+06\); load the model in a wider dtype"):
        load_quantized(lambda: AutoModelForCausalLM.from_config(model.config, dtype=torch.float16), tmp_path,
                       QuantConfig())


def _phimoe():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    torch.manual_seed(0)
    return PhimoeForCausalLM(PhimoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                          num_experts_per_tok=2)).eval()


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                        conv_kernel=4, time_step_rank=4)).eval()


def _gated_deltanet():
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    return Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])).eval()


@pytest.mark.parametrize("build, kept, quantized", [
    (_phimoe, "model.layers.0.mlp.router", "model.layers.0.self_attn.q_proj"),  # a router with its own forward
    (_mamba, "backbone.layers.0.mixer.dt_proj", "backbone.layers.0.mixer.in_proj"),  # a weight read as a tensor
    (_gated_deltanet, "lm_head", "model.layers.0.linear_attn.out_proj"),  # A_log without Mamba's D: called, quantized
], ids=["router", "mamba", "gated deltanet"])
def test_layers_a_quantized_layer_cannot_stand_in_for_stay_in_full_precision(build, kept, quantized):
    if build is _phimoe and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4's PhiMoE has no router module of its own (its gate is block_sparse_moe.gate)")
    model = build()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits
        quantize(model, QuantConfig())
        after = model(ids).logits  # runs (the packed weight read as a tensor, or a router's tuple, broke it)
    assert type(model.get_submodule(kept)) is not Linear4bit and isinstance(model.get_submodule(quantized), Linear4bit)
    assert torch.isfinite(after).all() and (after - before).abs().max() < 0.5


def test_a_model_forgetting_its_quantization_writes_its_config(make_llama):
    """transformers 4 records the dtype before quantization as a torch.dtype (``_pre_quantization_dtype``), which its
    JSON writer drops only beside a quantization_config: once that is gone, save_pretrained failed on it."""
    model = make_llama()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    model.config._pre_quantization_dtype = torch.float16
    forget_quantization(model)
    assert not getattr(model.config, "quantization_config", None)
    assert "_pre_quantization_dtype" not in vars(model.config)
    json.loads(model.config.to_json_string())
