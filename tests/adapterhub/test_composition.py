"""Composition on slimtune's layers (its parity with AdapterHub: test_fixtures.py, test_oracle.py): what each
block runs and trains, how it ends, what is refused; AdapterFusion as a method (config, loading the fused
adapters, removal, its regularizer); the model comes back whole."""

import copy
import warnings

import pytest
import torch
from hub_cases import FIXTURES, captured_base
from tiny_models import logits, one_thread, sample_inputs  # noqa: F401 (a fixture, used by pytestmark)

import slimtune
from slimtune.adapterhub import Fuse, Parallel, Stack, get_composition, load_adapterhub, set_composition
from slimtune.adapterhub.layers import HubSite
from slimtune.core.state import find_state
from slimtune.lifecycle import remove_adapter
from slimtune.methods.fusion import fusion_regularization_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_ab(family="llama", fusion=True):
    model = captured_base(family)
    for folder in ("a", "b", "fusion") if fusion else ("a", "b"):
        load_adapterhub(model, FIXTURES / family / folder)
    return model


def _trainable(model):
    return {n.split(".adapters.")[-1].split(".")[0] if ".adapters." in n else
            n.split(".adapter_fusion_layer.")[-1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_parallel_runs_each_adapter_on_its_copy_of_the_batch():
    model = _with_ab()
    inputs = sample_inputs("llama", batch=3)
    alone = {}
    for name in ("a", "b"):
        slimtune.set_adapter(model, name)
        alone[name] = logits(model, inputs)
    set_composition(model, Parallel("a", "b"))
    both = logits(model, inputs)
    assert both.shape[0] == 6 and get_composition(model) == Parallel("a", "b")
    torch.testing.assert_close(both[:3], alone["a"], atol=1e-6, rtol=0)
    torch.testing.assert_close(both[3:], alone["b"], atol=1e-6, rtol=0)
    slimtune.set_adapter(model, "a")  # any other activation ends the composition and the batch copies
    assert get_composition(model) is None and logits(model, inputs).shape[0] == 3


def test_what_trains_under_each_block():
    model = _with_ab()
    for name in ("a", "b", "a,b"):
        slimtune.set_adapter(model, name)
        for p in model.parameters():
            p.requires_grad_(False)
    set_composition(model, Stack("a", "b"))
    assert _trainable(model) == {"a", "b"}
    set_composition(model, Fuse("a", "b"))  # AdapterFusion trains its layers; the fused adapters stay frozen
    assert _trainable(model) == {"a,b"}
    set_composition(model, Stack("b", Fuse("a", "b")))
    assert _trainable(model) == {"b", "a,b"}


def test_a_name_is_a_stack_of_one_and_disabling_gives_the_base():
    model = _with_ab(fusion=False)
    inputs = sample_inputs("llama")
    slimtune.set_adapter(model, "b")
    only_b = logits(model, inputs)
    set_composition(model, "b")
    assert get_composition(model) == Stack("b")
    torch.testing.assert_close(logits(model, inputs), only_b, atol=0, rtol=0)
    base = logits(captured_base("llama"), inputs)
    set_composition(model, Parallel("a", "b"))
    with slimtune.disable_adapters(model):  # the base model: no adapters, no batch copies
        torch.testing.assert_close(logits(model, sample_inputs("llama")), base, atol=0, rtol=0)


@pytest.mark.parametrize("block, message", [
    (Stack("a", "nope"), "'nope' is not an adapter of this model.*adapters: \\['a', 'b'\\]"),
    (Fuse("a", "b"), "needs an AdapterFusion adapter over \\['a', 'b'\\].*AdapterFusionConfig"),
    (Fuse("a", Parallel("a", "b")), "cannot sit inside Fuse"),
    (Parallel("a", Fuse("a", "b")), "cannot sit inside Parallel"),
    (Stack("a", Stack("b")), "cannot sit inside Stack"),
    (Fuse(Stack("a", Parallel("a", "b")), "b"), "nests too deep"),
])
def test_compositions_adapterhub_does_not_allow_are_refused(block, message):
    model = _with_ab(fusion=False)
    with pytest.raises(ValueError, match=message):
        set_composition(model, block)


def test_only_adapterhub_placed_bottleneck_adapters_compose():
    model = _with_ab(fusion=False)
    slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj"]), "lora")
    with pytest.raises(ValueError, match="'lora' is a LORA adapter"):
        set_composition(model, Stack("a", "lora"))


def test_unload_gives_back_the_original_model():
    reference = captured_base("gpt2")
    model = _with_ab("gpt2")
    set_composition(model, Parallel("a", "b"))
    slimtune.unload(model)
    assert find_state(model) is None and not any(isinstance(m, HubSite) for m in model.modules())
    assert not model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(logits(model, sample_inputs("gpt2")), logits(reference, sample_inputs("gpt2")),
                               atol=0, rtol=0)


def test_removing_an_adapter_unwraps_its_sites_and_drops_their_hooks():
    model = _with_ab(fusion=False)
    norms = [model.model.layers[i].post_attention_layernorm for i in range(2)]
    assert all(len(n._forward_pre_hooks) == 1 for n in norms)
    slimtune.set_adapter(model, "b")
    slimtune.delete_adapter(model, "a")
    assert all(len(n._forward_pre_hooks) == 1 for n in norms)  # b still sits there
    slimtune.add_adapter(model, slimtune.LoraConfig(target_modules=["q_proj"]), "lora")
    slimtune.set_adapter(model, "lora")
    slimtune.delete_adapter(model, "b")
    assert not any(isinstance(m, HubSite) for m in model.modules()) and all(not n._forward_pre_hooks for n in norms)


def test_fusion_config_is_validated():
    with pytest.raises(ValueError, match="adapter_names=\\[\\] must list"):
        slimtune.AdapterFusionConfig()
    with pytest.raises(ValueError, match="adapter_paths names \\['c'\\]"):
        slimtune.AdapterFusionConfig(adapter_names=["a", "b"], adapter_paths={"c": "x"})
    model = captured_base("llama")
    with pytest.raises(ValueError, match="'a' is not on the model and adapter_paths has no folder"):
        slimtune.add_adapter(model, slimtune.AdapterFusionConfig(adapter_names=["a", "b"]))
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="houlsby"), "h")
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="pfeiffer"), "p")
    with pytest.raises(ValueError, match="same locations"):
        slimtune.add_adapter(model, slimtune.AdapterFusionConfig(adapter_names=["h", "p"]))
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="parallel"), "par")
    with pytest.warns(UserWarning, match="parallel adapters \\['par'\\]"):
        slimtune.add_adapter(model, slimtune.AdapterFusionConfig(adapter_names=["p", "par"]))


