"""Pure 4-bit functions: code books, rounding, packing, block-wise and double quantization,
bit-exact against bitsandbytes' CPU path."""

from __future__ import annotations

import pytest
import torch

from slimtune.quant import codebooks, nf4

SHAPES = [(64, 64), (100, 70), (576, 192), (3, 5), (1, 33), (7,)]


def test_codebooks_equal_bitsandbytes_tables(bnbF):
    for qt in ("nf4", "fp4"):  # bit for bit: FP4's code 8 is +0 there (a -0 here made saved files differ)
        theirs = bnbF.get_4bit_type(qt, device="cpu")
        assert torch.equal(codebooks.codebook(qt).view(torch.int32), theirs.view(torch.int32))
    assert torch.equal(codebooks.codebook("nf4"), torch.tensor(codebooks.NF4_VALUES))
    signed = codebooks.dynamic_map(signed=True)
    assert signed.shape == (256,) and torch.equal(signed, bnbF.create_dynamic_map(signed=True))
    assert torch.equal(codebooks.dynamic_map(signed=False), bnbF.create_dynamic_map(signed=False))
    assert signed[-1] == 1.0 and (signed == 0).sum() == 1 and torch.all(signed[1:] > signed[:-1])


def test_fp4_codebook_is_bit_pattern_order():
    code = codebooks.codebook("fp4") * 12
    assert code[:8].tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert torch.equal(code[8:], -code[:8])  # bit 3 is the sign


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nearest_code_matches_bucketize_on_ties_and_edges(quant_type):
    midpoints, order, _ = codebooks.rounding_table(quant_type)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    x = torch.cat([
        midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down),
        torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-30, -1e-30, 0.0026041667, -0.0026041667]),
        torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
    ])
    expected = order[torch.bucketize(x, midpoints)]  # ties (x == midpoint) go to the lower code
    assert torch.equal(nf4.nearest_code(x, quant_type), expected)
    code = codebooks.codebook(quant_type)
    on_mid = nf4.nearest_code(midpoints, quant_type).long()
    assert torch.all(code[on_mid] <= midpoints)  # FP4 has a degenerate midpoint between +0 and -0


def test_pack_puts_first_element_in_high_nibble():
    q = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = nf4.pack_4bit(q)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert torch.equal(nf4.unpack_4bit(packed, 5), q)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_bit_exact_with_bitsandbytes(bnbF, no_dynamo, quant_type, double_quant):
    gen = torch.Generator().manual_seed(3)
    for shape in SHAPES:
        for blocksize in (32, 64, 256, 4096):
            w = torch.randn(shape, generator=gen)
            w.view(-1)[:3] = 0.0  # exact zeros and tiny values hit the ±0 codes of FP4
            if w.numel() > 8:
                w.view(-1)[3:5] = torch.tensor([1e-7, -1e-7])
            ref_packed, st = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                quant_type=quant_type)
            packed, absmax = nf4.quantize_4bit(w, quant_type, blocksize)
            where = f"{shape} blocksize={blocksize}"
            assert packed.shape == ref_packed.shape and torch.equal(packed, ref_packed), where
            if double_quant:
                codes, absmax2, offset = nf4.double_quantize(absmax)
                assert torch.equal(offset, st.offset), where
                assert torch.equal(codes, st.absmax), where
                assert torch.equal(absmax2, st.state2.absmax), where
                assert torch.equal(st.state2.code, codebooks.dynamic_map()) and st.state2.blocksize == 256
                absmax = nf4.double_dequantize(codes, absmax2, offset)
            else:
                assert torch.equal(absmax, st.absmax), where
            expected = bnbF.dequantize_4bit(ref_packed, st)
            assert torch.equal(nf4.dequantize_4bit(packed, absmax, shape, quant_type, blocksize), expected), where


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_bit_exact(bnbF, dtype):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref_packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed, absmax = nf4.quantize_4bit(w, "nf4", 64)
    assert torch.equal(packed, ref_packed)
    codes, absmax2, offset = nf4.double_quantize(absmax)
    assert torch.equal(codes, st.absmax) and torch.equal(absmax2, st.state2.absmax)
    out = nf4.dequantize_4bit(packed, nf4.double_dequantize(codes, absmax2, offset), w.shape, "nf4", 64, dtype)
    assert out.dtype == dtype and torch.equal(out, bnbF.dequantize_4bit(ref_packed, st))


