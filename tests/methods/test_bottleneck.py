"""Bottleneck adapters: placement (Houlsby / Pfeiffer), near-identity init, parameter formula,
training, swapping adapters on one base, our file format, errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    FAMILIES,
    assert_base_unchanged,
    logits,
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    sample_inputs,
    tiny_bart_cls,
    tiny_gpt2,
    tiny_llama,
    train_losses,
)

import slimtune
from slimtune.adapterhub.layers import HubSite
from slimtune.lifecycle import remove_adapter
from slimtune.methods.bottleneck import BottleneckLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, BottleneckLinear))


@pytest.mark.parametrize("family, houlsby, pfeiffer", [
    ("llama", {"o_proj", "down_proj"}, {"down_proj"}),
    ("gpt2", {"attn.c_proj", "mlp.c_proj"}, {"mlp.c_proj"}),
    ("bert", {"attention.output.dense", "0.output.dense", "1.output.dense"}, {"0.output.dense", "1.output.dense"}),
    ("t5", {"SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"}, {"DenseReluDense.wo"}),
])
def test_houlsby_after_attention_and_ffn_pfeiffer_after_ffn_only(family, houlsby, pfeiffer):
    builder = FAMILIES[family][0]
    for adapter_type, expected in (("houlsby", houlsby), ("pfeiffer", pfeiffer)):
        model = slimtune.add_adapter(builder(), slimtune.BottleneckConfig(adapter_type=adapter_type))
        names = _wrapped(model)
        assert names and all(any(n.endswith(e) for e in expected) for n in names)
        assert {e for e in expected if any(n.endswith(e) for n in names)} == expected
        model(**sample_inputs(family))  # the model still runs (T5 reads wo.weight, etc.)
    # Houlsby: two per layer in a decoder-only model
    if family == "llama":
        assert len(_wrapped(slimtune.add_adapter(builder(), slimtune.BottleneckConfig()))) == 2 * 2


def test_near_identity_init_and_the_parameter_formula():
    base = tiny_llama()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.BottleneckConfig(reduction_factor=4))
    inputs = sample_inputs("llama")
    delta = (logits(model, inputs) - logits(base, inputs)).abs().max()
    assert 0 < delta < 1e-3
    layer = model.model.layers[0].mlp.down_proj
    assert layer.adapter_down["default"].weight.shape == (8, 32) and layer.adapter_up["default"].weight.shape == (32, 8)
    d, m, adapters = 32, 32 // 4, 2 * 2  # d = hidden size, m = d // reduction_factor, 2 per layer × 2 layers
    assert slimtune.trainable_parameters(model).trainable == adapters * (2 * d * m + d + m)


def test_training_lowers_loss_and_leaves_the_base_untouched():
    model = tiny_gpt2()
    model.train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    slimtune.add_adapter(model, slimtune.BottleneckConfig(reduction_factor=2, non_linearity="gelu"))
    losses = train_losses(model, sample_inputs("gpt2", batch=4, seq=16), steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert_base_unchanged(model, base)


def _randomise(model, adapter_name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"adapter_up.{adapter_name}." in name or f"adapter_down.{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_swapping_adapters_on_one_base():
    base = tiny_llama()
    model = copy.deepcopy(base)
    slimtune.add_adapter(model, slimtune.BottleneckConfig(), "task_a")
    slimtune.add_adapter(model, slimtune.BottleneckConfig(adapter_type="pfeiffer"), "task_b")
    _randomise(model, "task_a", 1)
    _randomise(model, "task_b", 2)
    inputs = sample_inputs("llama")
    slimtune.set_adapter(model, ["task_a"])
    out_a = logits(model, inputs)
    assert all(p.requires_grad == (".task_a." in n) for n, p in model.named_parameters() if "adapter_" in n)
    slimtune.set_adapter(model, ["task_b"])
    out_b = logits(model, inputs)
    assert (out_a - out_b).abs().max() > 1e-2
    # each equals a model that only ever had that adapter
    only_a = slimtune.add_adapter(copy.deepcopy(base), slimtune.BottleneckConfig(), "task_a")
    only_a.load_state_dict({k: v for k, v in model.state_dict().items() if ".task_a." in k}, strict=False)
    torch.testing.assert_close(logits(only_a, inputs), out_a, atol=1e-6, rtol=0)
    remove_adapter(model, "task_a")
    torch.testing.assert_close(logits(model, inputs), out_b, atol=1e-6, rtol=0)


def test_documented_file_format_and_round_trip(tmp_path):
    base = tiny_llama()
    config = slimtune.BottleneckConfig(reduction_factor=8, non_linearity="tanh")
    model = slimtune.add_adapter(copy.deepcopy(base), config)
    _randomise(model, "default", 3)
    slimtune.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["reduction_factor"] == 8
    assert config["non_linearity"] == "tanh" and config["adapter_type"] == "houlsby"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.down_proj."
    assert tensors[prefix + "adapter_down.weight"].shape == (4, 32)
    assert tensors[prefix + "adapter_down.bias"].shape == (4,)
    assert tensors[prefix + "adapter_up.weight"].shape == (32, 4)
    assert tensors[prefix + "adapter_up.bias"].shape == (32,)
    assert len(tensors) == 4 * 4
    loaded = slimtune.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=0, rtol=0)


def test_merging_is_refused_with_a_reason():
    model = slimtune.add_adapter(tiny_llama(), slimtune.BottleneckConfig())
    with pytest.raises(slimtune.NotMergeableError, match="non-linearity"):
        slimtune.merge_adapter(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"adapter_type": "lora"}, "adapter_type='lora'"),
    ({"reduction_factor": 0}, "reduction_factor=0"),
    ({"non_linearity": "softmax"}, "non_linearity='softmax'"),
    ({"init_std": -1.0}, "init_std=-1.0"),
])
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slimtune.BottleneckConfig(**kwargs)


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
def test_default_layers_on_an_architecture_they_do_not_cover_say_so(adapter_type):
    """BART's projections are out_proj/fc2: the error quoted the internal default regex as if the user had set it."""
    bart = tiny_bart_cls()
    message = (r"^target_modules is unset and the default bottleneck layers .* match no module of this 'bart' "
               r"model; .*fc2 \(e\.g\. model\.encoder\.layers\.0\.fc2\)")
    with pytest.raises(ValueError, match=message):
        slimtune.add_adapter(bart, slimtune.BottleneckConfig(adapter_type=adapter_type))
    slimtune.add_adapter(bart, slimtune.BottleneckConfig(adapter_type=adapter_type, target_modules=["fc2"]))


