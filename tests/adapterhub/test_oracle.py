"""AdapterHub parity, live: the ``adapters`` library (1.3.0, installed by ``make test-oldest``) against slimtune,
both ways, on BERT-, GPT-2- and Llama-shaped tiny models: adapters it made and randomly perturbed load in
slimtune with its logits, adapters slimtune made and trained load in ``adapters`` with slimtune's logits, and
Stack / Parallel / Fuse compute the same. test_fixtures.py carries these checks to environments without it."""

import copy

import pytest
import torch
from hub_cases import (
    COMPOSITIONS,
    FAMILIES,
    PICKLE_ONLY,
    add_composition_adapters,
    block,
    cases,
    hub_config,
    hub_model,
    perturb,
    save_hub_adapter,
)
from safetensors.torch import load_file
from tiny_models import logits, one_thread, sample_inputs  # noqa: F401 (a fixture, used by pytestmark)

import slimtune
from slimtune import adapterhub

adapters = pytest.importorskip(
    "adapters", reason="needs the adapters package (AdapterHub), which needs transformers ~=4.57: run make test-oldest "
    "(it installs adapters==1.3.0); the captured outputs in tests/fixtures/adapterhub are checked everywhere")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
CASES = [(family, case) for family in FAMILIES for case in cases(family)]


def _theirs_with(family, case, seed=0):
    base = FAMILIES[family]().eval()
    theirs = hub_model(family, base)
    theirs.add_adapter("a", config=hub_config(case))
    perturb(theirs, ".adapters.a.", seed)
    theirs.set_active_adapters("a")
    return base, theirs


@pytest.mark.parametrize("family, case", CASES)
def test_adapters_made_by_adapters_load_in_slimtune(family, case, tmp_path):
    base, theirs = _theirs_with(family, case)
    inputs = sample_inputs(family)
    expected = logits(theirs, inputs)
    pickled = save_hub_adapter(theirs, tmp_path / "pickle", "a", safetensors=False)  # adapters' default format
    ours = copy.deepcopy(base)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        adapterhub.load_adapterhub(ours, pickled)
    adapterhub.load_adapterhub(ours, pickled, allow_pickle=True)
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    if case not in PICKLE_ONLY:
        ours = copy.deepcopy(base)
        adapterhub.load_adapterhub(ours, save_hub_adapter(theirs, tmp_path / "safe", "a"))
        torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)


def _train(model, family, steps=3):
    model.train()
    batch = sample_inputs(family, seed=1, batch=4)
    labels = torch.zeros(4, dtype=torch.long) if family == "bert" else batch["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("family, case", CASES)
def test_adapters_trained_by_slimtune_load_in_adapters(family, case, tmp_path):
    base, theirs = _theirs_with(family, case)
    ours = copy.deepcopy(base)
    adapterhub.load_adapterhub(ours, save_hub_adapter(theirs, tmp_path / "start", "a", case not in PICKLE_ONLY),
                               allow_pickle=True, is_trainable=True)
    _train(ours, family)
    inputs = sample_inputs(family)
    trained = logits(ours, inputs)
    adapterhub.save_adapterhub(ours, tmp_path / "trained", "a")
    theirs_keys = set(torch.load(save_hub_adapter(theirs, tmp_path / "keys", "a", False) / "pytorch_adapter.bin",
                                 weights_only=True))
    assert set(load_file(tmp_path / "trained" / "adapter.safetensors")) == theirs_keys  # adapters' key names
    again = hub_model(family, base)
    again.load_adapter(str(tmp_path / "trained"), use_safetensors=True, set_active=True)
    assert (trained - logits(theirs, inputs)).abs().max() > 1e-4  # training changed the adapter
    torch.testing.assert_close(logits(again, inputs), trained, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer", "parallel"])
def test_adapters_slimtune_creates_load_in_adapters(family, adapter_type, tmp_path):
    base = FAMILIES[family]().eval()
    ours = copy.deepcopy(base)
    config = slimtune.BottleneckConfig(placement="adapterhub", adapter_type=adapter_type, reduction_factor=4,
                                       non_linearity="swish", task_type="SEQ_CLS" if family == "bert" else None)
    slimtune.add_adapter(ours, config, "mine")
    perturb(ours, ".adapters.mine.", 3)  # away from the near-identity start, then train
    _train(ours, family)
    inputs = sample_inputs(family)
    adapterhub.save_adapterhub(ours, tmp_path / "mine", "mine")
    theirs = hub_model(family, base)
    theirs.load_adapter(str(tmp_path / "mine"), use_safetensors=True, set_active=True)
    assert (logits(ours, inputs) - logits(base, inputs)).abs().max() > 1e-3
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=TOL, rtol=0)


def test_a_head_saved_beside_the_adapter_goes_both_ways(tmp_path):
    base, theirs = _theirs_with("bert", "seq_bn")
    perturb(theirs, "classifier", 5)
    inputs = sample_inputs("bert")
    ours = copy.deepcopy(base)
    adapterhub.load_adapterhub(ours, save_hub_adapter(theirs, tmp_path / "hub", "a"))
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=TOL, rtol=0)
    assert ours.classifier.modules_to_save["a"].weight.shape == (3, 32)  # the head became the adapter's own copy
    adapterhub.save_adapterhub(ours, tmp_path / "back", "a")
    again = hub_model("bert", base)
    again.load_adapter(str(tmp_path / "back"), use_safetensors=True, set_active=True)
    torch.testing.assert_close(logits(again, inputs), logits(theirs, inputs), atol=TOL, rtol=0)


