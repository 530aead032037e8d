"""The C++ 4-bit decode kernel for CPUs: the pure-torch decode's bits on every instruction set, chosen by
dequantize_4bit, and a clear fallback where it cannot be built."""

from __future__ import annotations

import pytest
import torch

from slimtune.quant import cpu_decode, nf4
from slimtune.quant.codebooks import codebook

needs_kernel = pytest.mark.skipif(cpu_decode.status() is not None, reason=f"{cpu_decode.status()}")


def _weight(shape, quant_type, blocksize, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w.view(-1)[:: max(1, w.numel() // 7)] *= 30  # outliers: blocks of different scales
    return nf4.quantize_4bit(w, quant_type, blocksize)


@needs_kernel
@pytest.mark.parametrize("isa", range(len(cpu_decode.ISA_NAMES)))
@pytest.mark.parametrize(("shape", "blocksize"), [((96, 64), 64), ((33, 31), 32), ((7, 45), 256), ((3, 1), 64),
                                                  ((130, 4096), 4096), ((5, 1000), 128)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_instruction_set_decodes_the_pure_torch_bits(isa, shape, blocksize, quant_type):
    """Whole blocks on each instruction set (capped: a CPU without AVX-512 runs the best it has), then the short
    last block and the pad nibble of an odd count; every byte value occurs."""
    packed, absmax = _weight(shape, quant_type, blocksize)
    n = shape[0] * shape[1]
    want = nf4.dequantize_4bit(packed, absmax, shape, quant_type, blocksize, cpu_kernel=False).reshape(-1)
    out = torch.full((n + 5,), 7.0)
    best = cpu_decode.ISA_NAMES.index(cpu_decode.isa())
    assert cpu_decode.decode(packed.reshape(-1), absmax, codebook(quant_type), n, blocksize, torch.empty(n)) == best
    used = cpu_decode.decode(packed.reshape(-1), absmax, codebook(quant_type), n, blocksize, out, isa_cap=isa)
    assert used == min(isa, best)
    assert torch.equal(out[:n], want)
    assert torch.equal(out[n:], torch.full((5,), 7.0))  # nothing written past n


@needs_kernel
def test_a_custom_code_book_and_non_finite_scales_decode_as_in_torch():
    """A checkpoint's quant_map is any 16 values; a NaN or inf scale gives what the pure-torch product gives."""
    packed, absmax = _weight((16, 64), "nf4", 64, seed=3)
    code = torch.randn(16, generator=torch.Generator().manual_seed(4))
    absmax[2], absmax[5] = float("nan"), float("inf")
    want = nf4.dequantize_4bit(packed, absmax, (16, 64), code=code, cpu_kernel=False)
    got = nf4.dequantize_4bit(packed, absmax, (16, 64), code=code)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_kernel
def test_dequantize_4bit_decodes_with_the_kernel_unless_told_not_to(monkeypatch):
    calls = []
    decode = cpu_decode.decode
    monkeypatch.setattr(cpu_decode, "decode", lambda *args, **kwargs: calls.append(args[3]) or decode(*args, **kwargs))
    packed, absmax = _weight((24, 40), "nf4", 32)
    buffer = torch.empty(2000)
    reused = nf4.dequantize_4bit(packed, absmax, (24, 40), blocksize=32, out=buffer)
    assert calls == [960] and reused.data_ptr() == buffer.data_ptr()  # decoded into the caller's buffer
    bf16 = nf4.dequantize_4bit(packed, absmax, (24, 40), blocksize=32, dtype=torch.bfloat16)
    reference = nf4.dequantize_4bit(packed, absmax, (24, 40), blocksize=32, dtype=torch.bfloat16, cpu_kernel=False)
    assert calls == [960, 960] and bf16.dtype == torch.bfloat16 and torch.equal(bf16, reference)
    want = nf4.dequantize_4bit(packed, absmax, (24, 40), blocksize=32, cpu_kernel=False)
    torch.testing.assert_close(reused, want, rtol=0, atol=0)
    assert calls == [960, 960]  # cpu_kernel=False: the gather


def test_without_a_compiler_or_switched_off_the_pure_torch_decode_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    packed, absmax = _weight((8, 64), "nf4", 64)
    want = nf4.dequantize_4bit(packed, absmax, (8, 64), cpu_kernel=False)
    monkeypatch.setattr(cpu_decode, "_STATE", {})
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cpu_decode.status() == "no C++ compiler found (install g++ or set CXX)"
    assert torch.equal(nf4.dequantize_4bit(packed, absmax, (8, 64)), want)
    with pytest.raises(RuntimeError, match="decode kernel is not available: no C\\+\\+ compiler"):
        cpu_decode.isa()
    monkeypatch.setattr(cpu_decode, "_STATE", {})
    monkeypatch.setenv(cpu_decode.ENV_SWITCH, "0")
    assert cpu_decode.status() == "switched off by SLIMTUNE_CPU_KERNELS=0"
    assert torch.equal(nf4.dequantize_4bit(packed, absmax, (8, 64)), want)
    assert not (tmp_path / "cpu_kernels").exists()


def test_a_failed_build_is_reported_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_decode, "_STATE", {})
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'decode_4bit.cpp:1: error: no headers here' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    reason = cpu_decode.status()
    assert reason is not None and reason.startswith("failing-c++ failed to build decode_4bit.cpp: ")
    assert "no headers here" in reason
    assert [p.name for p in (tmp_path / "cpu_kernels").rglob("*") if p.is_file()] == []
    packed, absmax = _weight((8, 64), "nf4", 64)
    torch.testing.assert_close(nf4.dequantize_4bit(packed, absmax, (8, 64)),
                               nf4.dequantize_4bit(packed, absmax, (8, 64), cpu_kernel=False), rtol=0, atol=0)


@needs_kernel
def test_a_build_is_keyed_by_its_source_and_written_whole(monkeypatch, tmp_path):
    """A fresh cache builds the library (one file, no temporary left); a second process-state reuses it."""
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_decode, "_STATE", {})
    assert cpu_decode.status() is None
    built = [p for p in (tmp_path / "cpu_kernels").rglob("*") if p.is_file()]
    assert [p.name for p in built] == ["decode_4bit.so"]
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_decode, "_STATE", {})
    assert cpu_decode.status() is None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_kernel
def test_bad_arguments_are_refused_with_what_was_expected():
    packed, absmax = _weight((4, 64), "nf4", 64)
    out = torch.empty(256)
    with pytest.raises(ValueError, match="out must be a contiguous torch.float32 CPU tensor of at least 256"):
        cpu_decode.decode(packed.reshape(-1), absmax, codebook("nf4"), 256, 64, out[::2])
    with pytest.raises(ValueError, match="code must be a contiguous torch.float32 CPU tensor of at least 16"):
        cpu_decode.decode(packed.reshape(-1), absmax, codebook("nf4").double(), 256, 64, out)
    with pytest.raises(ValueError, match="absmax must be .* at least 4 elements"):
        cpu_decode.decode(packed.reshape(-1), absmax[:3], codebook("nf4"), 256, 64, out)


@needs_kernel
def test_decoding_into_a_buffer_autograd_saved_is_caught():
    """The kernel writes through a pointer; the buffer's version still moves, so a backward that saved the buffer
    (a misuse of a reused buffer) fails loudly instead of using the new weight."""
    packed, absmax = _weight((4, 64), "nf4", 64)
    buffer = torch.empty(256)
    weight = nf4.dequantize_4bit(packed, absmax, (4, 64), out=buffer)
    x = torch.randn(3, 64, requires_grad=True)
    y = (x @ weight.T).sum()  # saves weight, a view of buffer, for x's gradient
    nf4.dequantize_4bit(packed, absmax, (4, 64), out=buffer)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@needs_kernel
@pytest.mark.parametrize("isa", [0, len(cpu_decode.ISA_NAMES) - 1])
@pytest.mark.parametrize(("out_features", "in_features", "blocksize"), [(96, 128, 64), (7, 64, 32), (33, 512, 256)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_gemv_equals_decode_then_matmul(isa, out_features, in_features, blocksize, rows):
    packed, absmax = _weight((out_features, in_features), "nf4", blocksize, seed=rows)
    weight = nf4.dequantize_4bit(packed, absmax, (out_features, in_features), blocksize=blocksize)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(9))
    done = cpu_decode.gemv(x, packed.reshape(-1), absmax, codebook("nf4"), out_features, blocksize, isa_cap=isa)
    assert done is not None
    y, used = done
    best = cpu_decode.ISA_NAMES.index(cpu_decode.isa())
    assert used == (2 if isa == 2 and best == 2 else 0)  # AVX2 CPUs: the portable loop (decode + BLAS is faster)
    torch.testing.assert_close(y, x @ weight.T, rtol=1e-5, atol=1e-5 * float(weight.abs().max()) * in_features ** 0.5)


@needs_kernel
def test_the_gemv_declines_what_it_does_not_cover(monkeypatch):
    packed, absmax = _weight((16, 96), "nf4", 64)  # a row of 96 is not whole blocks of 64
    assert cpu_decode.gemv(torch.randn(1, 96), packed.reshape(-1), absmax, codebook("nf4"), 16, 64) is None
    packed, absmax = _weight((16, 128), "nf4", 64)
    code = codebook("nf4")
    assert cpu_decode.gemv(torch.randn(cpu_decode.GEMV_ROWS + 1, 128), packed.reshape(-1), absmax, code, 16, 64) is None
    with pytest.raises(ValueError, match="gemv: x must be a contiguous torch.float32 CPU tensor"):
        cpu_decode.gemv(torch.randn(1, 128).double(), packed.reshape(-1), absmax, code, 16, 64)
    with pytest.raises(ValueError, match="gemv: absmax must be .* at least 32 elements"):
        cpu_decode.gemv(torch.randn(1, 128), packed.reshape(-1), absmax[:31], code, 16, 64)
    monkeypatch.setitem(cpu_decode._STATE, "gemv", False)  # as loaded on an AVX2 CPU: decode + BLAS instead
    assert cpu_decode.gemv(torch.randn(1, 128), packed.reshape(-1), absmax, code, 16, 64) is None
    assert cpu_decode.gemv(torch.randn(1, 128), packed.reshape(-1), absmax, code, 16, 64, isa_cap=0) is not None


def test_an_unwritable_cache_is_reported_not_raised(monkeypatch, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(blocked))
    monkeypatch.setattr(cpu_decode, "_STATE", {})
    reason = cpu_decode.status()
    if cpu_decode.cpu_compiler() is None:
        pytest.skip("no C++ compiler: the build is never tried")
    assert reason is not None and reason.startswith("cannot write the kernel to ") and "SLIMTUNE_CACHE" in reason
    packed, absmax = _weight((8, 64), "nf4", 64)
    torch.testing.assert_close(nf4.dequantize_4bit(packed, absmax, (8, 64)),
                               nf4.dequantize_4bit(packed, absmax, (8, 64), cpu_kernel=False), rtol=0, atol=0)
