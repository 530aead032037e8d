"""transformers' Trainer with slimtune adapters and slimtune.SlimtuneCallback: the checkpoints hold the adapter in
PEFT's format, Delta-LoRA's W update runs, and what is saved reproduces the model that was trained."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from transformers import Trainer, TrainingArguments

import slimtune

ROWS = [{"input_ids": (ids := torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(i))),
         "labels": ids} for i in range(8)]


def _args(folder, **extra):
    settings = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, use_cpu=True, report_to=[],
                    disable_tqdm=True, save_strategy="no")
    return TrainingArguments(str(folder), **{**settings, **extra})


def _delta(model):
    return slimtune.add_adapter(model, slimtune.DeltaLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               delta_lambda=0.5, delta_start_step=0))


def _logits(model):
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("callback", [True, False], ids=["callback", "no callback"])
def test_a_delta_lora_adapter_trained_by_the_trainer_reloads_as_the_trained_model(tmp_path, callback):
    model = _delta(tiny_llama())
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    Trainer(model=model, args=_args(tmp_path / "out"), train_dataset=ROWS,
            callbacks=[slimtune.SlimtuneCallback()] if callback else []).train()
    moved = not torch.equal(w0, model.model.layers[0].self_attn.q_proj.weight)
    assert moved is callback  # the callback runs Delta-LoRA's W update; without it the adapter trains as LoRA
    slimtune.save_adapter(model, tmp_path / "adapter")
    reloaded = slimtune.load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=0)


def test_checkpoints_hold_the_adapter_and_a_resume_continues_delta_lora_exactly(tmp_path):
    whole = _delta(tiny_llama())
    Trainer(model=whole, args=_args(tmp_path / "whole"), train_dataset=ROWS,
            callbacks=[slimtune.SlimtuneCallback()]).train()
    first = _delta(tiny_llama())
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    Trainer(model=first, args=args, train_dataset=ROWS, callbacks=[slimtune.SlimtuneCallback()]).train()
    saved = tmp_path / "run" / "checkpoint-2" / "adapter"
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    resumed = _delta(tiny_llama())  # a fresh process: its Delta-LoRA state comes from the checkpoint
    Trainer(model=resumed, args=args, train_dataset=ROWS, callbacks=[slimtune.SlimtuneCallback()]).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(_logits(resumed), _logits(whole), atol=1e-5, rtol=0)
    reloaded = slimtune.load_adapter(tiny_llama(), tmp_path / "run" / "checkpoint-4" / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(whole), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [
    slimtune.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
    slimtune.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
], ids=["lora on the head", "a trained copy of the head"])
def test_a_tied_head_under_an_adapter_checkpoints_and_resumes_exactly(tmp_path, config):
    """lm_head shares the input embedding's weight; wrapped, its weight is `lm_head.base_layer.weight` (or
    `.original_module.weight`), which transformers' save_pretrained refused as an undeclared shared tensor."""
    def build():
        return slimtune.add_adapter(tiny_llama(tie_word_embeddings=True), config)

    with pytest.warns(UserWarning, match="shared with"):
        whole = build()
    Trainer(model=whole, args=_args(tmp_path / "whole"), train_dataset=ROWS).train()
    args = _args(tmp_path / "run", save_strategy="steps", save_steps=2)
    with pytest.warns(UserWarning, match="shared with"):
        first = build()
    Trainer(model=first, args=args, train_dataset=ROWS, callbacks=[slimtune.SlimtuneCallback()]).train()
    with pytest.warns(UserWarning, match="shared with"):
        resumed = build()
    Trainer(model=resumed, args=args, train_dataset=ROWS, callbacks=[slimtune.SlimtuneCallback()]).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(_logits(resumed), _logits(whole), atol=1e-5, rtol=0)
    head = getattr(resumed.lm_head, "base_layer", None) or resumed.lm_head.original_module
    assert head.weight is resumed.model.embed_tokens.weight  # still tied after the resume


def test_a_lora_plus_adapter_needs_its_own_optimizer_under_the_trainer(tmp_path):
    model = slimtune.add_adapter(tiny_llama(), slimtune.LoraPlusConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       loraplus_lr_ratio=4))
    with pytest.raises(ValueError, match="would train as plain LoRA"):  # the Trainer's AdamW: one rate
        Trainer(model=model, args=_args(tmp_path / "a", warmup_steps=2), train_dataset=ROWS,  # (rates 0 at first)
                callbacks=[slimtune.SlimtuneCallback()]).train()
    embeddings = slimtune.add_adapter(tiny_llama(), slimtune.LoraPlusConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="would train as plain LoRA"):  # its only group has a fixed rate
        Trainer(model=embeddings, args=_args(tmp_path / "e"), train_dataset=ROWS,
                callbacks=[slimtune.SlimtuneCallback()]).train()
    optimizer = slimtune.create_loraplus_optimizer(model, torch.optim.AdamW, lr=5e-2)  # the adapter's ratio
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([5e-2, 4 * 5e-2])
    Trainer(model=model, args=_args(tmp_path / "b"), train_dataset=ROWS, optimizers=(optimizer, None),
            callbacks=[slimtune.SlimtuneCallback()]).train()
