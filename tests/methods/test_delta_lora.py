"""Delta-LoRA: W moves by exactly λ·s·(B_{t+1}A_{t+1} − B_tA_t) after each step past the start, and exports exactly."""

import copy
import json

import peft
import pytest
import torch
from tiny_models import logits, sample_inputs, tiny_gpt2, tiny_llama

import slimtune
from slimtune.methods.delta_lora import DeltaLoraLinear


def _setup(start_step, builder=tiny_llama, targets=("q_proj",)):
    model = builder().train()
    config = slimtune.DeltaLoraConfig(r=2, lora_alpha=6, target_modules=list(targets), delta_lambda=0.5,
                                      delta_start_step=start_step, init_lora_weights=False)
    slimtune.add_adapter(model, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, config, optimizer


def _step(model, config, optimizer, batch):
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    slimtune.after_optimizer_step(model)  # what the trainer calls after every optimizer step


def _snapshot(layer):
    return (layer.base_layer.weight.detach().clone(), layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone())


@pytest.mark.parametrize("start_step", [0, 1])
def test_two_steps_move_w_by_the_formula(start_step):
    model, config, optimizer = _setup(start_step)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, DeltaLoraLinear) and not layer.base_layer.weight.requires_grad
    s, lam = layer.scaling["default"], 0.5
    batch = sample_inputs("llama", batch=2, seq=8)
    w0, a0, b0 = _snapshot(layer)
    _step(model, config, optimizer, batch)
    w1, a1, b1 = _snapshot(layer)
    assert not torch.equal(b1 @ a1, b0 @ a0)
    expected1 = w0 if start_step == 1 else w0 + lam * s * (b1 @ a1 - b0 @ a0)
    torch.testing.assert_close(w1, expected1, atol=1e-7, rtol=0)
    _step(model, config, optimizer, batch)
    w2, a2, b2 = _snapshot(layer)
    torch.testing.assert_close(w2, w1 + lam * s * (b2 @ a2 - b1 @ a1), atol=1e-7, rtol=0)
    assert (w2 - w1).abs().max() > 1e-6
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_conv1d_weight_moves_in_its_own_layout():
    model, config, optimizer = _setup(0, tiny_gpt2, ("c_attn",))
    layer = model.transformer.h[0].attn.c_attn
    w0, a0, b0 = _snapshot(layer)
    _step(model, config, optimizer, sample_inputs("gpt2", batch=2, seq=8))
    w1, a1, b1 = _snapshot(layer)
    torch.testing.assert_close(w1, w0 + 0.5 * layer.scaling["default"] * (b1 @ a1 - b0 @ a0).T, atol=1e-7, rtol=0)


def test_export_reproduces_the_trained_model_from_the_untouched_base(tmp_path):
    base = tiny_llama()  # the same seeded weights as the model _setup builds
    model, config, optimizer = _setup(1)
    batch = sample_inputs("llama", batch=2, seq=8)
    for _ in range(3):
        _step(model, config, optimizer, batch)
    model.eval()
    slimtune.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 12
    inputs = sample_inputs("llama")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight,
                           base.model.layers[0].self_attn.q_proj.weight)  # W really moved


@pytest.mark.parametrize("cast_after_adding", [False, True])
def test_a_bf16_weight_loses_no_update_to_rounding(cast_after_adding):
    """Each step moves a bf16 W by much less than half its rounding unit; W plus its compensation hold the sum of
    every update (W alone within one rounding of it), where rounding each update away lost most of it."""
    torch.manual_seed(0)
    model = tiny_llama() if cast_after_adding else tiny_llama().to(torch.bfloat16)
    config = slimtune.DeltaLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], delta_lambda=0.5,
                                      delta_start_step=0, init_lora_weights=False)
    slimtune.add_adapter(model, config)
    if cast_after_adding:
        model.to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.weight.detach().double()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch = sample_inputs("llama", batch=2, seq=8)
    for _ in range(40):
        _step(model, config, optimizer, batch)
    state = layer.delta_state["default"]
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    intended = 0.5 * layer.scaling["default"] * (B @ A - state.start_B.double() @ state.start_A.double())
    moved = layer.weight.double() + state.compensation.double() - w0
    assert float((moved - intended).norm() / intended.norm()) < 0.01
    one_unit = layer.weight.double().abs() * 2.0 ** -7  # bf16: 8 significant bits, so a unit is at most 2^-7 of W
    assert bool(((layer.weight.double() - w0 - intended).abs() <= one_unit + 1e-12).all())
    assert "compensation" in slimtune.methods.delta_lora.DeltaState.tensors(state)  # checkpointed with the rest


def test_deleting_the_adapter_takes_its_updates_out_of_w():
    model, config, optimizer = _setup(0)
    w0 = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    for _ in range(2):
        _step(model, config, optimizer, sample_inputs("llama", batch=2, seq=8))
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["k_proj"]), "other")
    slimtune.set_adapter(model, "other")
    slimtune.delete_adapter(model, "default")
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lora_dropout": 0.1}, "lora_dropout=0.1"), ({"use_dora": True}, "use_dora=True"),
    ({"delta_lambda": -1}, "delta_lambda=-1"), ({"delta_start_step": -2}, "delta_start_step=-2"),
])
def test_bad_options_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        slimtune.DeltaLoraConfig(**kwargs)


def test_quantized_or_embedding_targets_are_refused():
    with pytest.raises(TypeError, match="floating-point linear"):
        slimtune.add_adapter(tiny_llama(), slimtune.DeltaLoraConfig(target_modules=["embed_tokens"]))
