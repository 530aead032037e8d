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


def bitsandbytes_layers(model, names, bits: int, quant_type: str = "nf4", double_quant: bool = False,
                        quant_storage: torch.dtype = torch.uint8):
    """``model`` with its ``nn.Linear`` layers named (last part) in ``names`` swapped, in place, for bitsandbytes'
    ``Linear4bit`` (``bits=4``: block size 64, fp32 compute) or ``Linear8bitLt`` (``bits=8``) holding their weights,
    as transformers' ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` makes them."""
    bnb = bitsandbytes_oracle()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name not in names:
                continue
            weight = child.weight.detach().clone()
            if bits == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, compress_statistics=double_quant,
                                          quant_type=quant_type, quant_storage=quant_storage)
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=double_quant, quant_storage=quant_storage)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            setattr(module, child_name, layer.to("cpu"))  # (moving to a device quantizes the weight)
    return model


# Every bitsandbytes layout a layer can have: (bits, quant_type, double_quant, quant_storage).
BITSANDBYTES_KINDS = [(4, "nf4", False, torch.uint8), (4, "nf4", True, torch.uint8), (4, "fp4", False, torch.uint8),
                      (4, "fp4", True, torch.bfloat16), (4, "nf4", True, torch.bfloat16), (8, None, False, None)]


def bitsandbytes_kind_id(kind) -> str:
    bits, quant_type, double_quant, storage = kind
    return "int8" if bits == 8 else f"{quant_type}{'-dq' if double_quant else ''}-{str(storage).split('.')[-1]}"


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
