"""LoRA layer behaviour: init, merge/unmerge, unload, disabling, training leaves the base untouched."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, assert_base_unchanged, logits, sample_inputs, tiny_gpt2, tiny_llama, train_losses

import slimtune
from slimtune.methods.layers import TunerLayer
from slimtune.methods.lora_layers import LoraEmbedding, LoraLinear


def _randomise_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_new_adapter_is_a_no_op_and_init_follows_peft():
    base = tiny_llama()
    inputs = sample_inputs("llama")
    expected = logits(base, inputs)
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=4, target_modules=["q_proj"]))
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, 32) and b.shape == (32, 4)
    assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / 32**0.5 + 1e-6  # Kaiming-uniform bound 1/sqrt(in)


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(use_rslora, expected):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"],
                                                              use_rslora=use_rslora))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_unmerge_round_trip(family):
    builder, targets, kwargs = FAMILIES[family]
    model = builder()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, **kwargs))
    _randomise_adapters(model)
    inputs = sample_inputs(family)
    unmerged = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)
    slimtune.unmerge_adapter(model)
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer", "").replace("original_module.", "")
        if plain in weights:
            torch.testing.assert_close(p, weights[plain], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unload_restores_original_classes(family):
    builder, targets, kwargs = FAMILIES[family]
    model = builder()
    before = {n: type(m) for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, **kwargs))
    assert any(isinstance(m, TunerLayer) for m in model.modules())
    slimtune.unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(m is modules[n] for n, m in model.named_modules())  # the very same objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not hasattr(model, "slimtune_state")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_unload_gives_a_plain_model_with_the_same_output(family):
    builder, targets, kwargs = FAMILIES[family]
    model = builder()
    before = {n: type(m) for n, m in model.named_modules()}
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=targets, **kwargs))
    _randomise_adapters(model)
    inputs = sample_inputs(family)
    expected = logits(model, inputs)
    slimtune.merge_and_unload(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)


def test_disable_adapters_context_gives_base_output_even_when_merged():
    base = tiny_llama()
    inputs = sample_inputs("llama")
    expected = logits(base, inputs)
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(r=4, target_modules="all-linear"))
    _randomise_adapters(model)
    adapted = logits(model, inputs)
    for merged in (False, True):
        if merged:
            slimtune.merge_adapter(model)
        with slimtune.disable_adapters(model):
            torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=0)


def test_embedding_merge_round_trip():
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False))
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)


def test_training_lowers_loss_and_keeps_base_weights_bit_identical():
    model = tiny_llama()
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=16), steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert_base_unchanged(model, base)


def test_all_linear_skips_the_output_head():
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, TunerLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_gpt2_conv1d_is_wrapped_transposed():
    model = slimtune.add_adapter(tiny_gpt2(), slimtune.LoraConfig(r=2, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)


def test_up_projection_is_one_addmm_with_the_same_values_and_gradients(monkeypatch):
    """The LoRA layer adds ``s · B(A x)`` to the base output in one addmm (the scaling as alpha): no
    (tokens, out) product, scaled copy or sum. Same values and gradients as the three steps."""
    from slimtune.methods import lora_layers

    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=4, lora_alpha=12, target_modules="all-linear",
                                                                    init_lora_weights=False)).train()
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = []
    real = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(k.get("alpha")) or real(*a, **k))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_layers_count = sum(isinstance(m, lora_layers.LoraLinear) for m in model.modules())
    assert calls == [3.0] * lora_layers_count
    monkeypatch.setattr(lora_layers, "add_up_projection",
                        lambda result, down, B, s: result + (B(down) * s).to(result.dtype))
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)