def test_chunked_quantization_equals_single_pass(monkeypatch):
    w = torch.randn(1000 * 64 + 40, generator=torch.Generator().manual_seed(5))  # short last block
    whole = nf4.quantize_4bit(w, "fp4", 64)
    monkeypatch.setattr(nf4, "_CHUNK", 1024)  # 62 chunks of 16 blocks + a partial one
    chunked = nf4.quantize_4bit(w, "fp4", 64)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    # dequantization, chunked too, against the formula code[q] * absmax[i // blocksize]
    q = nf4.unpack_4bit(whole[0], w.numel()).long()
    expected = codebooks.codebook("fp4")[q] * whole[1][torch.arange(w.numel()) // 64]
    assert torch.equal(nf4.dequantize_4bit(*whole, w.shape, "fp4", 64), expected)


def test_zero_blocks_match_bitsandbytes(bnbF):
    w = torch.zeros(4, 64)
    w[1] = torch.randn(64, generator=torch.Generator().manual_seed(6))
    w[2] = -0.0  # a block of negative zeros: absmax +0 (it was -0)
    for qt in ("nf4", "fp4"):
        ref_packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=qt)
        packed, absmax = nf4.quantize_4bit(w, qt, 64)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax.view(torch.int32), st.absmax.view(torch.int32))
        assert torch.equal(nf4.dequantize_4bit(packed, absmax, w.shape, qt, 64), bnbF.dequantize_4bit(ref_packed, st))


def test_quantize_blockwise_matches_bitsandbytes_kernel(bnbF):
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(5000, generator=gen), torch.zeros(256), torch.rand(300, generator=gen) * 1e-3])
    ref, st = bnbF.quantize_blockwise(x, blocksize=256)
    codes, absmax = nf4.quantize_blockwise(x, blocksize=256)
    assert torch.equal(codes, ref) and torch.equal(absmax, st.absmax)
    assert torch.equal(nf4.dequantize_blockwise(codes, absmax), bnbF.dequantize_blockwise(ref, st))


def test_double_quantization_is_accurate_and_compact():
    absmax = torch.rand(3000, generator=torch.Generator().manual_seed(8)) * 0.1 + 0.02
    codes, absmax2, offset = nf4.double_quantize(absmax)
    assert codes.dtype == torch.uint8 and absmax2.shape == (12,) and offset.shape == ()
    restored = nf4.double_dequantize(codes, absmax2, offset)
    assert (restored - absmax).abs().max() < 0.01 * absmax.max()


