"""LoRA-FA: only B trains, the layer input is not kept for A's gradient, and the adapter is plain LoRA on disk."""

import copy
import json

import peft
import pytest
import torch
from tiny_models import logits, sample_inputs, tiny_llama

import slimtune
from slimtune.methods.lora_fa import LoraFALinear, _FrozenProjection


def _train(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = sample_inputs("llama", batch=2, seq=12)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_only_b_trains(dropout):
    model = slimtune.add_adapter(tiny_llama().train(), slimtune.LoraFAConfig(r=4, target_modules="all-linear",
                                                                        lora_dropout=dropout))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    slimtune.set_adapter(model, ["default"])  # re-activation must not unfreeze A
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    _train(model)
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            assert torch.equal(p, before[name]) and p.grad is None, name
        elif ".lora_B." in name:
            assert not torch.equal(p, before[name]), name


def _saved_bytes(model, batch) -> int:
    """Bytes of distinct tensors autograd keeps for backward during one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, labels=batch["input_ids"])
    return sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_layer_input_is_not_kept_for_a(dropout):
    base = tiny_llama().train()
    batch = sample_inputs("llama", batch=2, seq=64)
    kwargs = dict(r=4, target_modules="all-linear", lora_dropout=dropout)
    lora = _saved_bytes(slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraConfig(**kwargs)), batch)
    fa = _saved_bytes(slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraFAConfig(**kwargs)), batch)
    # Per layer and block, LoRA keeps the inputs of o_proj (32 wide) and down_proj (64 wide) that nothing
    # else keeps; with dropout also a one-byte mask per adapter (6 × 32 + 64 wide): LoRA-FA keeps none.
    tokens = 2 * 64
    min_saving = 2 * tokens * (32 + 64) * 4 + (2 * tokens * (6 * 32 + 64) if dropout else 0)
    assert lora - fa >= min_saving, (lora, fa)


def test_dropout_mask_is_regenerated_exactly_in_backward():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(8, dtype=torch.float64)  # A = I: the output is the dropped-out input itself
    out = _FrozenProjection.apply(x, eye, 0.4)
    out.sum().backward()
    mask = out.detach() / x.detach()  # 0 or 1 / (1 - p)
    assert set(torch.unique(mask.round(decimals=6)).tolist()) == {0.0, round(1 / 0.6, 6)}
    torch.testing.assert_close(x.grad, mask)  # d(sum(mask ⊙ x)) / dx


def test_saved_as_plain_lora_that_peft_loads(tmp_path):
    base = tiny_llama()
    model = slimtune.add_adapter(copy.deepcopy(base), slimtune.LoraFAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _train(model.train(), steps=2)
    model.eval()
    slimtune.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    inputs = sample_inputs("llama")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), atol=1e-5, rtol=0)
    assert (logits(model, inputs) - logits(base, inputs)).abs().max() > 1e-4


def test_merge_round_trip_and_recipe_round_trip():
    config = slimtune.LoraFAConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = slimtune.add_adapter(tiny_llama(), config)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraFALinear)
    inputs = sample_inputs("llama")
    expected = logits(model, inputs)
    slimtune.merge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    slimtune.unmerge_adapter(model)
    torch.testing.assert_close(logits(model, inputs), expected, atol=1e-5, rtol=0)
    config = slimtune.LoraFAConfig(r=4, target_modules=["q_proj"])
    assert slimtune.config_from_dict(config.to_dict()) == config  # a recipe can name peft_type LORA_FA


def test_embedding_target_is_refused():
    with pytest.raises(TypeError, match="LoRA-FA wraps linear layers"):
        slimtune.add_adapter(tiny_llama(), slimtune.LoraFAConfig(target_modules=["embed_tokens"]))