def test_fusion_loads_its_adapters_from_folders_and_removes_them_again(tmp_path):
    base = captured_base("bert")
    model = copy.deepcopy(base)
    paths = {"a": str(FIXTURES / "bert" / "a"), "b": str(FIXTURES / "bert" / "b")}
    slimtune.add_adapter(model, slimtune.AdapterFusionConfig(adapter_names=["a", "b"], adapter_paths=paths), "fz")
    assert slimtune.list_adapters(model) == ["a", "b", "fz"] and _trainable(model) == {"fz"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_fusion_layer.fz." in n:
                p.add_(torch.randn_like(p) * 0.1)
    inputs = sample_inputs("bert")
    expected = logits(model, inputs)
    slimtune.save_adapter(model, tmp_path / "fz", "fz")  # slimtune's format: the fusion layers and the folders
    again = slimtune.load_adapter(copy.deepcopy(base), tmp_path / "fz")
    torch.testing.assert_close(logits(again, inputs), expected, atol=0, rtol=0)
    remove_adapter(model, "fz")  # and the adapters it loaded itself
    assert find_state(model) is None and not any(isinstance(m, HubSite) for m in model.modules())
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)


def test_fusion_regularization_is_adapterhubs_term():
    model = _with_ab()
    slimtune.set_adapter(model, "a,b")
    values = [m.value.weight for m in model.modules() if type(m).__name__ == "FusionLayer"]
    expected = sum(0.01 * (torch.eye(32) - v).pow(2).sum() for v in values)
    loss = fusion_regularization_loss(model)
    assert loss is not None and loss.requires_grad
    torch.testing.assert_close(loss, expected)
    slimtune.set_adapter(model, "a")  # value matrices frozen: no term (AdapterHub counts trainable ones only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fusion_regularization_loss(model) is None
