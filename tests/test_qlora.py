"""QLoRA: LoRA on frozen 4-bit layers (slimtune's and bitsandbytes'), and moving adapters between 4-bit and
full-precision bases."""

import copy

import pytest
import torch
from oracles import BITSANDBYTES_KINDS, bitsandbytes_kind_id, bitsandbytes_layers
from tiny_models import logits, sample_inputs, tiny_gpt2, tiny_llama, train_losses
from transformers import GPT2LMHeadModel, LlamaForCausalLM

import slimtune
from slimtune.export import merge_for_export
from slimtune.methods.lora_layers import LoraLinear
from slimtune.quant import Linear4bit, QuantConfig, dequantize_model, quantize
from slimtune.train.models import load_model

QLORA = QuantConfig(bits=4, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype="float32")


def test_lora_gradients_through_4bit_equal_those_through_the_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64)
    q = Linear4bit.from_linear(copy.deepcopy(linear), compute_dtype=torch.float32)
    dense = torch.nn.Linear(96, 64)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize(torch.float32))
        dense.bias.copy_(linear.bias)
    config = slimtune.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    layers = []
    for base in (q, dense):
        torch.manual_seed(1)
        layer = LoraLinear(base.requires_grad_(False))
        layer.add_adapter("default", config, "proj")
        layers.append(layer)
    x = torch.randn(3, 5, 96, requires_grad=True)
    grads = []
    for layer in layers:
        x.grad = None
        (layer(x) ** 2).sum().backward()
        grads.append([layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad, x.grad.clone()])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _qlora_model(seed=0):
    model = quantize(tiny_llama(seed), QLORA)
    return slimtune.add_adapter(model, slimtune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_qlora_fine_tune_lowers_the_loss_and_base_stays_frozen():
    model = _qlora_model()
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, Linear4bit)
    packed = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=16), steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers())


def _random_adapter(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_adapter_moves_between_4bit_and_full_precision(tmp_path):
    full = tiny_llama()
    deq_ref = quantize(copy.deepcopy(full), QLORA)  # same rounding as any 4-bit copy of `full`
    inputs = sample_inputs("llama")
    # trained on 4-bit → loads into full precision (same adapter, so outputs differ only by rounding)
    config = slimtune.LoraConfig(r=4, target_modules="all-linear")
    q = _random_adapter(slimtune.add_adapter(copy.deepcopy(deq_ref), config))
    slimtune.save_adapter(q, tmp_path / "from4bit")
    on_full = slimtune.load_adapter(copy.deepcopy(full), tmp_path / "from4bit")
    exported, _ = merge_for_export(q)
    full_deq = copy.deepcopy(exported)  # exported = dequantized base + merged adapter
    torch.testing.assert_close(logits(full_deq, inputs), logits(q, inputs), atol=1e-4, rtol=0)
    assert (logits(on_full, inputs) - logits(q, inputs)).abs().max() < 0.5  # only 4-bit rounding apart
    # trained on full precision → loads into 4-bit
    f = _random_adapter(slimtune.add_adapter(copy.deepcopy(full), config.replace()))
    slimtune.save_adapter(f, tmp_path / "fromfull")
    on_q = slimtune.load_adapter(copy.deepcopy(deq_ref), tmp_path / "fromfull")
    for name, p in on_q.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, f.get_parameter(name))


def test_merge_for_export_gives_a_plain_model_and_reports_requantization_error(tmp_path):
    q = _random_adapter(_qlora_model())
    inputs = sample_inputs("llama")
    expected = logits(q, inputs)
    exported, report = merge_for_export(q)
    assert report.dequantized_layers == 14
    assert isinstance(exported, LlamaForCausalLM)
    assert not any(isinstance(m, (LoraLinear, Linear4bit)) for m in exported.modules())
    assert not hasattr(exported, "slimtune_state") and hasattr(q, "slimtune_state")  # q untouched
    torch.testing.assert_close(logits(exported, inputs), expected, atol=1e-4, rtol=0)
    exported.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-4, rtol=0)
    _, requant = merge_for_export(q, requantize=QLORA)
    assert 0.01 < requant.requantized_rel_error < 0.2  # NF4 re-rounding: a few percent


def test_a_4bit_gpt2_merges_into_conv1d_layers_that_transformers_loads(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out): the dequantized, merged export writes that layout again (the
    square attn.c_proj would otherwise load transposed without a word)."""
    base = tiny_gpt2()
    q = quantize(copy.deepcopy(base), QLORA)
    torch.manual_seed(0)
    q = slimtune.add_adapter(q, slimtune.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                    init_lora_weights=False))
    inputs = sample_inputs("gpt2")
    expected = logits(q, inputs)
    for dequantized_first in (False, True):  # merge_for_export, and dequantize_model by hand on a bare base
        if dequantized_first:
            exported = dequantize_model(quantize(copy.deepcopy(base), QLORA))
            expected = logits(quantize(copy.deepcopy(base), QLORA), inputs)
        else:
            exported, _ = merge_for_export(q)
        assert {type(m).__name__ for n, m in exported.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))} \
            == {"Conv1D"}
        torch.testing.assert_close(logits(exported, inputs), expected, atol=1e-4, rtol=0)
        exported.save_pretrained(tmp_path / f"merged-{dequantized_first}")
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / f"merged-{dequantized_first}")
        torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-4, rtol=0)
    base.save_pretrained(tmp_path / "base")  # the streaming 4-bit load (slimtune train / merge) marks them too
    streamed = load_model(tmp_path / "base", dtype="float32", device="cpu", quantization=QLORA)
    assert {n for n, m in streamed.named_modules() if getattr(m, "conv1d", False)} == \
        {n for n, m in base.named_modules() if type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize("kind", [BITSANDBYTES_KINDS[1], BITSANDBYTES_KINDS[4], BITSANDBYTES_KINDS[5]],
                         ids=bitsandbytes_kind_id)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merging_into_bitsandbytes_layers_is_refused_and_merge_for_export_merges_them(kind, use_dora):
    """PEFT merges into bitsandbytes layers by dequantizing, adding and requantizing in place. slimtune refuses the
    in-place merge, as for its own quantized layers (it had added ΔW to the packed bytes when bf16 held them, and
    sent users to merge_for_export, which left bitsandbytes layers alone); merge_for_export dequantizes them."""
    targets = ["q_proj", "up_proj"]
    model = bitsandbytes_layers(tiny_llama(), targets, *kind)
    torch.manual_seed(0)
    model = slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, use_dora=use_dora,
                                                            init_lora_weights=False))
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(slimtune.NotMergeableError, match=r"cannot merge into a bitsandbytes\.nn\.modules\.Linear"
                                                         r"(4bit|8bitLt) in place: its weight is quantized.*"
                                                         r"merge_for_export\(model\)"):
        slimtune.merge_and_unload(model)
    as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731 (packed bytes held as bf16: NaNs)
    assert all(torch.equal(as_bytes(t), as_bytes(before[n])) for n, t in model.state_dict().items())
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-6, rtol=0)
    exported, report = merge_for_export(model)
    assert report.dequantized_layers == 4
    assert {type(exported.get_submodule(f"model.layers.{i}.{part}")) for i in (0, 1)
            for part in ("self_attn.q_proj", "mlp.up_proj")} == {torch.nn.Linear}
    torch.testing.assert_close(logits(exported, inputs), expected, atol=1e-5, rtol=0)
