"""Quantized checkpoints: slimtune round trip, streaming load from full precision, and checkpoints
written by transformers + bitsandbytes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from oracles import bitsandbytes_oracle
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimtune.quant import (
    Linear4bit,
    Linear8bit,
    QuantConfig,
    dequantize_model,
    init_empty_weights,
    load_in_4bit,
    load_quantized,
    load_quantized_checkpoint,
    load_quantized_from_state_dict,
    quantize,
    save_quantized,
)


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    """A tiny LLaMA saved by transformers in full precision."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("fp")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _factory(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    return lambda: AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(quant_type="fp4", double_quant=False, blocksize=128),
                                    QuantConfig(bits=8)], ids=["nf4-dq", "fp4", "int8"])
@torch.no_grad()
def test_save_load_round_trip_gives_identical_outputs(make_llama, input_ids, tmp_path, config):
    q = quantize(make_llama(), config).eval()
    path = save_quantized(q, tmp_path / "ckpt")
    assert path.name == "model.safetensors" and os.listdir(path.parent) == ["model.safetensors"]  # no temp file
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
    prefix = "model.layers.0.self_attn.q_proj."
    if config.bits == 4:
        assert {prefix + "weight.absmax", prefix + "weight.quant_map",
                f"{prefix}weight.quant_state.bitsandbytes__{config.quant_type}"} <= keys
    else:
        assert {prefix + "SCB", prefix + "weight_format"} <= keys
    back = load_quantized_checkpoint(lambda: make_llama(seed=1), path).eval()  # other seed: weights must load
    layer_type = Linear8bit if config.bits == 8 else Linear4bit
    assert isinstance(back.model.layers[1].mlp.up_proj, layer_type)
    assert torch.equal(back(input_ids).logits, q(input_ids).logits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("into", [torch.bfloat16, torch.float32])
@torch.no_grad()
def test_a_checkpoint_loads_in_the_dtype_of_the_model_it_fills(make_llama, input_ids, tmp_path, bits, into):
    """A bf16 model's checkpoint loaded into a model built in `into`: its quantized layers take that dtype (and
    their biases), so dequantizing gives layers that match the rest of the model."""
    path = save_quantized(quantize(make_llama().to(torch.bfloat16), QuantConfig(bits=bits)), tmp_path / "ckpt")
    back = load_quantized_checkpoint(lambda: make_llama(seed=1).to(into), path).eval()
    layers = [m for m in back.modules() if isinstance(m, (Linear4bit, Linear8bit))]
    assert len(layers) == 14 and {m.dtype for m in layers} == {into}
    dequantize_model(back)
    assert back.model.layers[0].mlp.up_proj.weight.dtype == into and back(input_ids).logits.dtype == into


@torch.no_grad()
def test_streaming_load_equals_quantizing_the_loaded_model(fp_folder, input_ids):
    from transformers import AutoModelForCausalLM

    built_on_meta = []

    def factory():
        model = _factory(fp_folder)()
        built_on_meta.append(all(p.is_meta for p in model.parameters()))
        return model

    streamed = load_in_4bit(factory, fp_folder, QuantConfig()).eval()
    assert built_on_meta == [True]  # the full-precision model was never allocated
    assert torch.equal(streamed.model.rotary_emb.inv_freq,
                       AutoModelForCausalLM.from_pretrained(fp_folder).model.rotary_emb.inv_freq)
    reference = quantize(AutoModelForCausalLM.from_pretrained(fp_folder).eval(), QuantConfig())
    assert torch.equal(streamed(input_ids).logits, reference(input_ids).logits)
    state = load_file(str(fp_folder / "model.safetensors"))
    from_dict = load_quantized_from_state_dict(_factory(fp_folder), state, QuantConfig(bits=8)).eval()
    assert isinstance(from_dict.model.layers[0].mlp.gate_proj, Linear8bit)


def _saved(tmp_path, model_type, **shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    return tmp_path / model_type


@torch.no_grad()
def test_checkpoint_keys_are_read_under_the_names_transformers_gives_them(tmp_path, input_ids):
    """transformers 5 renames keys while loading (GPT-NeoX stores its head as ``embed_out``, the model calls it
    ``lm_head``) and merges others (a mixture of experts' per-expert matrices). Renamed keys stream; merged ones
    are refused by the layer-by-layer loader and loaded whole by the product, with the same result."""
    from transformers import AutoModelForCausalLM

    from slimtune.compat import KEYS_CONVERTED_ON_LOAD
    from slimtune.quant import CheckpointNeedsMerging
    from slimtune.train.models import load_model

    neox = _saved(tmp_path, "gpt_neox", intermediate_size=96)
    streamed = load_in_4bit(_factory(neox), neox, QuantConfig()).eval()
    reference = quantize(AutoModelForCausalLM.from_pretrained(neox).eval(), QuantConfig())
    assert torch.equal(streamed(input_ids).logits, reference(input_ids).logits)

    moe = _saved(tmp_path, "qwen3_moe", intermediate_size=96, num_key_value_heads=2, head_dim=16, num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=32)
    merges = KEYS_CONVERTED_ON_LOAD and any(p.dim() == 3 for p in _factory(moe)().parameters())
    if merges:
        with pytest.raises(CheckpointNeedsMerging, match="experts"):
            load_in_4bit(_factory(moe), moe, QuantConfig())
    loaded = load_model(moe, quantization=QuantConfig()).eval()
    reference = quantize(AutoModelForCausalLM.from_pretrained(moe).eval(), QuantConfig())
    assert torch.equal(loaded(input_ids).logits, reference(input_ids).logits)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, Linear4bit)


def test_init_empty_weights_keeps_buffers_real():
    with init_empty_weights():
        lin = torch.nn.Linear(4, 4)
        norm = torch.nn.BatchNorm1d(4)
    assert lin.weight.is_meta and lin.bias.is_meta and norm.weight.is_meta
    assert not norm.running_mean.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the hook is gone afterwards


@pytest.fixture(scope="module")
def bnb_folder(fp_folder, tmp_path_factory):
    """The same model quantized and saved by transformers + bitsandbytes (NF4, double quant)."""
    bitsandbytes_oracle()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fp_folder, quantization_config=bnb_config, device_map="cpu",
                                                 dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("bnb")
    model.save_pretrained(path)
    return path, model


@torch.no_grad()
def test_reads_transformers_bitsandbytes_checkpoint(bnb_folder, input_ids, bnbF):
    path, bnb_model = bnb_folder
    model = load_quantized_checkpoint(_factory(path), path).eval()
    ours = model.model.layers[0].mlp.down_proj
    theirs = bnb_model.model.layers[0].mlp.down_proj
    assert isinstance(ours, Linear4bit) and ours.double_quant and ours.quant_type == "nf4"
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state))
    torch.testing.assert_close(model(input_ids).logits, bnb_model(input_ids).logits, atol=1e-5, rtol=1e-5)
    # and our own save of it is byte-identical to theirs
    saved = load_file(str(save_quantized(model, path.parent / "ours")))
    theirs_sd = load_file(str(path / "model.safetensors"))
    assert set(saved) == set(theirs_sd)
    assert all(torch.equal(saved[k], theirs_sd[k]) for k in saved)


