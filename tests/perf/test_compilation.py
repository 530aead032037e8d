"""torch.compile per transformer block: one compiled graph serves every block, and it trains as the eager model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch._dynamo.utils import counters

import slimtune
from slimtune.perf.compilation import compile_blocks, compile_options, compiled_blocks, cpu_compiler
from slimtune.perf.fast_path import enable_fast_path
from slimtune.perf.losses import causal_lm_loss
from slimtune.quant import QuantConfig, cpu_decode, quantize
from slimtune.quant.linear import Linear4bit


def _grads(model):
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile's CPU code needs a C++ compiler")
def test_one_graph_serves_every_block_and_trains_as_eager():
    """Each fused LoRA layer's forward was a callable object of its own, which torch.compile guards by identity:
    every block compiled again (and after 8, the rest ran eagerly). Now the first block compiles once (its input
    needs no gradient) and the others share one graph."""
    model = tiny_llama(layers=4)
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    model.train()
    assert enable_fast_path(model, "auto").fused_lora_layers == 28
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(compiled) == 4 == compiled_blocks(compiled)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    for m in (model, compiled):
        causal_lm_loss(m, batch).backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    want, got = _grads(model), _grads(compiled)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile's CPU code needs a C++ compiler")
def test_a_models_own_dropout_draws_the_eager_masks():
    """GPT-2 keeps dropout 0.1 in its blocks: compiled, the masks came from inductor's generator and the run
    trained differently from the eager one with the same seed (losses from the first step on)."""
    model = tiny_gpt2()
    assert model.config.resid_pdrop > 0
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.train()
    enable_fast_path(model, "auto")
    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (model, compiled):
        torch.manual_seed(5)
        losses.append(m(input_ids=ids, labels=ids).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)


def _saved_elements(model, batch) -> int:
    """How many elements autograd keeps from a forward for its backward (a training step's activation memory)."""
    counts = []

    def pack(t):
        counts.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    return sum(counts)


@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile's CPU code needs a C++ compiler")
@pytest.mark.parametrize(("bits", "targets", "keep_dequantized", "cpu_kernel"),
                         [(4, "all-linear", False, True), (4, "all-linear", False, False),
                          (4, ["q_proj", "v_proj"], True, True), (8, "all-linear", False, True)])
def test_a_quantized_base_decodes_inside_the_compiled_graph_and_trains_as_eager(bits, targets, keep_dequantized,
                                                                                cpu_kernel, monkeypatch):
    """The eager 4-bit decode (tables cached by id, reused buffers, or the C++ kernel called through ctypes)
    broke each block's graph in pieces; the traceable one (nf4.decode_4bit) compiles into the block's one graph,
    with the same weights, whether the eager layers run the C++ kernel or not. The compiler must not keep the
    decoded weights from forward to backward (it merged the two decodes of a weight): no more is saved for
    backward than in the eager step, which decodes again, unless keep_dequantized asks to keep."""
    model = tiny_llama(layers=3)
    quantize(model, QuantConfig(bits=bits, compute_dtype="float32"))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                    init_lora_weights=False))
    model.train()
    enable_fast_path(model, "auto")
    for module in model.modules():
        if hasattr(module, "keep_dequantized"):
            module.keep_dequantized = keep_dequantized
        if isinstance(module, Linear4bit):
            module.cpu_kernel = cpu_kernel
    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(compiled)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    decoded, decode = [], cpu_decode.decode
    monkeypatch.setattr(cpu_decode, "decode", lambda *args, **kwargs: decoded.append(1) or decode(*args, **kwargs))
    losses = []
    for m in (model, compiled):
        losses.append(causal_lm_loss(m, batch))
        losses[-1].backward()
        decoded.append(0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager_calls, compiled_calls = decoded.index(0), len(decoded) - decoded.index(0) - 2
    layers = sum(isinstance(m, Linear4bit) for m in model.modules())
    kernel = bits == 4 and cpu_kernel and cpu_decode.status() is None
    assert compiled_calls == 0  # traced: the kernel would break the graph
    # (the first block's q/k/v need no input gradient: 2 · 21 - 3 decodes)
    assert eager_calls == (0 if not kernel else layers if keep_dequantized else 2 * layers - 3)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    want, got = _grads(model), _grads(compiled)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    eager_saved, compiled_saved = _saved_elements(model, batch), _saved_elements(compiled, batch)
    assert compiled_saved <= eager_saved, (compiled_saved, eager_saved)  # kept weights would add 27,648 elements


def test_blocks_over_a_4bit_base_on_the_cpu_compile_to_scalar_code():
    """Inductor's vectorized code for the decode's table look-ups is slower than its scalar code (see
    compilation._SCALAR); other models keep the vectorized kernels."""
    four, eight = tiny_llama(), tiny_llama()
    quantize(four, QuantConfig(compute_dtype="float32"))
    quantize(eight, QuantConfig(bits=8, compute_dtype="float32"))
    assert compile_options(four) == {"fallback_random": True, "cpp.simdlen": 0}
    assert compile_options(eight) == compile_options(tiny_llama()) == {"fallback_random": True}


def test_a_model_without_blocks_or_a_cpu_without_a_compiler_is_refused(monkeypatch):
    with pytest.raises(ValueError):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    kernels = tiny_llama()
    quantize(kernels, QuantConfig(compute_dtype="float32"))
    kernels.model.layers[1].mlp.up_proj.matmul_backend = lambda x, layer, transpose: x  # as the Triton kernels
    with pytest.raises(ValueError, match="run the Triton kernels .* set training.kernels: torch"):
        compile_blocks(kernels)
    assert compiled_blocks(kernels) == 0
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu_compiler() is None
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler .* '/nonexistent/c\\+\\+' was not found"):
        compile_blocks(model)
    assert compiled_blocks(model) == 0
