"""The fused LoRA autograd function against LoraLinear's forward and against autograd on the formula."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

import slimtune
from slimtune.perf.fast_path import enable_fast_path
from slimtune.perf.fused_lora import dropout_mask, fallback_reason, fused_lora_linear, is_fused, use_fused_lora
from slimtune.quant import Linear4bit, QuantConfig, cpu_decode, quantize


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model, ids, seed=0):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_model_matches_unfused(quantized):
    model = tiny_llama()
    if quantized:
        quantize(model, QuantConfig(compute_dtype="float32"))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    model.train()
    fused = copy.deepcopy(model)
    assert use_fused_lora(fused) == 14  # 7 linear layers × 2 decoder layers
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    loss, grads = _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert fused.state_dict().keys() == model.state_dict().keys()


def test_a_bitsandbytes_packed_base_layer_keeps_its_own_forward():
    """A model transformers loaded 4-bit with bitsandbytes (a prequantized folder) holds ``Linear4bit`` layers:
    ``nn.Linear`` over packed bytes. The fused node would multiply by those bytes; those layers are left alone,
    the others fused."""
    from oracles import bitsandbytes_oracle

    bnb = bitsandbytes_oracle()
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    packed = bnb.nn.Linear4bit(q.in_features, q.out_features, bias=False, compute_dtype=torch.float32)
    packed.weight = bnb.nn.Params4bit(q.weight.detach().clone(), requires_grad=False)
    model.model.layers[0].self_attn.q_proj = packed.to("cpu")  # the move quantizes it
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert use_fused_lora(model) == 13  # all but the packed one
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    only_packed = slimtune.unload(model)  # LoRA on the packed layer alone: `kernels: auto` runs it as it is
    slimtune.add_adapter(only_packed, slimtune.LoraConfig(r=4, target_modules=["0.self_attn.q_proj"]))
    chosen = enable_fast_path(only_packed)
    assert chosen.fused_lora_layers == 0 and chosen.other_quantized_layers == 1
    assert "8-bit or packed base (1 layers" in str(chosen)


def test_function_matches_autograd_on_the_formula_with_dropout_and_trainable_bias():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16).double().requires_grad_(False)
    base.bias.requires_grad_(True)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    B = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    s, p, seed = 0.7, 0.3, 1234
    out = fused_lora_linear(x, base, A, B, s, p, seed)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, A, B, base.bias), g)
    mask = dropout_mask(x.detach().reshape(-1, 24), p, seed).reshape(x.shape)
    assert 0 < int((mask == 0).sum()) < mask.numel()  # dropout really drops something
    ref = F.linear(x, base.weight, base.bias) + s * ((x * mask) @ A.T) @ B.T
    want = torch.autograd.grad(ref, (x, A, B, base.bias), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b, name in zip(got, want, ("x", "A", "B", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def _saved(fn):
    """Shapes of the tensors autograd keeps for backward while ``fn`` runs, and their bytes (shared storage once)."""
    shapes, storages = [], {}

    def pack(t):
        shapes.append(tuple(t.shape))
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()), shapes


def test_keeps_only_x_and_xa_and_no_dequantized_weight():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 48), compute_dtype=torch.float32)
    x = torch.randn(10, 64, requires_grad=True)
    A = torch.randn(8, 64, requires_grad=True)
    B = torch.randn(48, 8, requires_grad=True)
    _, shapes = _saved(lambda: fused_lora_linear(x, base, A, B, 2.0, dropout_p=0.1))
    assert sorted(shapes) == sorted([(10, 64), (10, 8), (8, 64), (48, 8)])  # x, A x, and the parameters
    A.requires_grad_(False)  # LoRA-FA: nothing of size (tokens, in) is kept
    _, shapes = _saved(lambda: fused_lora_linear(x, base, A, B, 2.0, dropout_p=0.1))
    assert (10, 64) not in shapes and (48, 64) not in shapes


def test_keep_dequantized_decodes_once_per_step_with_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    base = Linear4bit.from_linear(torch.nn.Linear(64, 48), compute_dtype=torch.float32)
    x = torch.randn(10, 64, requires_grad=True)
    A = torch.randn(8, 64, requires_grad=True)
    B = torch.randn(48, 8, requires_grad=True)
    expected = torch.autograd.grad(fused_lora_linear(x, base, A, B, 2.0).square().sum(), (x, A, B))
    decodes = []
    for name in ("dequantize", "transient_weight"):
        real = getattr(Linear4bit, name)
        monkeypatch.setattr(Linear4bit, name,
                            lambda self, *a, _real=real, **k: decodes.append(1) or _real(self, *a, **k))
    assert len(torch.autograd.grad(fused_lora_linear(x, base, A, B, 2.0).sum(), x)) and len(decodes) == 2
    decodes.clear()
    base.keep_dequantized = True
    out = fused_lora_linear(x, base, A, B, 2.0)
    assert len(decodes) == 1
    decodes.clear()
    grads = torch.autograd.grad(out.square().sum(), (x, A, B))
    assert not decodes  # the backward's g W used the weight kept from the forward
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_with_dropout_both_paths_keep_less_than_dropout_modules(monkeypatch):
    """q/k/v and gate/up share their input: the fused node (mask regenerated from a seed) and the plain LoRA
    layer (a one-byte mask) keep it once, not one dropout(x) plus torch's multiplier per adapter."""
    from slimtune.methods import lora_layers

    model = tiny_llama()
    quantize(model, QuantConfig(compute_dtype="float32"))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    model.train()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    unfused, _ = _saved(lambda: model(input_ids=ids, labels=ids).loss)
    with monkeypatch.context() as patch:
        patch.setattr(lora_layers, "dropout_then_linear", lambda x, linear, dropout: linear(dropout(x)))
        modules, _ = _saved(lambda: model(input_ids=ids, labels=ids).loss)
    use_fused_lora(model)
    fused, _ = _saved(lambda: model(input_ids=ids, labels=ids).loss)
    assert unfused < 0.8 * modules and fused < 0.8 * modules, (unfused, fused, modules)