def _both_with_compositions(family, tmp_path):
    base = FAMILIES[family]().eval()
    theirs = hub_model(family, base)
    add_composition_adapters(theirs)
    ours = copy.deepcopy(base)
    for name in ("a", "b"):
        adapterhub.load_adapterhub(ours, save_hub_adapter(theirs, tmp_path / name, name))
    theirs.save_adapter_fusion(str(tmp_path / "fusion"), "a,b", use_safetensors=True)
    adapterhub.load_adapterhub(ours, tmp_path / "fusion")
    return base, theirs, ours


@pytest.mark.parametrize("family", FAMILIES)
def test_compositions_compute_as_adapters_does(family, tmp_path):
    _, theirs, ours = _both_with_compositions(family, tmp_path)
    inputs = sample_inputs(family)
    for name, spec in COMPOSITIONS.items():
        theirs.set_active_adapters(block(adapters.composition, spec))
        adapterhub.set_composition(ours, block(adapterhub, spec))
        expected, out = logits(theirs, inputs), logits(ours, inputs)
        assert out.shape == expected.shape, name
        torch.testing.assert_close(out, expected, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fusion_layer_trained_by_slimtune_loads_in_adapters(family, tmp_path):
    base, theirs, ours = _both_with_compositions(family, tmp_path)
    slimtune.set_adapter(ours, "a,b")  # the fusion adapter: fusion layers train, a and b stay frozen
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, _ in ours.named_parameters() if ".adapter_fusion_layer.a,b." in n}
    _train(ours, family)
    inputs = sample_inputs(family)
    adapterhub.save_adapterhub(ours, tmp_path / "trained", "a,b")
    again = hub_model(family, base)
    for name in ("a", "b"):
        again.load_adapter(str(tmp_path / name), use_safetensors=True)
    again.load_adapter_fusion(str(tmp_path / "trained"), use_safetensors=True, set_active=True)
    again.set_active_adapters(adapters.composition.Fuse("a", "b"))
    theirs.set_active_adapters(adapters.composition.Fuse("a", "b"))
    trained = logits(ours, inputs)
    assert (trained - logits(theirs, inputs)).abs().max() > 1e-4  # training changed the fusion layers
    torch.testing.assert_close(logits(again, inputs), trained, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("case", ["seq_bn", "double_seq_bn", "ln_before"])
def test_in_training_mode_the_adapter_sits_after_the_sub_layers_dropout(family, case, tmp_path):
    """Same seed, same dropout draws in the same order: equal only if the adapter reads the dropped-out output."""
    base, theirs = _theirs_with(family, case)
    ours = copy.deepcopy(base)
    adapterhub.load_adapterhub(ours, save_hub_adapter(theirs, tmp_path / "a", "a", False), allow_pickle=True)
    theirs.train()
    ours.train()
    inputs = sample_inputs(family)
    outputs = []
    for model in (theirs, ours):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    assert (outputs[0] - logits(theirs.eval(), inputs)).abs().max() > 1e-3  # dropout did act
    torch.testing.assert_close(outputs[1], outputs[0], atol=TOL, rtol=0)