# ---- AdapterHub placement (its parity with the adapters library: tests/adapterhub/) ---------------------------
def _sites(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, HubSite))


@pytest.mark.parametrize("family, houlsby, pfeiffer", [
    ("llama", {"self_attn", "mlp"}, {"mlp"}),
    ("gpt2", {"attn", "mlp"}, {"mlp"}),
    ("bert", {"attention.output", "0.output", "1.output"}, {"0.output", "1.output"}),
])
def test_adapterhub_placement_wraps_the_sub_layers_adapterhub_adapts(family, houlsby, pfeiffer):
    builder = FAMILIES[family][0]
    for adapter_type, expected in (("houlsby", houlsby), ("pfeiffer", pfeiffer), ("parallel", pfeiffer)):
        model = slimtune.add_adapter(builder(), slimtune.BottleneckConfig(placement="adapterhub",
                                                                          adapter_type=adapter_type))
        names = _sites(model)
        assert names and {e for e in expected if any(n.endswith(e) for n in names)} == expected
        assert all(any(n.endswith(e) for e in expected) for n in names)
        model(**sample_inputs(family))
    model = slimtune.add_adapter(builder(), slimtune.BottleneckConfig(placement="adapterhub", leave_out=[0],
                                                                      reduction_factor={"1": 4, "default": 8}))
    assert all(".1." in n for n in _sites(model))
    assert {m.adapters["default"].adapter_up.in_features for m in model.modules() if isinstance(m, HubSite)} == {8}