def test_autocast_bf16_matches_unfused_dtype_and_values():
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    fused = copy.deepcopy(model)
    use_fused_lora(fused)
    x = torch.randn(2, 6, 32)
    for m in (model, fused):
        m.model.layers[0].self_attn.q_proj.requires_grad_(True)
    layer, fused_layer = model.model.layers[0].self_attn.q_proj, fused.model.layers[0].self_attn.q_proj
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = layer(x), fused_layer(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(5, 32), (2, 3, 32)])
def test_output_may_be_modified_in_place_like_a_linear_layers(shape):
    """Models add into a projection's output in place (Falcon); autograd forbids that on a view made inside a
    custom function, so the fused node must return a tensor of its own, with the same gradients as unfused."""
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    grads = []
    for fused in (True, False):
        use_fused_lora(model, enabled=fused)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = layer(x)
        out += 1.0
        out.mul_(torch.linspace(0.5, 2.0, out.shape[-1]))
        grads.append(torch.autograd.grad(out.square().sum(), (x, *layer.lora_parameters("default"))))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fallbacks_and_switching_back():
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    init_lora_weights=False))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                    init_lora_weights=False),
                    adapter_name="other")
    layer = model.model.layers[0].self_attn.q_proj
    use_fused_lora(model)
    assert is_fused(layer)
    x = torch.randn(3, 32)
    layer.set_active(["default", "other"])  # two active adapters: the class's forward runs
    assert "exactly one" in fallback_reason(layer)
    torch.testing.assert_close(layer(x), type(layer).forward(layer, x))
    layer.set_active(["default"])
    assert fallback_reason(layer) is None
    torch.testing.assert_close(layer(x), type(layer).forward(layer, x), rtol=1e-6, atol=1e-6)
    assert use_fused_lora(model, enabled=False) == 2
    assert "forward" not in layer.__dict__
    copy.deepcopy(model)  # no bound state left behind


def test_merged_and_disabled_adapters_are_not_added_again():
    """A merged adapter is in W already and a disabled one adds nothing: the fused node must not add either."""
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                    init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        plain = layer.base_layer(x)
        adapted = layer(x)
        use_fused_lora(model)
        assert not torch.allclose(adapted, plain)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-6, atol=1e-6)
        slimtune.merge_adapter(model)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        slimtune.unmerge_adapter(model)
        with slimtune.disable_adapters(model):
            torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no LoRA linear layer"):
        use_fused_lora(tiny_llama())
    base = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="frozen base weight"):
        fused_lora_linear(torch.randn(2, 4), base, torch.randn(2, 4), torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match="dropout_p=1.5"):
        fused_lora_linear(torch.randn(2, 4), base.requires_grad_(False), torch.randn(2, 4), torch.randn(4, 2), 1.0, 1.5)


def test_the_fast_path_names_an_8bit_base_as_such():
    """An 8-bit base was reported as "full-precision base (torch matmuls)"."""
    model = tiny_llama()
    quantize(model, QuantConfig(bits=8))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules="all-linear"))
    chosen = enable_fast_path(model)
    assert chosen.quantized_layers == 0 and chosen.other_quantized_layers == 14 and "8-bit" in str(chosen)


def test_gradients_come_back_contiguous():
    """dB is computed as (xaᵀ g)ᵀ; handed back transposed, torch.autograd.grad returned a tensor .view(-1) refuses."""
    base = torch.nn.Linear(12, 20, bias=False).requires_grad_(False)
    x = torch.randn(5, 12, requires_grad=True)
    A, B = torch.randn(3, 12, requires_grad=True), torch.randn(20, 3, requires_grad=True)
    out = fused_lora_linear(x, base, A, B, 2.0)
    for grad in torch.autograd.grad(out.square().sum(), (x, A, B)):
        assert grad.is_contiguous()


@pytest.mark.skipif(cpu_decode.status() is not None, reason="the CPU decode kernel cannot be built here")
def test_generation_steps_over_a_4bit_base_run_the_cpu_gemv(monkeypatch):
    """One new token per step: each fused layer's base matmul is the GEMV (W decoded on the fly), within fp32
    rounding of decode + matmul; a training step never calls it (its backward decodes W anyway)."""
    model = tiny_llama(layers=2)
    quantize(model, QuantConfig(compute_dtype="float32", blocksize=32))  # rows of whole blocks (hidden size 32)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    enable_fast_path(model, "auto")
    calls = []
    gemv = cpu_decode.gemv
    monkeypatch.setattr(cpu_decode, "gemv", lambda x, *a, **k: calls.append(x.shape[0]) or gemv(x, *a, **k))
    ids = torch.tensor([[5, 9, 11]])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert calls == [3] * 14  # 2 blocks x 7 fused layers, 3 rows each
        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.cpu_kernel = False
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.cpu_kernel = True
    model.train()
    calls.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == []
