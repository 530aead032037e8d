"""The Triton 4-bit kernels against the pure-torch reference.

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
first imported); tests marked ``gpu`` compile them for CUDA and also compare with bitsandbytes.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from oracles import bitsandbytes_oracle

from slimtune.perf import kernels  # noqa: E402
from slimtune.quant import Linear4bit  # noqa: E402

# tests/conftest.py chooses the interpreter before triton is imported; if it is not active, that failed (a
# silent skip here once hid every kernel test of a run), so say so instead of skipping.
if not torch.cuda.is_available() and kernels.triton_status("cpu") is not None:
    raise RuntimeError(f"Triton's interpreter is not active: {kernels.triton_status('cpu')}")
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter tests run on CPU-only machines")
gpu = pytest.mark.gpu


def quantized(out_f: int, in_f: int, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
              device: str = "cpu", seed: int = 0) -> Linear4bit:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=False).to(device)
    return Linear4bit.from_linear(linear, quant_type, double_quant, blocksize, compute_dtype=torch.float32)


# (out, in, blocksize, double quant, quant type): odd sizes, a short last block, blocksize 32 and 4096
CASES = [(96, 128, 64, True, "nf4"), (33, 70, 64, False, "fp4"), (3, 341, 32, True, "nf4"),
         (5, 4096, 4096, True, "nf4"), (300, 301, 256, False, "nf4")]


@interpreter
@pytest.mark.parametrize("out_f,in_f,blocksize,dq,qt", CASES)
def test_dequantize_kernel_is_bit_identical(out_f, in_f, blocksize, dq, qt):
    layer = quantized(out_f, in_f, blocksize, dq, qt)
    w = kernels.weight_4bit(layer)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = kernels.dequantize_4bit(w, dtype, use_triton=True)
        assert got.dtype == dtype and got.shape == (out_f, in_f)
        assert torch.equal(got, layer.dequantize(dtype)), dtype


@interpreter
@pytest.mark.parametrize("out_f,in_f,blocksize,rows", [(96, 128, 64, 5), (70, 36, 32, 40), (33, 66, 256, 3)])
def test_fused_matmul_forward_and_backward_layouts(out_f, in_f, blocksize, rows):
    layer = quantized(out_f, in_f, blocksize)
    w, weight = kernels.weight_4bit(layer), layer.dequantize(torch.float32)
    torch.manual_seed(1)
    x, g = torch.randn(2, rows, in_f), torch.randn(rows, out_f)
    torch.testing.assert_close(kernels.matmul_4bit(x, w, transpose=True, use_triton=True), x @ weight.T)
    torch.testing.assert_close(kernels.matmul_4bit(g, w, transpose=False, use_triton=True), g @ weight)
    half = kernels.matmul_4bit(x.half(), w, use_triton=True)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, kernels.matmul_4bit(x.half(), w, use_triton=False), rtol=2e-3, atol=2e-3)


@interpreter
@pytest.mark.parametrize("tile", [{}, {"BR": 64, "BP": 64}])  # the second: two 32-blocks per tile lane
@pytest.mark.parametrize("out_f,in_f,blocksize", [(70, 96, 32), (33, 35, 32), (40, 128, 64)])
def test_matmul_covers_partial_tiles_odd_widths_and_multi_block_lanes(out_f, in_f, blocksize, tile, monkeypatch):
    """Every output tile (the partial last ones too) is computed: two different inputs in a row, so a tile the
    launch skipped would keep the first call's (or uninitialised) values."""
    from slimtune.perf.kernels import nf4_matmul

    monkeypatch.setattr(nf4_matmul, "INTERPRETER_TILE", {**nf4_matmul.INTERPRETER_TILE, **tile})
    layer = quantized(out_f, in_f, blocksize, seed=4)
    w, weight = kernels.weight_4bit(layer), layer.dequantize(torch.float32)
    # The scales followed by NaN: a tile lane past its row's end read the scale after the last (a NaN there gave
    # NaN outputs, 0 · NaN, in the last column, on whatever that memory held).
    scales = w.block_scales()
    guarded = torch.cat((scales, torch.full((256,), float("nan"))))[: scales.numel()]
    monkeypatch.setattr(type(w), "block_scales", lambda self: guarded)
    for seed in (5, 6):
        torch.manual_seed(seed)
        x, g = torch.randn(37, in_f), torch.randn(19, out_f)  # 37 and 19 rows: partial row tiles
        torch.testing.assert_close(kernels.matmul_4bit(x, w, transpose=True, use_triton=True), x @ weight.T)
        torch.testing.assert_close(kernels.matmul_4bit(g, w, transpose=False, use_triton=True), g @ weight)


def test_launch_grid_counts_partial_tiles():
    from slimtune.perf.kernels.nf4_matmul import launch_grid, m_bucket

    assert launch_grid(37, 70, {"BM": 16, "BP": 32}) == (3 * 3,)
    assert launch_grid(32, 64, {"BM": 16, "BP": 32}) == (2 * 2,)
    assert [m_bucket(m) for m in (1, 16, 17, 2048, 2049)] == [16, 16, 32, 2048, 4096]


@interpreter
def test_fused_lora_at_batch_one_runs_the_gemv_and_matches(monkeypatch):
    """Generation's batch-1 step inside the fused LoRA node goes through the GEMV kernel, with the same result."""
    from slimtune.perf.fused_lora import fused_lora_linear
    from slimtune.perf.kernels import gemv

    calls = []
    real = gemv.gemv_4bit_triton
    monkeypatch.setattr(gemv, "gemv_4bit_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    layer = quantized(48, 64)
    torch.manual_seed(7)
    x, A, B = torch.randn(1, 1, 64), torch.randn(8, 64), torch.randn(48, 8)
    expected = x @ layer.dequantize(torch.float32).T + 0.5 * (x @ A.T) @ B.T
    previous = kernels.set_default_use_triton(True)
    try:
        got = fused_lora_linear(x, layer, A, B, 0.5)
    finally:
        kernels.set_default_use_triton(previous)
    assert calls, "the batch-1 step did not take the GEMV kernel"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@interpreter
@pytest.mark.parametrize("out_f,in_f,blocksize,dq", [(96, 128, 64, True), (33, 66, 32, False), (17, 4096, 4096, True),
                                                    (40, 96, 32, False)])
def test_gemv_kernel(out_f, in_f, blocksize, dq, monkeypatch):
    from slimtune.perf.kernels import gemv

    layer = quantized(out_f, in_f, blocksize, dq)
    w, weight = kernels.weight_4bit(layer), layer.dequantize(torch.float32)
    real = gemv.scale_args  # the scales followed by NaN: a step's blocks past a row's end must not be read

    def guarded(w4):
        absmax, *rest = real(w4)
        pad = torch.full((256,), float("nan")) if absmax.is_floating_point() else torch.zeros(256, dtype=absmax.dtype)
        return (torch.cat((absmax, pad))[: absmax.numel()], *rest)

    monkeypatch.setattr(gemv, "scale_args", guarded)
    torch.manual_seed(2)
    x = torch.randn(1, 3, in_f)  # three rows of x: three programs along the grid's second axis
    torch.testing.assert_close(kernels.gemv_4bit(x, w, use_triton=True), x @ weight.T)
    got = kernels.gemv_4bit(x[0, :1].half(), w, use_triton=True)
    torch.testing.assert_close(got, (x[0, :1] @ weight.T).half(), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="at most 16 rows"):
        kernels.gemv_4bit(torch.randn(17, in_f), w, use_triton=True)


@interpreter
def test_fused_lora_runs_through_the_kernels(monkeypatch):
    from slimtune.perf.fused_lora import fused_lora_linear
    from slimtune.perf.kernels import nf4_matmul

    calls = []
    real = nf4_matmul.matmul_4bit_triton
    monkeypatch.setattr(nf4_matmul, "matmul_4bit_triton", lambda *a: calls.append(a[2]) or real(*a))
    layer = quantized(48, 64)
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64)
    A, B = torch.randn(8, 64), torch.randn(48, 8)
    results = {}
    for use in (False, True):
        previous = kernels.set_default_use_triton(use)
        try:
            xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
            out = fused_lora_linear(xs, layer, As, Bs, 0.5)
            results[use] = (out, *torch.autograd.grad(out.square().sum(), (xs, As, Bs)))
        finally:
            kernels.set_default_use_triton(previous)
    assert calls == [True, False]  # forward x Wᵀ and backward g W, both through the kernel
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auto_mode_uses_the_reference_on_cpu_and_true_explains_itself(monkeypatch):
    layer = quantized(8, 64)
    w = kernels.weight_4bit(layer)
    assert not kernels.use_triton_for("cpu", None)
    assert torch.equal(kernels.dequantize_4bit(w, use_triton=None), layer.dequantize(torch.float32))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.dequantize_4bit(w, use_triton=True)
    with pytest.raises(ValueError, match="needs 64"):
        kernels.matmul_4bit(torch.randn(2, 63), w)


# ---- GPU: compiled kernels, bitsandbytes, a short QLoRA run ------------------------------------------------------
def _bnb_weight(out_f: int, in_f: int, dtype=torch.bfloat16):
    bnb = bitsandbytes_oracle()
    torch.manual_seed(0)
    dense = torch.randn(out_f, in_f, dtype=dtype) * 0.02
    param = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True,
                              blocksize=64).cuda()
    qs = param.quant_state
    w = kernels.Weight4bit(param.data, qs.absmax, qs.code, (out_f, in_f), qs.blocksize, qs.state2.absmax,
                           qs.offset, qs.state2.code)
    return bnb, param, w


