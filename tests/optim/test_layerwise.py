"""Layer-wise learning-rate decay: depths, the formula, any method, errors."""

import pytest
import torch
from tiny_models import (
    one_thread,  # noqa: F401 (a fixture, used by pytestmark)
    sample_inputs,
    tiny_bert_cls,
    tiny_llama,
    tiny_t5,
)

import slimtune
from slimtune import layerwise_lr_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _lr_of(groups):
    return {name: g["lr"] for g in groups for name in g["names"]}


def test_full_fine_tuning_groups_follow_the_formula():
    model = tiny_llama(layers=3)
    lr = _lr_of(layerwise_lr_groups(model, 1.0, 0.5))
    assert lr["model.embed_tokens.weight"] == 0.5 ** 4  # depth 0: decay^(L + 1)
    for i in range(3):  # block i: decay^(L - i)
        assert lr[f"model.layers.{i}.self_attn.q_proj.weight"] == 0.5 ** (3 - i)
    assert lr["model.norm.weight"] == lr["lm_head.weight"] == 1.0
    assert set(lr) == {n for n, _ in model.named_parameters()}


def test_only_trainable_parameters_of_any_method_are_grouped():
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    groups = layerwise_lr_groups(model, 1e-3, 0.8)
    assert [g["depth"] for g in groups] == [1, 2]
    assert all("lora_" in n for g in groups for n in g["names"])
    assert groups[0]["lr"] == pytest.approx(1e-3 * 0.8 ** 2) and groups[1]["lr"] == pytest.approx(1e-3 * 0.8)
    optimizer = torch.optim.AdamW(groups)  # the groups plug straight into an optimizer
    model.train()
    batch = sample_inputs("llama")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    prompt = slimtune.add_adapter(tiny_llama(), slimtune.PromptTuningConfig(num_virtual_tokens=2))
    assert [g["lr"] for g in layerwise_lr_groups(prompt, 1e-3, 0.8)] == [1e-3]  # above the blocks


def test_encoder_blocks_sit_below_decoder_blocks():
    lr = _lr_of(layerwise_lr_groups(tiny_t5(), 1.0, 0.5))  # 2 encoder + 2 decoder blocks, L = 4
    assert lr["shared.weight"] == 0.5 ** 5
    assert lr["encoder.block.0.layer.0.SelfAttention.q.weight"] == 0.5 ** 4
    assert lr["decoder.block.1.layer.0.SelfAttention.q.weight"] == 0.5 ** 1
    bert = _lr_of(layerwise_lr_groups(tiny_bert_cls(), 1.0, 0.5))
    assert bert["bert.embeddings.word_embeddings.weight"] == 0.5 ** 3 and bert["classifier.weight"] == 1.0


@pytest.mark.parametrize("decay", [0, -0.5, 1.5])
def test_decay_outside_0_1_is_rejected(decay):
    with pytest.raises(ValueError, match=f"decay={decay}"):
        layerwise_lr_groups(tiny_llama(), 1e-3, decay)


def test_a_frozen_model_and_an_unknown_block_list_are_reported():
    model = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        layerwise_lr_groups(model, 1e-3, 0.9)
    with pytest.raises(ValueError, match="found no list of transformer blocks named"):
        layerwise_lr_groups(tiny_llama(), 1e-3, 0.9, layers_pattern="blocks")


def test_biases_and_norms_get_no_weight_decay_as_in_the_default_grouping():
    model = tiny_llama(layers=2)  # full fine-tuning: RMSNorm weights are 1-D
    groups = layerwise_lr_groups(model, 1.0, 0.5)
    flat = {name for g in groups for name, p in zip(g["names"], g["params"]) if p.ndim < 2}
    assert flat and all((g.get("weight_decay") == 0.0) == all(n in flat for n in g["names"]) for g in groups)
    lr = _lr_of(groups)  # a norm learns at its block's rate
    assert lr["model.layers.1.input_layernorm.weight"] == lr["model.layers.1.self_attn.q_proj.weight"]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    assert {p.ndim < 2 for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]} == {False}
