"""Which layers a 4-bit model keeps in full precision, and how a folder loads, against transformers+bitsandbytes
(``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from oracles import BITSANDBYTES_KINDS, bitsandbytes_kind_id, bitsandbytes_layers, bitsandbytes_oracle
from safetensors.torch import load_file, save_file
from tiny_models import sample_inputs, tiny_bert_cls, tiny_llama, tiny_llama_cls, tiny_t5
from torch import nn

import slimtune
from slimtune.quant import (
    Linear4bit,
    QuantConfig,
    QuantizedLinear,
    dequantize_model,
    init_random_quantized,
    load_quantized,
    load_quantized_checkpoint,
    quantize,
)
from slimtune.quant.model import dense_weight


def _bnb_4bit(model: nn.Module, folder):
    """``model`` saved to ``folder`` and loaded back by transformers+bitsandbytes in 4 bits (NF4, double quant)."""
    bitsandbytes_oracle()
    from transformers import BitsAndBytesConfig

    model.save_pretrained(folder)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return type(model).from_pretrained(folder, quantization_config=config, device_map="cpu",
                                       dtype=torch.float32).eval()


def _quantized_names(model: nn.Module) -> set[str]:
    bnb = bitsandbytes_oracle()
    return {n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, bnb.nn.Linear4bit))}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_t5_keeps_its_fp32_modules_like_bitsandbytes_and_computes_right(tmp_path):
    fp = tiny_t5()
    inputs = sample_inputs("t5")
    theirs = _bnb_4bit(fp, tmp_path)
    ours = quantize(copy.deepcopy(fp), QuantConfig(compute_dtype="float32"))
    assert _quantized_names(ours) == _quantized_names(theirs)
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is nn.Linear and wo.weight.dtype == torch.float32  # T5 casts activations to wo.weight.dtype
    out = ours(**inputs).logits
    torch.testing.assert_close(out, dequantize_model(copy.deepcopy(ours))(**inputs).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, theirs(**inputs).logits, atol=1e-4, rtol=1e-4)  # same codes, same math
    assert _rel(out, fp(**inputs).logits) < 0.3


def test_keep_in_fp32_patterns_match_as_transformers_does():
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        pytest.skip("transformers < 5 has no should_convert_module to compare with")

    model = tiny_llama()
    patterns = ["mlp.down_proj", "model.layers.1.self_attn", "layers.0.mlp.up", "gate_.*"]
    model._keep_in_fp32_modules = set(patterns)
    expected = {n for n, m in model.named_modules() if type(m) is nn.Linear and not should_convert_module(n, patterns)}
    assert expected >= {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"}
    q = quantize(model, QuantConfig(skip_modules=[]))
    assert {n for n, m in q.named_modules() if type(m) is nn.Linear} == expected | {"lm_head"}


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_classification_head_stays_full_precision_and_trains(family, tmp_path):
    fp = tiny_llama_cls() if family == "llama" else tiny_bert_cls()
    head = "score" if family == "llama" else "classifier"
    ours = quantize(copy.deepcopy(fp), QuantConfig(compute_dtype="float32"))
    assert type(ours.get_submodule(head)) is nn.Linear
    # bitsandbytes keeps Llama's score; it quantizes BERT's classifier, which PEFT then cannot train
    assert _quantized_names(ours) == _quantized_names(_bnb_4bit(fp, tmp_path)) - {head}
    slimtune.add_adapter(ours, slimtune.LoraConfig(r=4, target_modules=["query", "value", "q_proj", "v_proj"],
                                                   modules_to_save=[head], task_type="SEQ_CLS"))
    copy_ = ours.get_submodule(head).modules_to_save["default"]
    assert type(copy_) is nn.Linear and copy_.weight.requires_grad
    ours(**sample_inputs(family)).logits.sum().backward()
    assert copy_.weight.grad is not None and copy_.weight.grad.abs().sum() > 0


def test_a_linear_head_module_keeps_the_layers_inside_it():
    model = tiny_llama()
    model.classifier = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 3))  # RoBERTa-like dense + out_proj head
    q = quantize(model, QuantConfig())
    assert all(type(m) is nn.Linear for m in q.classifier)
    assert isinstance(q.model.layers[0].mlp.down_proj, Linear4bit)


def _llama_folder(tmp_path, **overrides):
    model = tiny_llama(**overrides)
    model.save_pretrained(tmp_path)
    return model


def _empty_llama(config, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return lambda: LlamaForCausalLM._from_config(config, dtype=dtype)


def test_a_stored_head_that_the_config_would_tie_is_kept(tmp_path):
    model = _llama_folder(tmp_path, tie_word_embeddings=True)
    # copies: the file is written again below, and safetensors may map the tensors it returns from the file
    state = {k: v.clone() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    assert "lm_head.weight" not in state  # tied: stored once, and tied again on load
    tied = load_quantized(_empty_llama(model.config), tmp_path, QuantConfig())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    state["lm_head.weight"] = torch.randn(128, 32) * 0.02  # the config says tie, the checkpoint has its own head
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_quantized(_empty_llama(model.config), tmp_path, QuantConfig())
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])  # what from_pretrained keeps
    assert torch.equal(loaded.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    random = init_random_quantized(_empty_llama(model.config), QuantConfig())
    assert random.lm_head.weight is random.model.embed_tokens.weight  # random weights are tied as built


def test_the_stored_head_is_kept_with_a_tie_weights_of_transformers_4(tmp_path, caplog):
    from transformers import LlamaForCausalLM

    class Transformers4Tie(LlamaForCausalLM):
        def tie_weights(self, **kwargs):  # no missing_keys, as in transformers 4
            super().tie_weights(**kwargs)

    model = _llama_folder(tmp_path, tie_word_embeddings=True)
    # copies: the file is written again below, and safetensors may map the tensors it returns from the file
    state = {k: v.clone() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    tied = load_quantized(lambda: Transformers4Tie(model.config), tmp_path, QuantConfig())
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    state["lm_head.weight"] = torch.randn(128, 32) * 0.02
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_quantized(lambda: Transformers4Tie(model.config), tmp_path, QuantConfig())
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])
    assert "the config ties lm_head.weight to model.embed_tokens.weight but the checkpoint stores both" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_streaming_load_keeps_fp32_modules_as_from_pretrained_does(dtype, tmp_path):
    from transformers import T5ForConditionalGeneration

    fp = tiny_t5()
    fp.save_pretrained(tmp_path)
    reference = T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)

    def build():
        model = T5ForConditionalGeneration._from_config(fp.config, dtype=dtype)
        model._keep_in_fp32_modules_strict = {"final_layer_norm"}  # fp32 for fp16 and bf16 alike
        return model

    ours = load_quantized(build, tmp_path, QuantConfig(skip_modules=["lm_head", "q", "k", "v", "o", "wi"]))
    want = {n: p.dtype for n, p in reference.named_parameters()}
    want.update({n: torch.float32 for n in want if "final_layer_norm" in n})
    assert {n: p.dtype for n, p in ours.named_parameters()} == want
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == (
        torch.float32 if dtype == torch.float16 else torch.bfloat16)


@torch.no_grad()
def test_a_bitsandbytes_quantized_moe_folder_loads_as_stored(tmp_path, bnbF):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    _bnb_4bit(MixtralForCausalLM(config), tmp_path / "fp").save_pretrained(tmp_path / "bnb")
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 merges the experts' tensors on load
        with pytest.raises(ValueError, match=r"merged .*Load the model with transformers' from_pretrained"):
            load_quantized_checkpoint(lambda: MixtralForCausalLM(config), tmp_path / "bnb")
    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "bnb", device_map="cpu").eval()  # bitsandbytes layers
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    reference = theirs(ids).logits
    bnb_q = theirs.model.layers[0].self_attn.q_proj
    expected = bnbF.dequantize_4bit(bnb_q.weight.data, bnb_q.weight.quant_state)
    ours = quantize(theirs, QuantConfig(blocksize=128))  # stored layers keep their own block size
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.blocksize == 64 and q_proj.double_quant
    assert torch.equal(q_proj.dequantize(), expected)
    assert _quantized_names(ours) == {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    torch.testing.assert_close(ours(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_a_layer_with_an_unknown_quantized_weight_is_refused_clearly():
    model = tiny_llama()
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj: its weight is torch.int8, not a "
                                         r"full-precision weight.*; the model is unchanged"):
        quantize(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_quantizing_layers_bitsandbytes_repacked_for_its_cpu_kernel_warns(tmp_path, monkeypatch):
    """bitsandbytes repacks a 4-bit layer for its AVX512-BF16 inference kernel the first time it runs in eval mode,
    rounding its scales to bf16; its state_dict undoes the repacking, not the rounding: quantize() took the layer
    about 1e-3 from its stored weights without a word. (The repacking is simulated: this CPU may lack the kernel.)"""
    bnb = bitsandbytes_oracle()
    theirs = _bnb_4bit(tiny_llama(), tmp_path)
    layer = theirs.model.layers[0].self_attn.q_proj
    layer.weight.quant_state.packing_format_for_cpu = True

    def undo(data, state):
        state.packing_format_for_cpu = False
        return data, state

    monkeypatch.setattr(bnb.nn.modules, "_convert_weight_packed_for_cpu_inverse", undo)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.q_proj and 0 more layers were repacked by "
                                         r"bitsandbytes for its CPU inference kernel"):
        quantize(theirs, QuantConfig())
    assert isinstance(theirs.model.layers[0].self_attn.q_proj, Linear4bit)


@pytest.mark.parametrize("kind", BITSANDBYTES_KINDS, ids=bitsandbytes_kind_id)
def test_dense_weight_of_a_bitsandbytes_layer_is_what_peft_dequantizes(kind):
    """bitsandbytes' layers subclass nn.Linear: their weight (packed 4-bit bytes, maybe stored as bf16, or int8
    codes) was taken as the matrix itself, so DoRA started its magnitudes from the codes' row norms."""
    from peft.utils.integrations import dequantize_module_weight

    model = bitsandbytes_layers(tiny_llama(), ["q_proj", "down_proj"], *kind)
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        expected = dequantize_module_weight(layer)
        assert expected.shape == (layer.out_features, layer.in_features)
        assert torch.equal(dense_weight(layer), expected)
        assert dense_weight(layer, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", [BITSANDBYTES_KINDS[0], BITSANDBYTES_KINDS[4], BITSANDBYTES_KINDS[5]],
                         ids=bitsandbytes_kind_id)
