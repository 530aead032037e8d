"""What slimtune writes for each method stays byte-identical (tests/golden_cases.py says how the folders are made)."""

import pytest
from golden_cases import CASES, GOLDEN, build

import slimtune


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_adapter_is_byte_identical_to_the_golden_folder(case, tmp_path):
    slimtune.save_adapter(build(case), tmp_path)
    expected = sorted(p.name for p in (GOLDEN / case).iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    for name in expected:
        assert (tmp_path / name).read_bytes() == (GOLDEN / case / name).read_bytes(), f"{case}/{name} changed"