def test_a_merge_of_a_bitsandbytes_base_is_a_plain_folder(bnb_folder, input_ids, tmp_path):
    """Merging an adapter into a base transformers+bitsandbytes saved 4-bit gives full-precision weights: the
    merged config.json carries no quantization_config (transformers built Linear4bit layers over fp32 tensors
    from it, and the first forward failed)."""
    from transformers import AutoModelForCausalLM

    import slimtune
    from slimtune.train.inference import export_merged

    class NoTokenizer:
        def save_pretrained(self, path):
            pass

    path, _ = bnb_folder
    model = load_quantized_checkpoint(_factory(path), path).eval()
    assert model.config.quantization_config is not None
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    expected = model(input_ids).logits
    export_merged(model, NoTokenizer(), tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_bad_checkpoints_are_explained(bnb_folder, fp_folder, make_llama, tmp_path):
    path, _ = bnb_folder
    state = load_file(str(path / "model.safetensors"))
    key = "model.layers.1.self_attn.v_proj.weight.nested_absmax"
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        load_quantized_from_state_dict(_factory(path), broken)
    with pytest.raises(ValueError, match=r"stored weight has shape \[64, 64\] but the module .* \(128, 128\)"):
        load_quantized_from_state_dict(lambda: make_llama(hidden_size=128), state)
    for stat in ("quant_map", "nested_absmax", "nested_quant_map"):  # a damaged statistic decodes to NaN
        damaged = dict(state)
        name = f"model.layers.0.mlp.up_proj.weight.{stat}"
        damaged[name] = damaged[name].float().clone()
        damaged[name][0] = float("nan") if stat != "nested_absmax" else float("inf")
        with pytest.raises(ValueError, match=rf"{name} holds inf/NaN values: the checkpoint is damaged"):
            load_quantized_from_state_dict(_factory(path), damaged)
    eight = save_quantized(quantize(make_llama(), QuantConfig(bits=8)), tmp_path / "eight")
    damaged = load_file(str(eight))
    damaged["model.layers.0.mlp.up_proj.SCB"][1] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.SCB holds inf/NaN values"):
        load_quantized_from_state_dict(make_llama, damaged)
    no_norm = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"no tensor for 1 model entries, e.g. \['model.norm.weight'\]"):
        load_quantized_from_state_dict(_factory(path), no_norm)
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"")
    with pytest.raises(ValueError, match="pickle checkpoints can run arbitrary code"):
        load_quantized(_factory(fp_folder), pickle, QuantConfig())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors file"):
        load_quantized(_factory(fp_folder), tmp_path, QuantConfig())
    with pytest.raises(ValueError, match="bits=8; use load_quantized"):
        load_in_4bit(_factory(fp_folder), fp_folder, QuantConfig(bits=8))
    with pytest.raises(ValueError, match="no quantized layer"):
        save_quantized(make_llama(), tmp_path / "x")
    import slimtune
    adapted = slimtune.add_adapter(quantize(make_llama(), QuantConfig()),
                                   slimtune.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds adapter\(s\) \['default'\].*slimtune.save_adapter"):
        save_quantized(adapted, tmp_path / "with-adapter")
    assert not (tmp_path / "with-adapter").exists()
    slimtune.unload(adapted)
    assert isinstance(load_quantized_checkpoint(lambda: make_llama(seed=1), save_quantized(
        adapted, tmp_path / "unloaded")).model.layers[0].self_attn.q_proj, Linear4bit)
    # a full-precision checkpoint without a config is loaded as it is
    plain = load_quantized(_factory(fp_folder), fp_folder)
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in plain.modules())


def test_checkpoint_of_a_quantized_model_can_be_loaded_into_a_real_model(make_llama, input_ids, tmp_path):
    q = quantize(make_llama(), QuantConfig())
    path = save_quantized(q, tmp_path / "m.safetensors")
    target = make_llama(seed=3)  # an existing full-precision module, not a factory
    loaded = load_quantized_checkpoint(target, path)
    assert loaded is target and isinstance(target.model.layers[0].self_attn.o_proj, Linear4bit)
    with torch.no_grad():
        assert torch.equal(target(input_ids).logits, q(input_ids).logits)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no tensor for"):
        load_quantized_checkpoint(_factory_from(make_llama), tmp_path / "other.safetensors")


def _factory_from(make_llama):
    from transformers import LlamaForCausalLM

    cfg = make_llama().config
    return lambda: LlamaForCausalLM(copy.deepcopy(cfg))