def test_dequantize_model_replaces_bitsandbytes_layers_too(kind):
    from peft.utils.integrations import dequantize_module_weight

    model = bitsandbytes_layers(tiny_llama(), ["q_proj", "o_proj", "up_proj"], *kind)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    expected = dequantize_module_weight(model.model.layers[0].mlp.up_proj)
    dequantize_model(model)
    assert not [n for n, m in model.named_modules() if type(m) is not nn.Linear and isinstance(m, nn.Linear)]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_quantize_adopts_bitsandbytes_4bit_bytes_stored_as_bf16():
    """``quant_storage=torch.bfloat16`` (FSDP-QLoRA's) stores the packed bytes in a float tensor: it was taken as
    a full-precision weight of shape (n / 4, 1) and quantized again."""
    bnbF = bitsandbytes_oracle().functional
    model = bitsandbytes_layers(tiny_llama(), ["q_proj"], 4, "nf4", True, torch.bfloat16)
    bnb_q = model.model.layers[0].self_attn.q_proj
    expected = bnbF.dequantize_4bit(bnb_q.weight.data, bnb_q.weight.quant_state)
    with pytest.raises(ValueError, match="already quantized"):
        Linear4bit.from_linear(bnb_q)
    quantize(model, QuantConfig())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear4bit) and q_proj.double_quant
    assert torch.equal(q_proj.dequantize(), expected)