def test_adapterhub_placement_starts_as_the_identity_with_mam_init_and_trains():
    base = tiny_llama()
    model = copy.deepcopy(base)
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="pfeiffer",
                                                          reduction_factor=4, init_weights="mam_adapter"))
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=0, rtol=0)
    model.train()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    losses = train_losses(model, sample_inputs("llama", batch=4, seq=16), steps=8, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    assert_base_unchanged(model, before)
    assert {n.split(".adapters.")[0].split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"mlp"}


def test_new_adapterhub_modules_follow_the_models_mode():
    model = tiny_gpt2()  # eval mode: the adapter's dropout must be off too
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", dropout=0.5, reduction_factor=4))
    inputs = sample_inputs("gpt2")
    torch.testing.assert_close(logits(model, inputs), logits(model, inputs), atol=0, rtol=0)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs, message", [
    ({"original_ln_before": True}, "original_ln_before=True applies to placement='adapterhub' only"),
    ({"use_gating": True}, "use_gating=True applies to placement='adapterhub' only"),
    ({"leave_out": [0]}, "leave_out=\\[0\\] applies to placement='adapterhub' only"),
    ({"adapter_type": "parallel"}, "adapter_type='parallel' needs placement='adapterhub'"),
    ({"placement": "inside"}, "placement='inside'"),
    ({"placement": "adapterhub", "target_modules": ["o_proj"]}, "target_modules applies to placement='projection'"),
    ({"placement": "adapterhub", "init_std": 0.1}, "init_std=0.1 applies to placement='projection'"),
    ({"placement": "adapterhub", "residual_before_ln": "post_add"}, "'post_add' needs original_ln_before=True"),
    ({"placement": "adapterhub", "scaling": "big"}, "scaling='big'"),
    ({"placement": "adapterhub", "init_weights": "zeros"}, "init_weights='zeros'"),
    ({"placement": "adapterhub", "reduction_factor": {"0": -1}}, "reduction_factor="),
    ({"placement": "adapterhub", "mh_adapter": False, "output_adapter": False}, "leave no site"),
])
def test_placement_fields_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slimtune.BottleneckConfig(**kwargs)


def test_adapterhub_placement_beside_other_methods():
    """It wraps whole sub-layers: other methods' layers inside one would be renamed on disk, so that is refused;
    elsewhere they coexist, and merging the other adapter still works."""
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(target_modules=["q_proj"]), "lora")
    with pytest.raises(ValueError, match="self_attn holds adapters of another method .*q_proj"):
        slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub"), "hub")
    slimtune.add_adapter(model, slimtune.BottleneckConfig(placement="adapterhub", adapter_type="pfeiffer"), "hub")
    slimtune.merge_adapter(model)  # the LoRA adapter (active): the AdapterHub site has nothing to merge
    slimtune.unmerge_adapter(model)
    slimtune.set_adapter(model, "hub")
    with pytest.raises(slimtune.NotMergeableError, match="non-linearity"):
        slimtune.merge_adapter(model)


def test_post_add_residual_needs_a_post_norm_model():
    config = slimtune.BottleneckConfig(placement="adapterhub", adapter_type="pfeiffer", residual_before_ln="post_add")
    with pytest.raises(ValueError, match="post-norm model"):
        slimtune.add_adapter(tiny_llama(), config)
    slimtune.add_adapter(FAMILIES["bert"][0](), config)  # BERT: the residual after the model's own addition


def test_projection_placement_files_keep_their_fields(tmp_path):
    model = slimtune.add_adapter(tiny_llama(), slimtune.BottleneckConfig(adapter_type="pfeiffer"))
    slimtune.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "placement" not in saved and "init_from" not in saved and "original_ln_before" not in saved
    assert slimtune.config_from_dict(saved).placement == "projection"
