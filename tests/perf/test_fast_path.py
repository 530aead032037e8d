"""The one switch (kernels: auto | triton | torch): which path each device gets, and that the kernel path
computes what the reference does (on CPU through Triton's interpreter)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import sample_inputs, tiny_llama

import slimtune
from slimtune.perf.fast_path import enable_fast_path, plan_fast_path
from slimtune.perf.fused_lora import is_fused
from slimtune.quant import Linear4bit, QuantConfig, cpu_decode, quantize

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("mode, device, reason, expected", [
    ("auto", CUDA, None, (True, True)),  # a GPU with triton: kernels and the fused LoRA node
    ("auto", CUDA, "triton is not installed", (False, False)),  # without triton: the pure-torch path
    ("auto", CPU, None, (False, True)),  # CPUs: the pure-torch base (the interpreter is for tests), fused LoRA
    ("torch", CUDA, None, (False, False)),
    ("triton", CUDA, None, (True, True)),
    ("triton", CPU, None, (True, True)),  # under Triton's interpreter
])
def test_auto_picks_the_kernels_on_cuda_only_when_triton_runs(mode, device, reason, expected):
    assert plan_fast_path(mode, device, reason) == expected


def test_demanding_triton_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ValueError, match="kernels='triton' but the Triton kernels cannot run on cuda: no triton"):
        plan_fast_path("triton", CUDA, "no triton")
    with pytest.raises(ValueError, match="kernels='fast' is not a kernel mode"):
        plan_fast_path("fast", CPU, None)


def _qlora():
    model = tiny_llama()
    quantize(model, QuantConfig(compute_dtype="float32"))
    torch.manual_seed(0)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def test_triton_mode_routes_base_and_lora_through_the_kernels_with_the_same_results(monkeypatch):
    from slimtune.perf.kernels import nf4_matmul

    launches = []
    real = nf4_matmul.matmul_4bit_triton
    monkeypatch.setattr(nf4_matmul, "matmul_4bit_triton", lambda *a: launches.append(a[2]) or real(*a))
    reference = _qlora()
    fast = copy.deepcopy(reference)
    path = enable_fast_path(fast, "triton")  # CPU: Triton's interpreter (tests/conftest.py)
    layers = [m for m in fast.modules() if isinstance(m, Linear4bit)]
    assert path.triton and all(m.matmul_backend is not None for m in layers)
    assert path.fused_lora_layers == len(layers) == 14
    assert all(is_fused(m) for m in fast.modules()
               if type(m).__name__ == "LoraLinear")
    inputs = sample_inputs("llama")
    for model in (reference, fast):
        model.train()
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    # every layer runs x Wᵀ; g W runs where the input needs a gradient (not layer 0's q/k/v: frozen embeddings)
    assert launches.count(True) == 14 and launches.count(False) == 11
    torch.testing.assert_close(fast(**inputs).logits, reference(**inputs).logits, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    back = enable_fast_path(fast, "torch")
    assert not back.triton and back.fused_lora_layers == 0 and all(m.matmul_backend is None for m in layers)


def test_auto_on_cpu_decodes_with_the_cpu_kernel_and_fuses_the_lora_layers():
    model = _qlora()
    path = enable_fast_path(model)
    assert (path.mode, path.triton, path.fused_lora_layers) == ("auto", False, 14)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert all(m.matmul_backend is None and m.cpu_kernel for m in layers)
    reason = cpu_decode.status()
    assert f"via C++ decode kernel ({cpu_decode.isa()}) + matmul" in str(path) if reason is None else \
        f"pure-torch dequantize (the C++ decode kernel is unavailable: {reason}) + matmul" in str(path)
    torch_path = enable_fast_path(model, "torch")
    assert torch_path.fused_lora_layers == 0 and not any(m.cpu_kernel for m in layers)
    assert "via pure-torch dequantize + matmul" in str(torch_path)


def test_the_log_line_says_which_base_it_found():
    quantized = enable_fast_path(_qlora())
    n = sum(isinstance(m, Linear4bit) for m in _qlora().modules())
    assert quantized.quantized_layers == n > 0 and f"4-bit base ({n} layers)" in str(quantized)
    model = tiny_llama()
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules="all-linear"))
    plain = enable_fast_path(model)
    assert plain.quantized_layers == 0 and "full-precision base" in str(plain) and "4-bit" not in str(plain)
