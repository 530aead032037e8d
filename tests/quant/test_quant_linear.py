"""Linear4bit / Linear8bit: forward and backward against full precision, frozen state, state dicts
identical to bitsandbytes' modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import bitsandbytes_oracle
from torch import nn

from slimtune.quant import Linear4bit, Linear8bit, QuantizedLinear, dequantize_int8_rowwise, quantize_int8_rowwise
from slimtune.quant import linear as linear_mod


def _linear(out_f=48, in_f=80, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("make", [
    lambda lin: Linear4bit.from_linear(lin, "nf4", double_quant=True),
    lambda lin: Linear4bit.from_linear(lin, "fp4", double_quant=False, blocksize=32),
    lambda lin: Linear8bit.from_linear(lin),
])
def test_forward_and_input_grad_match_full_precision_with_dequantized_weight(make):
    lin = _linear()
    q = make(lin)
    assert isinstance(q, QuantizedLinear) and (q.in_features, q.out_features) == (80, 48)
    w = q.dequantize()
    assert w.shape == (48, 80) and w.dtype == torch.float32
    assert (w - lin.weight).abs().max() < 0.25 * lin.weight.abs().max()  # a quantization of lin.weight
    x = torch.randn(3, 5, 80, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = q(x)
    ref = F.linear(x_ref, w, lin.bias.detach())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(b.grad is None for b in q.buffers())


def test_backward_dequantizes_again_instead_of_keeping_the_weight(monkeypatch):
    q = Linear4bit.from_linear(_linear(bias=False))
    calls = []
    original = Linear4bit.transient_weight
    monkeypatch.setattr(Linear4bit, "transient_weight",
                        lambda self, dtype, backward=False: calls.append(backward) or original(self, dtype, backward))
    x = torch.randn(4, 80, requires_grad=True)
    out = q(x)
    assert len(calls) == 1
    # nothing but the graph's own bookkeeping is saved: no (out, in) weight tensor
    saved = [t for t in getattr(out.grad_fn, "saved_tensors", ())]
    assert all(t.shape != (48, 80) for t in saved)
    out.sum().backward()
    assert calls == [False, True] and x.grad is not None  # the backward's decode says so (see transient_weight)
    q(torch.randn(4, 80)).sum()  # no input grad: forward only
    assert len(calls) == 3


def test_keeping_the_dequantized_weight_saves_the_second_dequantization(monkeypatch):
    q = Linear4bit.from_linear(_linear(bias=False))
    reference = torch.randn(4, 80, requires_grad=True)
    expected = torch.autograd.grad(q(reference).square().sum(), reference)[0]
    calls = []
    original = Linear4bit.dequantize
    monkeypatch.setattr(Linear4bit, "dequantize", lambda self, dtype=None: calls.append(dtype) or original(self, dtype))
    q.keep_dequantized = True
    x = reference.detach().clone().requires_grad_(True)
    out = q(x)
    assert len(calls) == 1
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert len(calls) == 1  # the backward used the kept weight
    torch.testing.assert_close(grad, expected, atol=0, rtol=0)


def test_transient_weights_share_one_buffer_per_size_and_stay_exact():
    a, b = Linear4bit.from_linear(_linear(bias=False)), Linear4bit.from_linear(_linear(bias=False, seed=1))
    wa = a.transient_weight(torch.float32).clone()
    wb = b.transient_weight(torch.float32)
    assert torch.equal(wa, a.dequantize()) and torch.equal(wb, b.dequantize())
    assert a.transient_weight(torch.float32).data_ptr() == wb.data_ptr()  # the same buffer, reused


def test_decoding_follows_a_code_book_replaced_through_data():
    """`quant_map.data = …` swaps the buffer's storage without bumping its version: the cached decoding table kept
    serving the old code book (a plain in-place change was already seen)."""
    q = Linear4bit.from_linear(_linear(bias=False))
    before = q.dequantize()
    q.quant_map.data = q.quant_map.data * 3.0
    torch.testing.assert_close(q.dequantize(), before * 3.0)
    with torch.no_grad():
        q.quant_map.mul_(0.5)
    torch.testing.assert_close(q.dequantize(), before * 1.5)


def test_compute_dtype_and_output_dtype():
    q = Linear4bit.from_linear(_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 80)
    out = q(x)
    assert out.dtype == torch.float32 and q.dequantize().dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, q.dequantize(torch.float32), q.bias), atol=0.1, rtol=0.05)
    assert Linear4bit.from_linear(_linear()).compute_dtype == torch.float32  # CPU default


def test_quantizing_a_quantized_layer_is_refused():
    q = Linear4bit.from_linear(_linear())
    with pytest.raises(ValueError, match="already quantized"):
        Linear4bit.from_linear(q)
    with pytest.raises(ValueError, match="already quantized"):
        Linear8bit.from_linear(Linear8bit.from_linear(_linear()))
    with pytest.raises(ValueError, match="Embedding"):
        Linear4bit.from_linear(nn.Embedding(4, 4))


def test_extra_repr_names_the_format():
    text = repr(Linear4bit.from_linear(_linear(), "nf4", double_quant=True, blocksize=128))
    for part in ("in_features=80", "out_features=48", "bias=True", "quant_type=nf4", "blocksize=128",
                 "double_quant", "compute_dtype=float32"):
        assert part in text
    assert "int8 row-wise" in repr(Linear8bit.from_linear(_linear()))


def test_gpt2_conv1d_is_quantized_with_its_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 80)  # nf=48 outputs, nx=80 inputs; weight (80, 48)
    nn.init.normal_(conv.weight, std=0.02)
    nn.init.normal_(conv.bias, std=0.02)
    q = Linear4bit.from_linear(conv)
    x = torch.randn(3, 80)
    assert (q.in_features, q.out_features) == (80, 48)
    torch.testing.assert_close(q(x), conv(x), atol=0.05, rtol=0.1)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), conv.bias), atol=1e-6, rtol=0)


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128)])
def test_state_dict_identical_to_bitsandbytes_linear4bit(quant_type, double_quant, blocksize):
    bnb = bitsandbytes_oracle()
    lin = _linear(out_f=64, in_f=96)
    ref = bnb.nn.Linear4bit(96, 64, bias=True, compute_dtype=torch.float32, compress_statistics=double_quant,
                            quant_type=quant_type)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                   compress_statistics=double_quant, quant_type=quant_type)
    ref.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    ref = ref.to("cpu")  # moving a Params4bit to a device quantizes it
    expected = ref.state_dict()
    got = Linear4bit.from_linear(lin, quant_type, double_quant, blocksize).state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    x = torch.randn(5, 96)
    back = Linear4bit(96, 64, True, quant_type, blocksize, double_quant)
    back.load_state_dict(expected)
    torch.testing.assert_close(back(x), ref(x), atol=1e-5, rtol=1e-5)


def test_int8_rowwise_matches_bitsandbytes(bnbF):
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(2))
    cb, scb = quantize_int8_rowwise(w)
    ref_cb, ref_scb, _ = bnbF.int8_vectorwise_quant(w.clone())
    assert cb.dtype == torch.int8 and torch.equal(cb, ref_cb) and torch.equal(scb, ref_scb)
    assert torch.equal(dequantize_int8_rowwise(cb, scb), bnbF.int8_vectorwise_dequant(cb, scb))
    ties = quantize_int8_rowwise(torch.tensor([[127.0, 0.5, 1.5, -2.5, 2.5000002]]))[0]
    assert ties.tolist() == [[127, 0, 2, -2, 3]]  # round half to even, like torch.round
    zero = quantize_int8_rowwise(torch.zeros(2, 8))
    assert torch.equal(zero[0], torch.zeros(2, 8, dtype=torch.int8)) and torch.equal(zero[1], torch.zeros(2))


def test_linear8bit_state_dict_reads_bitsandbytes_keys():
    bnb = bitsandbytes_oracle()
    lin = _linear(out_f=32, in_f=64)
    ref = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")
    sd = ref.state_dict()
    assert {"weight", "bias", "SCB", "weight_format"} <= set(sd)
    ours = Linear8bit(64, 32, bias=True)
    ours.load_state_dict(sd)
    assert torch.equal(ours.weight, sd["weight"]) and torch.equal(ours.SCB, sd["SCB"])
    assert set(ours.state_dict()) == set(sd)
    with pytest.raises(ValueError, match=r"missing key 'SCB'"):
        Linear8bit(64, 32).load_state_dict({"weight": sd["weight"], "bias": sd["bias"]})


def test_state_dict_errors_name_the_problem():
    q = Linear4bit.from_linear(_linear(out_f=64, in_f=96))
    sd = q.state_dict()
    qs_key = "weight.quant_state.bitsandbytes__nf4"
    with pytest.raises(ValueError, match=r"\[64, 96\] but the module .* \(48, 80\)"):
        Linear4bit(80, 48).load_state_dict(sd)
    for missing in ("weight.absmax", "weight.nested_absmax", "weight.quant_map"):
        with pytest.raises(ValueError, match=f"missing key '{missing}'"):
            Linear4bit(96, 64).load_state_dict({k: v for k, v in sd.items() if k != missing})
    bad = dict(sd)
    bad["weight.quant_state.bitsandbytes__int4"] = bad.pop(qs_key)
    with pytest.raises(ValueError, match=r"quant type 'int4' is not supported"):
        Linear4bit(96, 64).load_state_dict(bad)
    bad = dict(sd)
    bad[qs_key] = torch.tensor(list(bytes(sd[qs_key].tolist()).replace(b'"blocksize": 64', b'"blocksize": 48')),
                               dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"blocksize=48 is not supported"):
        Linear4bit(96, 64).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"without a 4-bit quant state"):
        Linear4bit(96, 64).load_state_dict({"weight": torch.randn(64, 96), "bias": torch.zeros(64)})


def test_default_compute_dtype():
    assert linear_mod.default_compute_dtype("cpu") == torch.float32
    assert linear_mod.default_compute_dtype("cuda") == torch.bfloat16


def test_dtype_casts_leave_the_quantized_state_alone():
    q = Linear4bit.from_linear(_linear(), "fp4", double_quant=False)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    w = q.dequantize()
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16 and q.absmax.dtype == torch.float32
    after = q.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert torch.equal(q.dequantize(), w)
    q8 = Linear8bit.from_linear(_linear()).half()
    assert q8.SCB.dtype == torch.float32 and q8.weight.dtype == torch.int8


def test_a_layer_first_run_under_inference_mode_still_trains():
    """The decode caches (scratch buffer, index buffer, byte-pair words) made first under inference_mode
    must be ordinary tensors: a later training forward writes into them and saves for backward."""
    torch.manual_seed(0)
    with torch.inference_mode():  # quantized and first run there, as a server loading a model would
        layer = Linear4bit.from_linear(_linear(out_f=52, in_f=96, seed=9), "nf4", double_quant=True)
        layer(torch.randn(3, 96))
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()
    expected = torch.ones(3, 52) @ layer.dequantize(torch.float32)
    torch.testing.assert_close(x.grad, expected)


def test_int8_codes_differ_from_bitsandbytes_int8params_only_by_its_fp16_cast():
    """What int8.py's docstring says: Int8Params casts the weight to fp16 before quantizing it."""
    bnb = bitsandbytes_oracle()
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    params = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    theirs, their_scb = params.data, params.SCB
    ours32, ours16 = quantize_int8_rowwise(w), quantize_int8_rowwise(w.half())
    assert torch.equal(ours16[0], theirs) and torch.equal(ours16[1], their_scb.float())
    assert not torch.equal(ours32[0], theirs) and (ours32[0].int() - theirs.int()).abs().max() <= 1


@pytest.mark.skipif(linear_mod.cpu_decode.status() is not None, reason="the CPU decode kernel cannot be built here")
def test_a_few_rows_without_gradients_run_the_cpu_gemv(monkeypatch):
    """Generation feeds one token (a few rows) at a time: the GEMV decodes W on the fly instead of writing the fp32
    weight; with a gradient to compute, more rows, or cpu_kernel off, the layer decodes and multiplies."""
    layer = Linear4bit.from_linear(_linear(out_f=40, in_f=128), compute_dtype=torch.float32)
    calls = []
    gemv = linear_mod.cpu_decode.gemv
    monkeypatch.setattr(linear_mod.cpu_decode, "gemv", lambda x, *a, **k: calls.append(x.shape[0]) or gemv(x, *a, **k))
    weight = layer.dequantize(torch.float32)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = layer(x)
    assert calls == [6]
    torch.testing.assert_close(y, F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    layer(x.requires_grad_()).sum().backward()  # training: decode + matmul, as its backward
    with torch.no_grad():
        layer(torch.randn(9, 128))  # more rows than the GEMV takes
        layer.cpu_kernel = False
        layer(torch.randn(1, 128))
    assert calls == [6]
