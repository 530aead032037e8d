"""Ludwig's LLM config (model_type: llm) as a slimtune recipe: the mapping, Ludwig's defaults, one clear error."""

from __future__ import annotations

import json

import pytest
import yaml
from run_helpers import rows, tiny_model_dir, write_jsonl, write_recipe

from slimtune.train.data import load_examples
from slimtune.train.ludwig import is_ludwig_config, ludwig_to_recipe_dict
from slimtune.train.recipe import RecipeError, load_recipe, recipe_from_dict
from slimtune.train.runner import run_recipe

TEMPLATE = ("Below is an instruction that describes a task, paired with an input that may provide further context.\n"
            "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
            "### Input:\n{input}\n\n### Response:\n")
# The LLM example of Ludwig's README (Ludwig 0.11), plus the dataset it takes on its command line.
README = {
    "model_type": "llm", "base_model": "meta-llama/Llama-2-7b-hf", "quantization": {"bits": 4},
    "adapter": {"type": "lora"}, "prompt": {"template": TEMPLATE},
    "input_features": [{"name": "prompt", "type": "text"}], "output_features": [{"name": "output", "type": "text"}],
    "trainer": {"type": "finetune", "learning_rate": 0.0001, "batch_size": 1, "gradient_accumulation_steps": 16,
                "epochs": 3, "learning_rate_scheduler": {"decay": "cosine", "warmup_fraction": 0.01}},
    "preprocessing": {"sample_ratio": 0.1}, "backend": {"type": "local"},
    "data": {"dataset": "alpaca.jsonl"},
}


def without(config: dict, *path: str) -> dict:
    out = json.loads(json.dumps(config))
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def test_ludwig_configs_are_recognized():
    assert is_ludwig_config(README) and is_ludwig_config({"base_model": "x"})
    assert not is_ludwig_config({"method": {"peft_type": "LORA"}, "model": {"name_or_path": "default"}})


def test_the_readme_example_maps_with_ludwig_defaults():
    with pytest.raises(RecipeError, match=r"cannot honour.*\n  - preprocessing\.sample_ratio = 0\.1: no slimtune "
                                          r"equivalent$"):
        ludwig_to_recipe_dict(README)  # the one key slimtune cannot honour, alone in the message
    recipe = recipe_from_dict(ludwig_to_recipe_dict(without(README, "preprocessing", "sample_ratio")))
    assert recipe.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    q = recipe.quantization
    assert q is not None and (q.bits, q.quant_type, q.double_quant) == (4, "nf4", True)
    m = recipe.method
    assert (m.peft_type, m.r, m.lora_alpha, m.lora_dropout) == ("LORA", 8, 16, 0.05)  # Ludwig: alpha = 2 r
    t = recipe.training
    assert (t.learning_rate, t.batch_size, t.gradient_accumulation_steps, t.epochs) == (1e-4, 1, 16, 3)
    assert (t.lr_scheduler, t.warmup_ratio, t.max_grad_norm, t.eval_batch_size) == ("cosine", 0.01, 0.5, 2)
    view = json.loads(recipe.data.dataset)
    assert view == {"source": "alpaca.jsonl", "prompt": TEMPLATE, "response": "output"}


def test_every_key_slimtune_cannot_honour_is_named_in_one_error():
    config = {**README, "adapter": {"type": "adalora", "target_r": 4}, "trainer": {"learning_rate": "auto",
              "early_stop": 5, "epochs": 1, "learning_rate_scheduler": {"decay": "exponential"}},
              "generation": {"temperature": 0.7, "max_new_tokens": 8}, "model_parameters": {"neftune_noise_alpha": 5},
              "prompt": {"task": "Answer.", "template": "{__sample__}"}, "backend": {"type": "ray"}, "combiner": {},
              "output_features": [{"name": "out", "type": "category"}]}
    del config["data"]
    with pytest.raises(RecipeError) as error:
        ludwig_to_recipe_dict(config)
    message = str(error.value)
    for key in ("model_parameters", "backend", "output_features[0].type", "prompt.task", "adapter.type",
                "trainer.type", "trainer.learning_rate", "trainer.early_stop", "trainer.learning_rate_scheduler.decay",
                "generation.temperature", "preprocessing.sample_ratio", "combiner", "data.dataset"):
        assert f"\n  - {key} = " in message, key
    assert "trainer.early_stop = 5: slimtune trains for the epochs or steps given (no early stopping)" in message
    assert message.count("\n  - ") == 13


