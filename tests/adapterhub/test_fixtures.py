"""AdapterHub parity without ``adapters`` installed: folders and outputs ``adapters`` 1.3.0 produced
(tests/fixtures/adapterhub/, made by its capture.py under transformers 4.57.6, the versions stamped in
meta.json) load in slimtune with the same logits, compose the same way, and come back out byte for byte
the same tensors and config. The live comparisons (both directions) run in test_oracle.py."""

import json

import pytest
import torch
from hub_cases import COMPOSITIONS, FAMILIES, FIXTURES, block, captured, captured_base
from safetensors.torch import load_file
from tiny_models import logits, one_thread  # noqa: F401 (a fixture, used by pytestmark)

import slimtune
from slimtune import adapterhub

pytestmark = pytest.mark.usefixtures("one_thread")
META = json.loads((FIXTURES / "meta.json").read_text())
CASES = [(family, case) for family in FAMILIES for case in META["cases"][family]]
TOL = 1e-5


def _inputs(family):
    return {k.removeprefix("input."): v for k, v in captured(family).items() if k.startswith("input.")}


def test_the_fixtures_say_what_made_them():
    assert META["versions"]["adapters"] == "1.3.0" and META["versions"]["transformers"].startswith("4.57")
    assert {c for cases in META["cases"].values() for c in cases} >= {"seq_bn", "double_seq_bn", "par_bn", "options",
                                                                     "learned", "post_add"}


@pytest.mark.parametrize("family, case", CASES)
def test_adapters_folders_load_with_its_logits(family, case):
    model = captured_base(family)
    expected, inputs = captured(family)[f"{case}.logits"], _inputs(family)
    assert (expected - logits(model, inputs)).abs().max() > 1e-3  # the adapter changes the output
    name = adapterhub.load_adapterhub(model, FIXTURES / family / case)
    assert name == "a"
    torch.testing.assert_close(logits(model, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family, composition", [(f, c) for f in FAMILIES for c in COMPOSITIONS])
def test_compositions_match_adapters(family, composition):
    model = captured_base(family)
    for folder in ("a", "b", "fusion"):
        adapterhub.load_adapterhub(model, FIXTURES / family / folder)
    assert slimtune.list_adapters(model) == ["a", "b", "a,b"]
    adapterhub.set_composition(model, block(adapterhub, COMPOSITIONS[composition]))
    expected = captured(family)[f"{composition}.logits"]
    out = logits(model, _inputs(family))
    assert out.shape == expected.shape  # Parallel: one copy of the batch per adapter
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def _same_folder(ours, theirs):
    for config in ("adapter_config.json", "head_config.json", "adapter_fusion_config.json"):
        if (ours / config).is_file():
            assert json.loads((ours / config).read_text()) == json.loads((theirs / config).read_text()), config
    for weights in ("adapter.safetensors", "model_head.safetensors", "model_adapter_fusion.safetensors"):
        if (ours / weights).is_file():
            mine, saved = load_file(ours / weights), load_file(theirs / weights)
            assert sorted(mine) == sorted(saved), weights
            for key in saved:
                assert torch.equal(mine[key], saved[key]), key


@pytest.mark.parametrize("family, case", CASES)
def test_saving_writes_what_adapters_wrote(family, case, tmp_path):
    model = captured_base(family)
    adapterhub.load_adapterhub(model, FIXTURES / family / case)
    adapterhub.save_adapterhub(model, tmp_path / "out", "a")
    _same_folder(tmp_path / "out", FIXTURES / family / case)
    # adapters also saves a head it did not change (the LM head); slimtune writes a head only when it differs
    assert (tmp_path / "out" / "model_head.safetensors").is_file() == ([family, case] == META["head_case"])


@pytest.mark.parametrize("family", FAMILIES)
def test_saving_a_fusion_writes_what_adapters_wrote(family, tmp_path):
    model = captured_base(family)
    for folder in ("a", "b", "fusion"):
        adapterhub.load_adapterhub(model, FIXTURES / family / folder)
    adapterhub.save_adapterhub(model, tmp_path / "fusion", "a,b")
    _same_folder(tmp_path / "fusion", FIXTURES / family / "fusion")
