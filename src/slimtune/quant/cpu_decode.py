"""The 4-bit decode on CPUs as a small C++ kernel (``csrc/decode_4bit.cpp``), built on first use.

``code[q_i] · absmax[i // blocksize]`` bit for bit as :func:`slimtune.quant.nf4.dequantize_4bit`'s pure-torch
gather, with the 16-entry code book held in a vector register (one permute instruction looks up 16 codes with
AVX-512, 8 with AVX2; the instruction set is chosen at run time, other CPUs run a portable loop). Measured on
the development CPU (AVX-512) for a 1536 × 576 weight: 0.054 ms against 0.37 ms for the gather (AVX2: 0.098 ms);
a QLoRA step decodes every weight twice.

The kernel is compiled once per machine with the C++ compiler torch.compile would use (``$CXX``, else g++)
against the installed torch's headers (about 1.5 s), into ``<slimtune cache>/cpu_kernels/<key>/`` (written to a
temporary name, then renamed: concurrent processes never load a half-written file), and called through
``ctypes``. Where it cannot be built (no compiler, a failed build) or is switched off (``SLIMTUNE_CPU_KERNELS=0``,
or a layer's ``cpu_kernel = False``: ``kernels: torch``), the pure-torch decode runs: :func:`status` says why.
Graphs torch.compile traces decode with ``nf4.decode_4bit``'s tensor ops instead (the decode kernel as a custom
operator measured no faster in compiled training blocks).

For generation the library also has a GEMV (:func:`gemv`, :func:`few_rows_matmul`): ``x Wᵀ`` for at most 8 rows
with W decoded on the fly, each packed byte read once and no fp32 weight written (AVX-512; on other CPUs the decode
kernel and a BLAS matmul serve instead); in compiled generation steps it is the operator ``slimtune::gemv_4bit``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from slimtune.core.files import cache_root
from slimtune.core.toolchain import cpu_compiler

__all__ = ["status", "isa", "decode", "gemv", "gemv_ready", "gemv_op", "few_rows_matmul", "GEMV_ROWS", "ISA_NAMES",
           "ENV_SWITCH"]

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode_4bit.cpp"
ENV_SWITCH = "SLIMTUNE_CPU_KERNELS"  # "0": never build or use the kernel
ISA_NAMES = ("portable C++", "AVX2", "AVX-512")
_BEST_ISA = len(ISA_NAMES) - 1
GEMV_ROWS = 8  # the most rows of x the GEMV takes (batch-1 to batch-8 generation)
_GEMV_GRAIN_VALUES = 1 << 16
_GRAIN_VALUES = 1 << 18  # values per thread's task at least: one task for most weights of small models
# The loaded library, or the reason there is none ("lib" / "reason"), and whether the GEMV serves ("gemv"): a plain
# dict, which torch.compile reads as a constant while tracing.
_STATE: dict[str, object] = {}


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (compiler, torch.__version__, sys.platform, str(torch._C._GLIBCXX_USE_CXX11_ABI)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _compile(compiler: str, target: Path) -> str | None:
    """Build the shared library at ``target`` (atomically); the compiler's complaint when it fails."""
    torch_dir = Path(torch.__file__).resolve().parent
    lib_dir = torch_dir / "lib"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        return f"cannot write the kernel to {target.parent} ({error}); set SLIMTUNE_CACHE to a writable folder"
    os.close(fd)
    tmp = Path(name)
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-I", str(torch_dir / "include"), str(SOURCE), "-o", str(tmp),
               "-L", str(lib_dir), "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            return f"{Path(compiler).name} failed to build {SOURCE.name}: {done.stderr.strip()[-600:]}"
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{Path(compiler).name} could not build {SOURCE.name}: {error}"
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _load() -> None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _STATE["reason"] = f"switched off by {ENV_SWITCH}=0"
        return
    compiler = cpu_compiler()
    if compiler is None:
        _STATE["reason"] = "no C++ compiler found (install g++ or set CXX)"
        return
    target = cache_root() / "cpu_kernels" / _build_key(compiler) / "decode_4bit.so"
    if not target.exists():
        failure = _compile(compiler, target)
        if failure is not None:
            _STATE["reason"] = failure
            return
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        _STATE["reason"] = f"the built kernel {target} does not load: {error}"
        return
    lib.slimtune_decode_4bit.restype = ctypes.c_int
    lib.slimtune_decode_4bit.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.slimtune_gemv_4bit.restype = ctypes.c_int
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.slimtune_gemv_4bit.argtypes = [pointer, size, pointer, pointer, pointer, pointer, size, size, size, size,
                                       ctypes.c_int]
    lib.slimtune_decode_isa.restype = ctypes.c_int
    lib.slimtune_decode_isa.argtypes = []
    _STATE["lib"] = lib
    _STATE["gemv"] = lib.slimtune_decode_isa() == _BEST_ISA


def status() -> str | None:
    """None when the kernel is built and loaded (building it on the first call), else why it cannot run."""
    if not _STATE:
        _load()
    reason = _STATE.get("reason")
    return None if reason is None else str(reason)


def isa() -> str:
    """The instruction set the kernel uses on this CPU (raises when :func:`status` is not None)."""
    return ISA_NAMES[_library().slimtune_decode_isa()]


