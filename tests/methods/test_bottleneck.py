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
    tiny_gpt2,
    tiny_llama,
    train_losses,
)

import slimtune
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