def test_adam_with_weight_decay_is_refused_and_adamw_decouples_it():
    """Ludwig's adam is torch.optim.Adam: its weight decay is an L2 term in the gradient, not AdamW's."""
    base = without(README, "preprocessing", "sample_ratio")
    for kind, refused in (("adam", True), ("adam_8bit", True), ("adamw", False)):
        config = {**base, "trainer": {**base["trainer"], "optimizer": {"type": kind, "weight_decay": 0.01}}}
        if refused:
            with pytest.raises(RecipeError, match=rf"trainer.optimizer.weight_decay = 0.01: Ludwig's {kind} adds "
                                                  r"weight decay to the gradient .*use type: adamw"):
                ludwig_to_recipe_dict(config)
        else:
            assert ludwig_to_recipe_dict(config)["training"]["weight_decay"] == 0.01
    config = {**base, "trainer": {**base["trainer"], "optimizer": {"type": "adam", "weight_decay": 0}}}
    assert ludwig_to_recipe_dict(config)["training"]["optim"] == "adamw"  # Adam without decay is AdamW


def test_template_fields_task_and_a_template_less_prompt(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "answer": "4"}])
    config = {"model_type": "llm", "base_model": "default", "adapter": {"type": "ia3"},
              "prompt": {"task": "Add {exactly}.", "template": "{__task__} Q: {__sample__}"},
              "input_features": [{"name": "q", "column": "question", "type": "text",
                                  "preprocessing": {"max_sequence_length": 100}}],
              "output_features": [{"name": "answer", "type": "text", "preprocessing": {"max_sequence_length": 28}}],
              "trainer": {"type": "finetune", "train_steps": 5}, "data": {"dataset": str(data)}}
    recipe = recipe_from_dict(ludwig_to_recipe_dict(config))
    assert recipe.method.peft_type == "IA3" and recipe.data.max_seq_length == 128 and recipe.training.max_steps == 5
    assert load_examples(recipe.data.dataset) == [{"prompt": "Add {exactly}. Q: 2+2?", "response": "4"}]
    del config["prompt"]
    assert load_examples(recipe_from_dict(ludwig_to_recipe_dict(config)).data.dataset)[0]["prompt"] == "2+2?"


def test_the_shipped_recipe_and_overrides(tmp_path):
    recipe = load_recipe("ludwig-smollm2-pycode", ["training.max_steps=2", "trainer.learning_rate=0.01",
                                                   "output.dir=" + str(tmp_path / "run"), "distributed.strategy=ddp"])
    assert recipe.model.name_or_path == "default" and recipe.quantization is not None
    assert recipe.distributed is not None and recipe.distributed.strategy == "ddp"  # every slimtune section sits beside
    assert (recipe.training.max_steps, recipe.training.learning_rate) == (2, 0.01)  # slimtune's section wins
    example = load_examples(recipe.data.dataset, split="validation", max_examples=1)[0]
    plain = load_examples("pycode-alpaca", split="validation", max_examples=1)[0]
    assert example["prompt"].startswith("Below is an instruction") and example["prompt"].endswith("### Response:\n")
    assert plain["prompt"].split("\n\n")[0] in example["prompt"] and example["response"] == plain["response"]


def test_a_ludwig_config_trains(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": r["prompt"], "input": "", "output": r["response"]}
                                                   for r in rows(24)])
    config = {"model_type": "llm", "base_model": str(tiny_model_dir()),
              "adapter": {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
              "prompt": {"template": "### Instruction:\n{instruction}\n{input}\n### Response:\n"},
              "input_features": [{"name": "prompt", "type": "text"}],
              "output_features": [{"name": "output", "type": "text"}],
              "trainer": {"type": "finetune", "train_steps": 6, "learning_rate": 0.02, "batch_size": 4},
              "data": {"dataset": str(train), "validation_fraction": 0.25}, "model": {"device": "cpu"},
              "output": {"dir": str(tmp_path / "run")}}
    recipe = load_recipe(write_recipe(tmp_path / "ludwig.yaml", config))
    result = run_recipe(recipe, show_progress=False, log=lambda _: None)
    assert result.finished and result.summary["eval_loss_after"] < result.summary["eval_loss_before"]
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert json.loads(saved["data"]["dataset"])["prompt"].startswith("### Instruction:")
