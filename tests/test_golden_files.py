"""What slimtune writes for each method stays byte-identical (tests/golden_cases.py says how the folders are made)."""

import json
import struct

import pytest
import torch
from golden_cases import CASES, COMPUTED, GOLDEN, build
from safetensors.torch import load

import slimtune


def _header(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


def _same(case: str, name: str, got: bytes, want: bytes) -> None:
    if name.endswith(".safetensors") and case in COMPUTED:
        # the tensors an encoder computes at save time round differently by CPU (AVX2 / AVX-512 matmul kernels):
        # the header (names, dtypes, shapes, offsets, metadata) byte for byte, the numbers to fp32 rounding
        assert _header(got) == _header(want), f"{case}/{name}: header changed"
        for key, value in load(want).items():
            torch.testing.assert_close(load(got)[key], value, rtol=1e-5, atol=1e-6, msg=f"{case}/{name}: {key}")
        return
    assert got == want, f"{case}/{name} changed"


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_adapter_is_byte_identical_to_the_golden_folder(case, tmp_path):
    slimtune.save_adapter(build(case), tmp_path)
    expected = sorted(p.name for p in (GOLDEN / case).iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    for name in expected:
        _same(case, name, (tmp_path / name).read_bytes(), (GOLDEN / case / name).read_bytes())