@gpu
@pytest.mark.parametrize("out_f,in_f,blocksize,dq,qt", CASES)
def test_gpu_dequantize_bit_identical(out_f, in_f, blocksize, dq, qt):
    layer = quantized(out_f, in_f, blocksize, dq, qt, device="cuda")
    w = kernels.weight_4bit(layer)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(kernels.dequantize_4bit(w, dtype, use_triton=True), layer.dequantize(dtype))


@gpu
def test_gpu_kernels_match_bitsandbytes():
    bnb, param, w = _bnb_weight(1024, 512)
    ref = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    torch.testing.assert_close(kernels.dequantize_4bit(w, torch.bfloat16, use_triton=True), ref, rtol=0, atol=0)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.gemv_4bit(x, w, use_triton=True),
                               bnb.matmul_4bit(x, param.t(), quant_state=param.quant_state), rtol=2e-2, atol=2e-2)
    xs = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(kernels.matmul_4bit(xs, w, use_triton=True),
                               bnb.matmul_4bit(xs, param.t(), quant_state=param.quant_state), rtol=2e-2, atol=5e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matmul_and_gemv(dtype):
    layer = quantized(1000, 704, device="cuda")
    w, weight = kernels.weight_4bit(layer), layer.dequantize(dtype)
    x, g = torch.randn(300, 704, device="cuda", dtype=dtype), torch.randn(300, 1000, device="cuda", dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(kernels.matmul_4bit(x, w, use_triton=True), x @ weight.T, **tol)
    torch.testing.assert_close(kernels.matmul_4bit(g, w, transpose=False, use_triton=True), g @ weight, **tol)
    torch.testing.assert_close(kernels.gemv_4bit(x[:1], w, use_triton=True), x[:1] @ weight.T, **tol)


@gpu
def test_gpu_short_qlora_run_matches_the_pure_torch_path():
    from tiny_models import tiny_llama

    import slimtune
    from slimtune.perf.fused_lora import use_fused_lora
    from slimtune.perf.losses import causal_lm_loss
    from slimtune.quant import QuantConfig, quantize

    losses = {}
    for fused in (False, True):
        model = quantize(tiny_llama(layers=2).cuda(), QuantConfig(compute_dtype="bfloat16"))
        slimtune.add_adapter(model, slimtune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        if fused:
            use_fused_lora(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(0)
        ids = torch.randint(3, 128, (2, 32), device="cuda")
        batch = {"input_ids": ids, "labels": ids}
        losses[fused] = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = (causal_lm_loss(model, batch, chunk_size=16, reduction="mean") if fused
                        else model(**batch).loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[fused].append(loss.item())
    assert losses[False][-1] < losses[False][0]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2, atol=2e-2)


@interpreter
def test_64_bit_offsets_give_the_same_results(monkeypatch):
    """Weights of 2^31 elements or more switch the kernels to 64-bit offsets; run that branch here."""
    from slimtune.perf.kernels import gemv, nf4_dequant, nf4_matmul

    layer = quantized(40, 128, 64)
    w, weight = kernels.weight_4bit(layer), layer.dequantize(torch.float32)
    torch.manual_seed(3)
    x = torch.randn(3, 128)
    seen = []
    real = nf4_dequant.wide
    monkeypatch.setattr(nf4_dequant, "WIDE_FROM", 1)
    for module in (nf4_dequant, nf4_matmul, gemv):
        monkeypatch.setattr(module, "wide", lambda *n: seen.append(real(*n)) or seen[-1])
    assert torch.equal(kernels.dequantize_4bit(w, torch.float32, use_triton=True), weight)
    torch.testing.assert_close(kernels.matmul_4bit(x, w, transpose=True, use_triton=True), x @ weight.T)
    torch.testing.assert_close(kernels.gemv_4bit(x, w, use_triton=True), x @ weight.T)
    assert seen == [True] * 3


@interpreter
def test_kernel_outputs_can_be_modified_in_place_under_autograd():
    """The kernels return tensors of their own, never views: a model may add into a 4-bit layer's output in place
    (Falcon does), which autograd forbids on a view made inside a custom function."""
    import functools

    layer = quantized(48, 64)
    w = kernels.weight_4bit(layer)
    torch.manual_seed(4)
    for x in (torch.randn(5, 64), torch.randn(2, 3, 64)):
        assert kernels.matmul_4bit(x, w, use_triton=True)._base is None
        assert kernels.gemv_4bit(x[..., :1, :], w, use_triton=True)._base is None
    reference = copy.deepcopy(layer)
    layer.matmul_backend = functools.partial(kernels.linear_4bit, use_triton=True)
    for rows in (3, 12):  # 6 rows: the GEMV; 24: the matmul kernel
        grads = []
        for model in (layer, reference):
            x = torch.randn(2, rows, 64, generator=torch.Generator().manual_seed(5)).requires_grad_()
            out = model(x)
            out += 1.0
            out.mul_(2.0)
            grads.append(torch.autograd.grad(out.square().sum(), x)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