def test_double_quantization_of_scales_whose_fp32_sum_overflows_stays_finite():
    """Finite weights near 1e38: the scales' fp32 mean overflowed to inf and the whole layer decoded as NaN (as
    bitsandbytes' does); the mean is taken in fp64 then."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    w[:, 0] = 2e38
    packed, absmax = nf4.quantize_4bit(w, "nf4", 64)
    codes, absmax2, offset = nf4.double_quantize(absmax)
    assert torch.isfinite(offset) and offset == pytest.approx(2e38, rel=1e-6)
    decoded = nf4.dequantize_4bit(packed, nf4.double_dequantize(codes, absmax2, offset), w.shape, "nf4", 64)
    assert torch.isfinite(decoded).all() and (decoded[:, 0] / 2e38 - 1).abs().max() < 0.01
    small = torch.rand(300, generator=torch.Generator().manual_seed(4))
    assert torch.equal(nf4.double_quantize(small)[2], small.mean())  # the usual case: fp32's mean, as bitsandbytes


def test_nf4_double_quant_storage_is_under_4_13_bits():
    """QLoRA: 4 + 8/64 + 32/(64 * 256) ≈ 4.127 bits per weight, measured from the stored tensors."""
    w = torch.randn(576, 1536, generator=torch.Generator().manual_seed(9)) * 0.02
    packed, absmax = nf4.quantize_4bit(w, "nf4", 64)
    codes, absmax2, offset = nf4.double_quantize(absmax)
    stored = [packed, codes, absmax2, offset]
    bits = 8 * sum(t.numel() * t.element_size() for t in stored) / w.numel()
    assert 4.12 < bits <= 4.13
    no_dq = 8 * (packed.numel() + 4 * absmax.numel()) / w.numel()
    assert no_dq == pytest.approx(4.5)


def test_nf4_is_more_accurate_than_fp4_on_normal_weights():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(10))
    err = {}
    for qt in ("nf4", "fp4"):
        packed, absmax = nf4.quantize_4bit(w, qt, 64)
        err[qt] = (nf4.dequantize_4bit(packed, absmax, w.shape, qt, 64) - w).norm() / w.norm()
    assert err["nf4"] < err["fp4"] < 0.2


def test_bad_inputs_are_named():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"blocksize=48 .*power of two from 32 to 4096"):
        nf4.quantize_4bit(w, "nf4", 48)
    with pytest.raises(ValueError, match=r"quant_type='int4' .*\['nf4', 'fp4'\]"):
        nf4.quantize_4bit(w, "int4")
    with pytest.raises(ValueError, match=r"torch.int64"):
        nf4.quantize_4bit(torch.ones(8, 8, dtype=torch.int64))
    packed, absmax = nf4.quantize_4bit(w, "nf4", 32)
    with pytest.raises(ValueError, match=r"absmax has 2 values .* needs 1"):
        nf4.dequantize_4bit(packed, absmax, (8, 8), "nf4", 64)
    with pytest.raises(ValueError, match=r"32 bytes but shape \(4, 4\) needs 8"):
        nf4.dequantize_4bit(packed, absmax, (4, 4), "nf4", 32)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_quantization_bit_exact_with_bitsandbytes_cuda_kernel(bnbF, quant_type):
    """On CUDA, slimtune's quantizer equals bitsandbytes' CUDA kernel (not its CPU path): short last blocks
    included, where the kernel multiplies by the fp32 reciprocal of the block's absmax and the CPU divides."""
    gen = torch.Generator().manual_seed(6)
    for shape in SHAPES + [(4096 * 3 + 17,)]:
        for blocksize in (64, 128, 4096):
            w = torch.randn(shape, generator=gen).cuda()
            for dtype in (torch.float32, torch.bfloat16):
                ref_packed, st = bnbF.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=True,
                                                    quant_type=quant_type)
                packed, absmax = nf4.quantize_4bit(w.to(dtype), quant_type, blocksize)
                where = f"{shape} blocksize={blocksize} {dtype}"
                assert torch.equal(packed, ref_packed), where
                codes, absmax2, offset = nf4.double_quantize(absmax)
                assert torch.equal(codes, st.absmax) and torch.equal(absmax2, st.state2.absmax), where
                assert torch.equal(offset, st.offset), where


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), [((48, 64), 64), ((7, 37), 64), ((5, 33), 32), ((3, 300), 128)])
def test_traceable_decode_equals_the_eager_decode_bit_for_bit(quant_type, shape, blocksize):
    """decode_4bit is what compiled blocks run: short last blocks and an odd count (the pad nibble) included."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    packed, absmax = nf4.quantize_4bit(w, quant_type, blocksize)
    code = codebooks.codebook(quant_type)
    want = nf4.dequantize_4bit(packed, absmax, shape, quant_type, blocksize)
    for second in (False, True):  # the backward's expression (see decode_4bit) gives the same bits
        got = nf4.decode_4bit(packed, absmax, shape, code, blocksize, second=second)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.equal(got, want), second
