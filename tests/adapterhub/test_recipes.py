"""Recipes with AdapterHub adapters, end to end through `slimtune train` on a tiny offline model: two
AdapterHub-placed adapters, an AdapterFusion over them (the shape of recipes/fusion-smollm2-pycode*.yaml),
and a bottleneck adapter that starts from an AdapterHub folder (``init_from``)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent.parent / "train"))  # the tiny model and recipe helpers live there
from run_helpers import tiny_model_dir, tiny_recipe, write_recipe  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import slimtune  # noqa: E402
from slimtune import adapterhub  # noqa: E402
from slimtune.cli import main  # noqa: E402
from slimtune.train.recipe import load_recipe  # noqa: E402

ADAPTER = {"peft_type": "BOTTLENECK", "placement": "adapterhub", "adapter_type": "pfeiffer",
           "init_weights": "mam_adapter"}


def _train(tmp_path: Path, name: str, method: dict) -> dict:
    (tmp_path / name).mkdir()
    recipe = tiny_recipe(tmp_path / name, quantized=False, output={"dir": str(tmp_path / name / "run")},
                         demo={"enabled": False})
    recipe["method"] = method
    assert main(["train", str(write_recipe(tmp_path / name / "recipe.yaml", recipe)), "--no-progress"]) == 0
    return json.loads((tmp_path / name / "run" / "summary.json").read_text())


def test_fusion_trains_over_two_adapters_from_earlier_runs(tmp_path, capsys):
    first = _train(tmp_path, "a", {**ADAPTER, "reduction_factor": 4})
    second = _train(tmp_path, "b", {**ADAPTER, "reduction_factor": 8, "non_linearity": "swish"})
    for summary in (first, second):
        assert summary["eval_loss_after"] < summary["eval_loss_before"]
    paths = {n: str(tmp_path / n / "run" / "adapter") for n in ("a", "b")}
    fused = _train(tmp_path, "fusion", {"peft_type": "ADAPTER_FUSION", "adapter_names": ["a", "b"],
                                        "adapter_paths": paths})
    assert fused["eval_loss_after"] < fused["eval_loss_before"]
    assert "trainable params" in capsys.readouterr().out
    saved = tmp_path / "fusion" / "run" / "adapter"
    config = json.loads((saved / "adapter_config.json").read_text())
    # the fused adapters travel inside the fusion's folder, which names nothing outside itself
    assert config["peft_type"] == "ADAPTER_FUSION" and config["adapter_paths"] == {"a": "fused/a", "b": "fused/b"}
    assert {k.split(".adapter_fusion_layer.")[-1] for k in load_file(saved / "adapter_model.safetensors")} == \
        {"query.weight", "query.bias", "key.weight", "key.bias", "value.weight"}  # only the fusion layers
    for name in ("a", "b"):
        assert load_file(saved / "fused" / name / "adapter_model.safetensors").keys() == \
            load_file(Path(paths[name]) / "adapter_model.safetensors").keys()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    loaded = slimtune.load_adapter(copy.deepcopy(model), saved)
    for name in ("a", "b"):
        shutil.rmtree(paths[name])  # the earlier runs are gone: the fusion still loads, to the same outputs
    again = slimtune.load_adapter(model, saved)
    assert slimtune.list_adapters(again) == ["a", "b", "default"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=0, atol=0)


def test_a_recipe_can_start_from_an_adapterhub_folder(tmp_path):
    _train(tmp_path, "a", {**ADAPTER, "reduction_factor": 4})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    slimtune.load_adapter(model, tmp_path / "a" / "run" / "adapter")
    adapterhub.save_adapterhub(model, tmp_path / "hub", "default")  # as adapters would hand it over
    started = _train(tmp_path, "again", {"peft_type": "BOTTLENECK", "init_from": str(tmp_path / "hub")})
    trained = _train(tmp_path, "fresh", {**ADAPTER, "reduction_factor": 4})
    # starting from the trained adapter, the loss is already low before this run's first step
    first_step = [json.loads(line) for line in (tmp_path / "again" / "run" / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line][0]["loss"]
    fresh_step = [json.loads(line) for line in (tmp_path / "fresh" / "run" / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line][0]["loss"]
    assert first_step < fresh_step and started["eval_loss_after"] <= trained["eval_loss_after"] + 0.5
    recorded = load_recipe(tmp_path / "again" / "run" / "recipe.yaml").method
    assert recorded.placement == "adapterhub" and recorded.reduction_factor == 4

