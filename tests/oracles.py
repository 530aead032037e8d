"""The test oracles (HF PEFT, bitsandbytes) as fixtures, with what is known to be wrong in them handled openly.

bitsandbytes 0.50.2 has two CPU-specific defects that show on some x86-64 machines (both seen on this
project's AVX-512 machines, neither on its AVX2-only ones):

- its native CPU ``dequantize_4bit`` returns wrong values for block sizes 128–1024 (e.g. 1.0 off on a
  64×64 NF4 weight at block size 256), while bitsandbytes' own definition of the op, the pure-torch
  ``backends.default.ops._dequantize_4bit_compute`` (``code[q] · absmax[i // blocksize]``, what its
  CUDA kernels compute), is right. The oracle probes the native kernel once per session and, only
  when it disagrees with that definition, serves the CPU op from the definition;
- ``nn.Linear4bit`` on a CPU with AVX-512 BF16 repacks its weight for a CPU inference kernel on the
  first forward, and that repacking fails when ``in_features`` is not a multiple of the block size
  (``shape '[64, 1]' is invalid for input of size 96``). The oracle's layers skip that inference-only
  path and compute with the reference dequantize + matmul everywhere.

So the quantization tests compare against bitsandbytes' arithmetic, not against a CPU-specific defect.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _native_dequantize_is_wrong(bnb) -> bool:
    from bitsandbytes.backends.default import ops as default_ops

    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for blocksize in (64, 128, 256, 1024):
        packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        native = bnb.functional.dequantize_4bit(packed, state)
        defined = default_ops._dequantize_4bit_compute(packed.view(-1), state.absmax, state.code, blocksize,
                                                       w.shape, torch.float32)
        if not torch.equal(native, defined):
            return True
    return False


def _serve_cpu_dequantize_from_the_definition() -> None:
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        flat = A.view(torch.uint8).reshape(-1)
        return default_ops._dequantize_4bit_compute(flat, absmax.float(), _get_4bit_code(quant_type, A.device),
                                                    blocksize, shape, dtype)

    global _override
    _override = torch.library.Library("bitsandbytes", "IMPL")  # kept alive: dropping it drops the kernel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        _override.impl("dequantize_4bit", dequantize_4bit, "CPU", allow_override=True)


_checked = False
_override: torch.library.Library | None = None


def bitsandbytes_oracle():
    """``bitsandbytes``, with its CPU 4-bit dequantize corrected where the native kernel is defective."""
    global _checked
    bnb = pytest.importorskip("bitsandbytes")
    if not _checked:
        _checked = True
        import bitsandbytes.nn.modules as bnb_modules

        bnb_modules.has_avx512bf16 = lambda: False  # read by each Linear4bit as it is built
        if _native_dequantize_is_wrong(bnb):
            _serve_cpu_dequantize_from_the_definition()
            assert not _native_dequantize_is_wrong(bnb)
    return bnb


# ---- PEFT's prompt-learning outputs, captured (tests/fixtures/peft_prompts/capture.py) ----------------------------
PEFT_PROMPTS = Path(__file__).resolve().parent / "fixtures" / "peft_prompts"


class CapturedCase:
    """One captured PEFT case: its settings (``meta``, with the versions it was made with) and tensors."""

    def __init__(self, kind: str, family: str, method: str) -> None:
        name = f"{kind}-{family}-{method}"
        self.meta = json.loads((PEFT_PROMPTS / f"{name}.json").read_text())
        self.tensors = load_file(PEFT_PROMPTS / f"{name}.safetensors")
        self.family = family

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix + "."): v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def base(self, build):
        """``build()`` (a tiny model of the case's family) with the captured weights, every parameter set."""
        model = build()
        weights = load_file(PEFT_PROMPTS / "models" / f"{self.family}.safetensors")
        result = model.load_state_dict(weights, strict=False)
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        missing = sorted(params & set(result.missing_keys))
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
        return model.eval()

    def load_adapter_into(self, model) -> None:
        result = model.load_state_dict(self.part("adapter"), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys


def check_files_move_both_ways(base, theirs, ours, inputs, folder: Path, tol: float, logits, peft_logits=None) -> None:
    """An adapter file goes both ways: slimtune's loads in PEFT with slimtune's logits, PEFT's loads in slimtune
    with PEFT's, and the two files hold the same keys. ``peft_logits`` computes a PEFT model's (default ``logits``)."""
    import copy

    import peft

    import slimtune

    peft_logits = peft_logits or logits
    slimtune.save_adapter(ours, folder / "ours")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder / "ours").eval()
    torch.testing.assert_close(peft_logits(in_peft, inputs), logits(ours, inputs), atol=tol, rtol=0)
    theirs.save_pretrained(folder / "theirs")
    in_ours = slimtune.load_adapter(copy.deepcopy(base), folder / "theirs")
    torch.testing.assert_close(logits(in_ours, inputs), peft_logits(theirs, inputs), atol=tol, rtol=0)
    assert set(load_file(folder / "ours" / "adapter_model.safetensors")) == \
        set(load_file(folder / "theirs" / "adapter_model.safetensors"))
