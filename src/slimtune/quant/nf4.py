"""Block-wise 4-bit (NF4 / FP4) quantization with double quantization, as pure tensor functions.

Reference: QLoRA (Dettmers et al. 2023, arXiv:2305.14314), §3 and bitsandbytes' CPU/torch path,
which these functions reproduce bit for bit:

- flatten ``w`` row-major, cut into blocks of ``blocksize`` contiguous values (the last may be short);
- ``absmax_b = max |w_b|`` (fp32), ``x = clamp(w * (1 / absmax_b), -1, 1)`` for full blocks and
  ``x = clamp(w / absmax_b, -1, 1)`` for a short last block (bitsandbytes' exact arithmetic);
- ``q = nearest code`` (ties go to the lower code value);
- pack two codes per byte, first element in the HIGH nibble: ``byte = q[2i] << 4 | q[2i+1]``,
  stored as uint8 of shape ``((n + 1) // 2, 1)``.
- ``dequant = code[q] * absmax_b`` in fp32, then cast.

Double quantization (QLoRA §3): ``offset = mean(absmax)``; ``absmax - offset`` is quantized
block-wise (block 256) with the signed 8-bit dynamic map: ``absmax ≈ dmap[c] * absmax2[i // 256]
+ offset``. Cost: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight instead of 4.5.

Tensors are processed in chunks of whole blocks with reused scratch buffers, which bounds the
temporary memory and keeps the cheap element-wise passes in cache.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch

from slimtune.quant import cpu_decode
from slimtune.quant.codebooks import (
    GRID_BINS,
    byte_pair_words,
    check_quant_type,
    codebook,
    dynamic_map,
    rounding_table,
)

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "check_blocksize",
    "pack_4bit",
    "unpack_4bit",
    "nearest_code",
    "quantize_4bit",
    "dequantize_4bit",
    "decode_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "double_quantize",
    "double_dequantize",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# Elements per chunk: a multiple of every block size, in cache, and under torch's parallel grain
# (32768) so that each op runs on one thread: no OpenMP barrier per op, which makes a 2-core CPU
# shared with other processes 10-100x slower when every small op is split across both cores.
_CHUNK = 7 * 4096
_CHUNK_ACCEL = 1 << 22  # on GPUs: fewer, larger kernel launches
_DEQUANT_CHUNK = 1 << 20  # packed bytes per dequantization chunk on CPUs (a multiple of every block size / 2)
_LUT_BINS = 1 << 16  # bins of bitsandbytes' 8-bit CPU quantization table
# Decoding tables per code-book tensor (the standard books are cached tensors, a layer's quant_map a
# buffer), rebuilt when the tensor changes (its version counter or storage), and int32 index scratch per size: a
# training step decodes every weight twice, so neither is rebuilt or reallocated per call.
_WORDS: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}  # id -> (code, (version, storage), words)
_INDEX_SCRATCH: dict[tuple[str, int], torch.Tensor] = {}


def _decoding_words(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # made under inference_mode, the cache must still serve training
        words = _cached_words(code, device)
        if words is not None:
            return words
        words = byte_pair_words(code.to(device=device, dtype=torch.float32))
    if code.is_inference():  # no version counter to tell a change by: decoded afresh each time (65,536 words)
        return words
    key = id(code)

    def forget(_: weakref.ref) -> None:
        _WORDS.pop(key, None)

    _WORDS[key] = (weakref.ref(code, forget), (code._version, code.data_ptr()), words)  # `.data = …` swaps storage
    return words


def _cached_words(code: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    hit = _WORDS.get(id(code))
    if hit is None or code.is_inference() or hit[0]() is not code or hit[2].device != device:
        return None
    return hit[2] if hit[1] == (code._version, code.data_ptr()) else None


def _index_buffer(device: torch.device, numel: int, reuse: bool) -> torch.Tensor:
    if not reuse:
        return torch.empty(numel, dtype=torch.int32, device=device)
    key = (str(device), numel)
    if key not in _INDEX_SCRATCH:
        with torch.inference_mode(False):  # an ordinary tensor, whatever mode first asks for it
            _INDEX_SCRATCH[key] = torch.empty(numel, dtype=torch.int32, device=device)
    return _INDEX_SCRATCH[key]


def check_blocksize(blocksize: int) -> int:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize!r} is not supported; use a power of two from 32 to 4096: "
                         f"{list(BLOCKSIZES)}")
    return blocksize


QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float(w: torch.Tensor, what: str) -> None:
    if w.dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {w.dtype}")


def pack_4bit(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``q`` (uint8, values < 16, flattened) two per byte, first in the high nibble.

    An odd count is padded with a zero nibble. Returns uint8 of shape ``((n + 1) // 2,)``.
    """
    q = q.reshape(-1).to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat((q, q.new_zeros(1)))
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``n`` 4-bit codes as uint8 ``(n,)``."""
    packed = packed.reshape(-1)
    q = torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)
    return q[:n]


class _Workspace:
    """Scratch buffers reused across chunks: fresh multi-MiB allocations cost page faults that
    dominate these cheap element-wise passes on CPU."""

    def __init__(self, size: int, device: torch.device):
        self.f32 = torch.empty(size, dtype=torch.float32, device=device)
        self.i32 = torch.empty(size, dtype=torch.int32, device=device)
        self.u8 = torch.empty(size, dtype=torch.uint8, device=device)
        self.u8_out = torch.empty(size, dtype=torch.uint8, device=device)
        self.mask = torch.empty(size, dtype=torch.bool, device=device)


def _nearest_code_into(x: torch.Tensor, quant_type: str, ws: _Workspace) -> torch.Tensor:
    m = x.numel()
    midpoints, order, grid = rounding_table(quant_type, x.device)
    guard = torch.cat((midpoints, midpoints.new_full((1,), float("inf"))))  # (16,)
    f32, i32, lo, mask = ws.f32[:m], ws.i32[:m], ws.u8[:m], ws.mask[:m]
    torch.add(x, 1.0, out=f32).mul_(GRID_BINS / 2)
    i32.copy_(f32).clamp_(0, GRID_BINS)  # float -> int truncates: the grid bin (clamp: NaN weights)
    torch.index_select(grid, 0, i32, out=lo)  # lower bound of the bucket
    i32.copy_(lo)
    torch.index_select(guard, 0, i32, out=f32)  # the one midpoint that may lie in the bin
    lo.add_(torch.gt(x, f32, out=mask))  # bucket = #{midpoints < x}
    if quant_type == "nf4":  # sorted code book: the bucket is the code
        return lo
    i32.copy_(lo)
    return torch.index_select(order, 0, i32, out=ws.u8_out[:m])


def nearest_code(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit code (uint8) of the code-book value nearest to each ``x`` in [-1, 1], ties to the lower.

    Equal to ``order[torch.bucketize(x, midpoints)]`` (bitsandbytes' rule) but faster: a uniform
    grid gives a lower bound ``lo`` of the bucket and one comparison with ``midpoints[lo]``
    finishes it (a grid bin never holds two midpoints).
    """
    check_quant_type(quant_type)
    x = x.reshape(-1).float()
    return _nearest_code_into(x, quant_type, _Workspace(x.numel(), x.device)).clone()


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 4-bit quantization of ``w`` (any shape, fp32/fp16/bf16, any device).

    Returns ``(packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n / blocksize),))``.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    _check_float(w, "the weight to quantize")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    full = n - n % blocksize  # whole blocks; a multiple of 32, so they fill whole bytes
    nb = full // blocksize
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
    out = packed.view(-1)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    if nb:
        blocks = flat[:full].view(nb, blocksize)
        chunk_size = _CHUNK if flat.device.type == "cpu" else _CHUNK_ACCEL
        step = max(1, chunk_size // blocksize)  # blocks per chunk
        ws = _Workspace(min(nb, step) * blocksize, flat.device)
        scaled_buf = torch.empty(min(nb, step) * blocksize, dtype=torch.float32, device=flat.device)
        for b0 in range(0, nb, step):
            b1 = min(b0 + step, nb)
            m = (b1 - b0) * blocksize
            chunk = blocks[b0:b1]  # (b1 - b0, blocksize)
            am = absmax[b0:b1]
            am.copy_(torch.maximum(chunk.amax(dim=1), chunk.amin(dim=1).neg())).add_(0.0)  # max |w| (+0, not -0)
            # bitsandbytes multiplies by the reciprocal (clamped so that a zero block stays zero)
            inv = (1.0 / am.clamp(min=1e-38)).unsqueeze(1)
            scaled = scaled_buf[:m]
            torch.mul(chunk, inv, out=scaled.view(-1, blocksize)).clamp_(-1, 1)
            q = _nearest_code_into(scaled, quant_type, ws)
            hi = torch.bitwise_left_shift(q[0::2], 4, out=ws.u8_out[: m // 2] if quant_type == "nf4"
                                          else ws.mask[: m // 2].view(torch.uint8))
            torch.bitwise_or(hi, q[1::2], out=out[b0 * blocksize // 2: b1 * blocksize // 2])
    if full < n:  # the short last block: as bitsandbytes does on each device (the two differ, see below)
        tail = flat[full:].float()
        tail_max = tail.abs().amax().clamp(min=1e-38)
        absmax[nb] = tail_max
        scaled = torch.clamp(_scale_short_block(tail, tail_max), -1, 1)
        if scaled.numel() % 2:
            scaled = torch.cat((scaled, scaled.new_zeros(1)))  # the pad nibble is the code of 0.0
        q = nearest_code(scaled, quant_type)
        out[full // 2:] = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int], quant_type: str = "nf4",
                    blocksize: int = 64, dtype: torch.dtype = torch.float32,
                    code: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    cpu_kernel: bool = True) -> torch.Tensor:
    """``code[q] * absmax[block]`` in fp32, cast to ``dtype``, reshaped to ``shape``.

    ``code`` overrides the standard code book (e.g. a ``quant_map`` read from a checkpoint). ``out``: an
    fp32 buffer of at least ``2 · packed.numel()`` elements to decode into (reused across calls, it saves
    the allocation); the result is then a view of it when ``dtype`` is fp32. On a CPU the C++ kernel of
    :mod:`slimtune.quant.cpu_decode` decodes (the same bits; ``cpu_kernel=False`` or a kernel that cannot
    be built: the pure-torch gather below). Inside a graph torch.compile traces, :func:`decode_4bit`
    computes it (``out`` unused: the compiler plans the memory; see slimtune.perf.compilation).
    """
    check_blocksize(blocksize)
    n = 1
    for s in shape:
        n *= int(s)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed data has {packed.numel()} bytes but shape {tuple(shape)} needs {(n + 1) // 2}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} values but shape {tuple(shape)} with blocksize "
                         f"{blocksize} needs {-(-n // blocksize)}")
    if code is None:
        code = codebook(quant_type, packed.device)
    if torch.compiler.is_compiling():  # the tables and buffers below are cached by identity: not traceable
        return decode_4bit(packed, absmax.reshape(-1).float(), shape, code.float(), blocksize).to(dtype)
    absmax = absmax.reshape(-1).float()
    data = packed.reshape(-1)
    reuse = out is not None
    if out is None:
        out = torch.empty(2 * data.numel(), dtype=torch.float32, device=packed.device)
    values = out.reshape(-1)[: 2 * data.numel()]  # (n or n + 1,)
    if (cpu_kernel and packed.device.type == "cpu" and packed.dtype == torch.uint8 and code.numel() == 16
            and cpu_decode.status() is None):
        cpu_decode.decode(data.contiguous(), absmax.contiguous(), code.float().contiguous(), n, blocksize, values)
        torch.autograd.graph.increment_version(values)  # written through a pointer: autograd must see the change
        return values[:n].view(tuple(shape)).to(dtype)
    words = _decoding_words(code, packed.device)  # (256,) pairs of fp32
    pairs = values.view(torch.float64)  # (bytes,): element 2b and 2b + 1 as one word
    full = n - n % blocksize
    # Chunks of whole blocks bound the int32 index copy (4 bytes per packed byte) on large weights.
    step = _DEQUANT_CHUNK if packed.device.type == "cpu" else data.numel()
    index = _index_buffer(packed.device, min(step, data.numel()), reuse)
    if data.numel() <= step:  # one chunk: no slicing
        torch.index_select(words, 0, index.copy_(data), out=pairs)
        if full:
            values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    else:
        for b0 in range(0, data.numel(), step):
            b1 = min(b0 + step, data.numel())
            # one gather of an 8-byte word per byte decodes both nibbles, in element order
            torch.index_select(words, 0, index[: b1 - b0].copy_(data[b0:b1]), out=pairs[b0:b1])
            stop = min(2 * b1, full)
            if stop > 2 * b0:
                blocks = values[2 * b0: stop].view(-1, blocksize)
                blocks.mul_(absmax[2 * b0 // blocksize: stop // blocksize].unsqueeze(1))
    if full < n:
        values[full:n].mul_(absmax[full // blocksize])
    return values[:n].view(tuple(shape)).to(dtype)


def decode_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int], code: torch.Tensor,
                blocksize: int = 64, second: bool = False) -> torch.Tensor:
    """:func:`dequantize_4bit`'s fp32 weight, bit for bit, as plain tensor ops (no cached tables, no reused
    buffers): the form ``torch.compile`` traces, whose code generator fuses it into one pass over the packed bytes
    (inductor's scalar C++: about 1.4x faster than the eager decode on the development CPU, see
    slimtune.perf.compilation). ``absmax``: the fp32 block scales.

    ``second=True`` writes the same values as another expression (scale × code where the first form has code ×
    scale), for the backward's decode of a weight the forward decoded too: the compiler merges identical
    expressions, and would then keep the forward's fp32 weight alive until the backward instead of decoding it
    again (the memory QLoRA exists to save)."""
    n = 1
    for s in shape:
        n *= int(s)
    nibbles = packed.reshape(-1).to(torch.int32)
    full = n - n % blocksize

    def scaled(values: torch.Tensor) -> torch.Tensor:  # (bytes,): one nibble of each byte, times its block's scale
        head = values[: full // 2].view(-1, blocksize // 2)  # a byte's two elements share a block (sizes are even)
        scales = absmax[: full // blocksize, None]
        head = (scales * head if second else head * scales).view(-1)
        if full == n:
            return head
        tail, last = values[full // 2:], absmax[-1]  # the short last block (and the pad nibble of an odd count)
        return torch.cat((head, last * tail if second else tail * last))

    pairs = torch.stack((scaled(code[nibbles >> 4]), scaled(code[nibbles & 15])), dim=-1)  # high nibble first
    return pairs.reshape(-1)[:n].view(tuple(shape))


@functools.lru_cache(maxsize=8)
def _lut_8bit(code_bytes: bytes) -> torch.Tensor:
    """65,536-bin table: normalised value bin -> index of the nearest code (bitsandbytes' CPU LUT)."""
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    i = torch.arange(_LUT_BINS, dtype=torch.float32)
    # bin centre -1 + 2i / 65535, each step rounded to fp32 as in the C++ table builder
    centres = (2.0 * i) / torch.full_like(i, _LUT_BINS - 1) + (-1.0)
    # number of midpoints strictly below the centre = index of the nearest code, ties to the lower
    return torch.searchsorted(midpoints, centres, right=False).to(torch.uint8)


@functools.cache
def dynamic_lut(signed: bool, device: str) -> torch.Tensor:
    """The 65,536-bin table of bitsandbytes' (un)signed dynamic map, built once per device: a caller that
    quantizes on a GPU every step (8-bit optimizers) neither syncs with the CPU nor uploads it again."""
    return _lut_8bit(dynamic_map(signed).contiguous().numpy().tobytes()).to(device)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor | None = None,
                       blocksize: int = NESTED_BLOCKSIZE, lut: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit block-wise quantization with a sorted 256-entry map (bitsandbytes ``quantize_blockwise``).

    ``absmax_b = max |x_b|``; ``y = clamp(x * (1 / absmax_b), -1, 1)``; bitsandbytes' CPU kernel
    rounds ``y`` to one of 65,536 uniform bins, ``bin = trunc((y + 1) * 0.5 * 65535 + 0.5)``, and
    looks up the code nearest to the bin centre. Reproducing that (rather than exact nearest-code
    search) keeps the nested codes bit-identical. An all-zero block gets code 0, as in the kernel.
    ``lut``: that table, already on ``x``'s device (see :func:`dynamic_lut`), instead of ``code``.
    Returns ``(codes uint8 like x, absmax fp32 (nblocks,))``.
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _check_float(x, "the tensor to quantize")
    if lut is None:
        code = dynamic_map(True) if code is None else code.detach().to("cpu", torch.float32)
        lut = _lut_8bit(code.contiguous().numpy().tobytes()).to(x.device)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    padded = torch.cat((flat, flat.new_zeros(pad))) if pad else flat
    absmax = padded.view(nb, blocksize).abs().amax(dim=1)  # (nb,)
    inv = 1.0 / absmax
    y = torch.clamp(padded.view(nb, blocksize) * inv.unsqueeze(1), -1, 1)
    t = ((y + 1.0) * 0.5) * float(_LUT_BINS - 1) + 0.5
    bins = t.to(torch.int32).clamp_(0, _LUT_BINS - 1).view(-1)
    # index_select rather than advanced indexing: the latter goes multi-threaded even for tiny inputs
    idx = torch.index_select(lut, 0, bins).view(nb, blocksize).masked_fill_((absmax == 0).unsqueeze(1), 0)
    return idx.view(-1)[:n].view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                         blocksize: int = NESTED_BLOCKSIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code[c] * absmax[i // blocksize]`` in fp32 (bitsandbytes ``dequantize_blockwise``)."""
    code = dynamic_map(True, codes.device) if code is None else code.to(codes.device, torch.float32)
    flat = torch.index_select(code, 0, codes.reshape(-1).to(torch.int32))  # (n,) fp32
    n = flat.numel()
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"{absmax.numel()} block scales do not fit {n} codes with blocksize {blocksize}")
    absmax = absmax.reshape(-1).float()
    full = n - n % blocksize
    flat[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    if full < n:
        flat[full:].mul_(absmax[-1])
    return flat.view(codes.shape).to(dtype)


def _scale_short_block(tail: torch.Tensor, tail_max: torch.Tensor) -> torch.Tensor:
    """The short last block over its absmax, as bitsandbytes computes it on each device: its CUDA kernel
    (kQuantizeBlockwise) multiplies every block, the short one included, by ``1 / absmax`` rounded to fp32;
    its CPU backend divides the short block. The two can differ in the last bit of a scaled value, and so,
    at a code boundary, in a 4-bit code."""
    if tail.device.type == "cuda":
        return tail * torch.reciprocal(tail_max)
    return tail / tail_max


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize 4-bit block scales (QLoRA double quantization).

    Returns ``(codes uint8 (nb,), absmax2 fp32 (ceil(nb / 256),), offset fp32 0-d)``.
    """
    absmax = absmax.float()
    offset = absmax.mean()  # over the whole tensor: callers must not chunk this
    if not torch.isfinite(offset):  # fp32's sum overflowed (scales near 1e38; bitsandbytes decodes NaN then)
        offset = absmax.double().mean().float()
    codes, absmax2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return codes, absmax2, offset


def double_dequantize(codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor | float,
                      code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """``absmax = code[c] * absmax2[i // 256] + offset`` in fp32 (two roundings, as bitsandbytes)."""
    absmax = dequantize_blockwise(codes, absmax2, code, blocksize)
    return absmax + (offset.to(absmax.device) if isinstance(offset, torch.Tensor) else offset)
