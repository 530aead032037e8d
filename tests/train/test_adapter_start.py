"""A run that trains a saved adapter further (`model.adapter: <folder>`): the folder decides the method, its
weights are where training starts, and a recipe may change only the dropout."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from run_helpers import tiny_model_dir, tiny_recipe, write_recipe
from transformers import AutoModelForCausalLM

from slimtune.adapter_files import adapter_tensors, read_adapter_tensors
from slimtune.cli import main
from slimtune.train import runner
from slimtune.train.recipe import RecipeError, recipe_from_dict


def _finished_run(tmp_path, quantized=False):
    (tmp_path / "first").mkdir(exist_ok=True)
    recipe = tiny_recipe(tmp_path / "first", quantized=quantized, training={"max_steps": 4, "save_every": 0},
                         demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "first.yaml", recipe)), "--no-progress"]) == 0
    return tmp_path / "first" / "run", recipe


def _continued(tmp_path, first_run, quantized=False, **sections):
    (tmp_path / "second").mkdir(exist_ok=True)
    recipe = tiny_recipe(tmp_path / "second", quantized=quantized, demo={"enabled": False},
                         model={"adapter": str(first_run / "adapter")}, **sections)
    recipe.pop("method")
    return recipe


def _loaded(recipe_dict):
    recipe = recipe_from_dict(recipe_dict)
    model, _ = runner.load_model(recipe, runner._device(recipe), lambda _: None)
    model.train()
    runner.add_method(model, recipe)
    return recipe, model


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_a_run_starts_from_the_saved_adapter_and_continues_where_it_ended(tmp_path, quantized):
    first, _ = _finished_run(tmp_path, quantized)
    ended = json.loads((first / "summary.json").read_text())["eval_loss_after"]
    recipe = _continued(tmp_path, first, quantized, training={"max_steps": 1, "save_every": 0, "learning_rate": 1e-9,
                                                              "warmup_steps": 0})
    assert main(["train", str(write_recipe(tmp_path / "second.yaml", recipe)), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "second" / "run" / "summary.json").read_text())
    assert summary["eval_loss_after"] == pytest.approx(ended, abs=1e-4)  # a fresh adapter would be at the base's
    assert abs(summary["eval_loss_before"] - ended) > 0.05  # ... which is this far from where the first run ended
    saved = yaml.safe_load((tmp_path / "second" / "run" / "recipe.yaml").read_text().split("\n", 1)[1])
    assert saved["method"]["r"] == 4 and saved["model"]["adapter"] == str(first / "adapter")


def test_the_adapter_loaded_is_the_saved_one_trainable_in_train_mode(tmp_path):
    first, _ = _finished_run(tmp_path)
    recipe, model = _loaded(_continued(tmp_path, first))
    stored = read_adapter_tensors(first / "adapter")
    live = adapter_tensors(model)
    assert len(live) == len(stored) > 0
    for key, tensor in live.items():
        assert tensor.requires_grad, key
    peft_keyed = {k.replace(".default", ""): v for k, v in live.items()}
    for key, tensor in stored.items():
        torch.testing.assert_close(peft_keyed[key].detach(), tensor, rtol=0, atol=0)
    assert model.training and not recipe.method.inference_mode


def test_an_adapter_saved_by_peft_starts_a_run(tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    torch.manual_seed(3)
    peft_model = get_peft_model(base, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    recipe = tiny_recipe(tmp_path, quantized=False, model={"adapter": str(tmp_path / "peft_adapter")})
    recipe["method"] = {"lora_dropout": 0.25}  # what training alone uses may change
    built, model = _loaded(recipe)
    assert built.method.r == 2 and built.method.lora_dropout == 0.25
    stored = read_adapter_tensors(tmp_path / "peft_adapter")
    live = {k.replace(".default", ""): v for k, v in adapter_tensors(model).items()}
    assert set(live) == set(stored)
    for key, tensor in stored.items():
        torch.testing.assert_close(live[key].detach(), tensor, rtol=0, atol=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_dropout["default"].p == 0.25


def test_a_method_section_may_repeat_the_folder_but_not_change_it(tmp_path):
    first, original = _finished_run(tmp_path)
    recipe = _continued(tmp_path, first)
    # the first run's own method section, but "all-linear": the saved config lists the layers it resolved to
    recipe["method"] = {k: v for k, v in original["method"].items() if k != "target_modules"}
    assert recipe_from_dict(recipe).method == recipe_from_dict(_continued(tmp_path, first)).method
    assert recipe_from_dict(recipe).method.r == original["method"]["r"]
    for key, value in (("r", 8), ("lora_alpha", 4), ("target_modules", "all-linear"), ("peft_type", "IA3")):
        changed = {**original["method"], key: value}
        with pytest.raises(RecipeError, match=f"method.{key}: .*differs from the adapter in model.adapter"):
            recipe_from_dict({**recipe, "method": changed})
    with pytest.raises(RecipeError, match="method.lora_alhpa: unknown key"):
        recipe_from_dict({**recipe, "method": {"lora_alhpa": 4}})


def test_the_saved_recipe_reads_back_and_a_missing_folder_is_named(tmp_path):
    first, _ = _finished_run(tmp_path)
    recipe = recipe_from_dict(_continued(tmp_path, first))
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    missing = _continued(tmp_path, first)
    missing["model"]["adapter"] = str(tmp_path / "nowhere")
    with pytest.raises(RecipeError, match=r"model.adapter: adapter folder .*nowhere does not exist"):
        recipe_from_dict(missing)


def test_a_finished_run_points_to_model_adapter(tmp_path, capsys):
    first, original = _finished_run(tmp_path)
    assert main(["train", str(tmp_path / "first.yaml"), "--resume", "--no-progress"]) != 0
    assert f"model.adapter: '{first}/adapter'" in capsys.readouterr().err


def test_a_resume_knows_the_adapter_folder_by_its_absolute_path(tmp_path, monkeypatch):
    first, _ = _finished_run(tmp_path)
    absolute = runner.comparable(recipe_from_dict(_continued(tmp_path, first)))
    monkeypatch.chdir(first)
    relative = _continued(tmp_path, first)
    relative["model"]["adapter"] = "adapter"
    assert runner.comparable(recipe_from_dict(relative)) == absolute


def _saved(tmp_path, config, name="saved"):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    import slimtune

    slimtune.add_adapter(model, config)
    return str(slimtune.save_adapter(model, tmp_path / name))


def test_repeating_the_folder_in_another_order_or_its_init_fields_is_accepted(tmp_path):
    import slimtune

    folder = _saved(tmp_path, slimtune.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "k_proj"]))
    recipe = tiny_recipe(tmp_path, quantized=False, model={"adapter": folder})
    for section in ({"target_modules": ["k_proj", "q_proj", "v_proj"]},  # PEFT writes a set: any order
                    {"inference_mode": True, "init_lora_weights": "gaussian"}):  # the file's, or how it began
        built = recipe_from_dict({**recipe, "method": {"peft_type": "LORA", **section}}).method
        assert sorted(built.target_modules) == ["k_proj", "q_proj", "v_proj"] and not built.inference_mode
    with pytest.raises(RecipeError, match="method.target_modules: .* differs"):
        recipe_from_dict({**recipe, "method": {"target_modules": ["k_proj", "q_proj"]}})


def test_a_lora_folder_trains_further_as_any_of_the_lora_family(tmp_path):
    import slimtune

    folder = _saved(tmp_path, slimtune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    recipe = tiny_recipe(tmp_path, quantized=False, model={"adapter": folder})
    built = recipe_from_dict({**recipe, "method": {"peft_type": "LORA_FA"}}).method
    assert built.peft_type == "LORA_FA" and built.r == 2  # LoRA-FA saves as LoRA: the run says which it is
    plus = recipe_from_dict({**recipe, "method": {"peft_type": "LORA_PLUS", "loraplus_lr_ratio": 4.0}}).method
    assert plus.peft_type == "LORA_PLUS" and plus.loraplus_lr_ratio == 4.0
    for other in ("IA3", "DELTA_LORA"):  # Delta-LoRA's adapter holds other tensors (its rank-2r export)
        with pytest.raises(RecipeError, match=rf"method.peft_type: '{other}' differs .*\(or LORA_FA / LORA_PLUS\)"):
            recipe_from_dict({**recipe, "method": {"peft_type": other}})
    dora = _saved(tmp_path, slimtune.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    with pytest.raises(RecipeError, match=r"which is LORA with DoRA; drop method.peft_type \(the folder decides"):
        recipe_from_dict({**recipe, "model": {**recipe["model"], "adapter": dora}, "method": {"peft_type": "LORA_FA"}})


@pytest.mark.parametrize("config", ["p_tuning", "prefix_projection"])
def test_an_adapter_holding_only_its_encoders_output_is_refused(tmp_path, config):
    import slimtune

    made = slimtune.PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=8) if config == "p_tuning" else \
        slimtune.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8)
    folder = _saved(tmp_path, made)
    with pytest.raises(RecipeError, match="holds what its encoder computed, not the encoder"):
        recipe_from_dict(tiny_recipe(tmp_path, quantized=False, model={"adapter": folder}, method=None))
    with pytest.raises(ValueError, match="holds a P.* adapter.*: its file holds what its encoder computed"):
        slimtune.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir()), folder, is_trainable=True)
    slimtune.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir()), folder)  # for inference
    plain = _saved(tmp_path, slimtune.PrefixTuningConfig(num_virtual_tokens=2), "plain")
    recipe = tiny_recipe(tmp_path, quantized=False, model={"adapter": plain}, method=None)
    assert recipe_from_dict(recipe).method.peft_type == "PREFIX_TUNING"