def _library() -> ctypes.CDLL:
    reason = status()
    if reason is not None:
        raise RuntimeError(f"slimtune's CPU decode kernel is not available: {reason}")
    lib = _STATE["lib"]
    assert isinstance(lib, ctypes.CDLL)
    return lib


def _check(what: str, tensors: dict[str, tuple[torch.Tensor, torch.dtype, int]], blocksize: int) -> None:
    """What the kernels read through raw pointers: contiguous CPU tensors of the right dtype and enough elements."""
    for name, (t, dtype, least) in tensors.items():
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.numel() < least:
            raise ValueError(f"{what}: {name} must be a contiguous {dtype} CPU tensor of at least {least} "
                             f"elements, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if blocksize % 32:
        raise ValueError(f"{what}: blocksize={blocksize} must be a multiple of 32")


def decode(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
           out: torch.Tensor, isa_cap: int = _BEST_ISA) -> int:
    """Write the ``n`` fp32 values of a 4-bit weight into ``out`` (contiguous fp32, at least ``n``); returns the
    instruction set used (an index of :data:`ISA_NAMES`, at most ``isa_cap``). ``packed``: uint8, ``(n + 1) // 2``
    bytes; ``absmax``: fp32, one scale per block; ``code``: the 16 fp32 code values; all contiguous, on the CPU."""
    _check("decode", {"packed": (packed, torch.uint8, (n + 1) // 2), "code": (code, torch.float32, 16),
                      "absmax": (absmax, torch.float32, -(-n // blocksize)), "out": (out, torch.float32, n)}, blocksize)
    grain = max(1, _GRAIN_VALUES // blocksize)
    return _library().slimtune_decode_4bit(packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(),
                                           n, blocksize, grain, isa_cap)


def gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
         blocksize: int, isa_cap: int | None = None) -> tuple[torch.Tensor, int] | None:
    """``x Wᵀ`` for a few rows (``x`` fp32 ``(rows, in)``, rows at most :data:`GEMV_ROWS`) with the 4-bit ``W``
    ``(out_features, in)`` decoded on the fly, each packed byte read once: token-by-token generation. Returns
    ``(y (rows, out_features) fp32, instruction set used)`` (AVX-512 or the portable loop), or None where it does
    not apply: more rows, a row of W that is not whole blocks, the kernel unavailable, a CPU without AVX-512 (the
    decode kernel and a BLAS matmul are faster there than the portable loop, which ``isa_cap=0`` still asks for).
    The sum runs in another order than a BLAS matmul: equal within fp32 rounding, not bit for bit."""
    rows, in_features = x.shape
    if not 1 <= rows <= GEMV_ROWS or in_features % blocksize or status() is not None:
        return None
    if isa_cap is None:
        if not gemv_ready():  # probed once when the library loaded, not per call (a call per layer and token)
            return None
        isa_cap = _BEST_ISA
    x = x.contiguous()
    n = out_features * in_features
    _check("gemv", {"x": (x, torch.float32, rows * in_features), "packed": (packed, torch.uint8, n // 2),
                    "absmax": (absmax, torch.float32, n // blocksize), "code": (code, torch.float32, 16)}, blocksize)
    y = torch.empty(rows, out_features, dtype=torch.float32)
    grain = max(1, _GEMV_GRAIN_VALUES // in_features)
    used = _library().slimtune_gemv_4bit(x.data_ptr(), rows, packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                                         y.data_ptr(), out_features, in_features, blocksize, grain, isa_cap)
    return y, used


def gemv_ready() -> bool:
    """Whether :func:`gemv` serves by default (the kernel loaded, on an AVX-512 CPU), without calling into the
    library: what code torch.compile traces asks (the kernel must have been loaded before, see :func:`status`)."""
    return _STATE.get("gemv") is True


@torch.library.custom_op("slimtune::gemv_4bit", mutates_args=())
def gemv_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
            blocksize: int) -> torch.Tensor:
    """:func:`gemv` as an operator graphs compiled by torch.compile call (they cannot trace ctypes): the compiled
    generation step multiplies by the GEMV as the eager one does."""
    done = gemv(x, packed, absmax, code, out_features, blocksize)
    if done is None:
        raise RuntimeError(f"slimtune's CPU GEMV does not serve x {tuple(x.shape)} with blocksize {blocksize}")
    return done[0]


@gemv_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
      blocksize: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def few_rows_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int,
                    blocksize: int) -> torch.Tensor | None:
    """``x Wᵀ`` for fp32 CPU ``x (..., in)`` of at most :data:`GEMV_ROWS` rows by :func:`gemv` (by its operator in a
    graph torch.compile traces); None where the GEMV does not serve (the caller decodes W and multiplies)."""
    in_features = x.shape[-1]
    rows = x.numel() // max(1, in_features)
    if not 1 <= rows <= GEMV_ROWS or x.device.type != "cpu" or x.dtype != torch.float32 or in_features % blocksize:
        return None
    args = (x.reshape(rows, in_features), packed.reshape(-1), absmax.float().contiguous(), code.float().contiguous(),
            out_features, blocksize)
    if torch.compiler.is_compiling():
        y = gemv_op(*args) if gemv_ready() else None
    else:
        done = gemv(*args)
        y = None if done is None else done[0]
    return None if y is None else y.view(*x.shape[:-1], out_features)
