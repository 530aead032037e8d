"""LoRA+ parameter groups: lr_B = ratio × lr_A, every trainable parameter exactly once."""

import json

import pytest
import torch
from tiny_models import sample_inputs, tiny_gpt2, tiny_llama

import slimtune
from slimtune.lifecycle import method_param_groups


def _model(**kwargs):  # GPT-2: attention biases (1-D), Conv1D LoRA and an embedding LoRA
    return slimtune.add_adapter(tiny_gpt2(), slimtune.LoraConfig(r=4, target_modules=["c_attn", "wte"], **kwargs))


@pytest.mark.parametrize("ratio", [16.0, 4.0])
def test_groups_have_the_ratio(ratio):
    model = _model(bias="lora_only")
    groups = {g["name"]: g for g in slimtune.loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=ratio)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["lora_B"]["lr"] == pytest.approx(ratio * groups["lora_A"]["lr"]) and groups["lora_A"]["lr"] == 1e-4
    assert all(".lora_B." in names[id(p)] for p in groups["lora_B"]["params"])
    assert all(".lora_A." in names[id(p)] for p in groups["lora_A"]["params"])
    assert all(names[id(p)].endswith("bias") for p in groups["lora_B_no_decay"]["params"])
    assert groups["lora_B_no_decay"]["weight_decay"] == 0.0 and groups["lora_B_no_decay"]["lr"] == ratio * 1e-4
    assert groups["embedding"]["lr"] == 1e-6
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_create_loraplus_optimizer_has_peft_groups_and_weight_decay():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_create

    def summary(optimizer, model):
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted((round(g["lr"], 12), g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
                      for g in optimizer.param_groups if g["params"])

    ours = _model(bias="lora_only")
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "wte"], bias="lora_only"))
    for extra in ({}, {"weight_decay": 0.1}, {"loraplus_weight_decay": 0.05}):
        mine = slimtune.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **extra)
        peft_optimizer = peft_create(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, **extra)
        strip = lambda rows: [(lr, wd, tuple(n.removeprefix("base_model.model.").replace(".default", "")  # noqa: E731
                                             for n in names)) for lr, wd, names in rows]
        assert strip(summary(mine, ours)) == strip(summary(peft_optimizer, theirs)), extra


def test_optimizer_steps_b_faster():
    model = slimtune.add_adapter(tiny_llama(),
                                 slimtune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    optimizer = slimtune.create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=16)
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    before = a.detach().clone(), b.detach().clone()
    batch = sample_inputs("llama")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = a.grad.clone(), b.grad.clone()
    optimizer.step()
    torch.testing.assert_close(before[0] - a.detach(), 0.01 * grads[0])
    torch.testing.assert_close(before[1] - b.detach(), 0.16 * grads[1])


def test_loraplus_config_is_a_trainer_hook_and_saves_as_lora(tmp_path):
    config = slimtune.LoraPlusConfig(r=4, target_modules=["q_proj"], loraplus_lr_ratio=8, use_dora=True)
    model = slimtune.add_adapter(tiny_llama(), config)
    groups = {g["name"]: g for g in method_param_groups(model, 2e-4)}  # what the trainer builds its optimizer from
    assert groups["lora_B"]["lr"] == pytest.approx(8 * 2e-4)
    assert groups["lora_B_no_decay"]["lr"] == pytest.approx(8 * 2e-4)  # DoRA magnitudes, 1-D, as in PEFT
    slimtune.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] and not any(k.startswith("loraplus") for k in saved)
    assert slimtune.config_from_dict(config.to_dict()) == config


def test_bad_ratio_and_empty_model_are_clear_errors():
    with pytest.raises(ValueError, match="loraplus_lr_ratio=0.5"):
        slimtune.LoraPlusConfig(loraplus_lr_ratio=0.5)
    with pytest.raises(ValueError, match="loraplus_lr_ratio=0"):
        slimtune.loraplus_param_groups(_model(), lr=1e-4, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        slimtune.loraplus_param_groups(tiny_llama().requires_grad_(False), lr=1e-4)
