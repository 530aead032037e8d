"""Recipes: shipped files validate, overrides parse as YAML, bad keys and values name their dotted path."""

from __future__ import annotations

import dataclasses
import re

import pytest

from slimtune.config import LoraConfig, MethodConfig
from slimtune.methods import REGISTRY
from slimtune.methods.lora import LoraMethod
from slimtune.quant import QuantConfig
from slimtune.train.recipe import (
    RECIPE_DIR,
    RecipeError,
    apply_overrides,
    find_recipe,
    list_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_summary,
)

MINIMAL = {"method": {"peft_type": "LORA"}}


def test_shipped_recipes_exist_and_validate():
    names = [p.stem for p in list_recipes()]
    assert {"qlora-smollm2-pycode", "lora-smollm2-pycode"} <= set(names)
    for path in list_recipes():
        recipe = load_recipe(path)
        assert recipe.name == path.stem and recipe.description
        description, command = recipe_summary(path)
        assert command.startswith("slimtune train") and path.stem in command, f"{path.name}: header lacks '# Run:'"
        assert recipe_from_dict(recipe.to_dict(), name=recipe.name) == recipe  # lossless round trip


def test_default_recipe_is_qlora_on_the_default_model():
    recipe = load_recipe("qlora-smollm2-pycode")
    assert recipe.model.name_or_path == "default" and recipe.data.dataset == "pycode"
    assert isinstance(recipe.quantization, QuantConfig) and recipe.quantization.quant_type == "nf4"
    assert isinstance(recipe.method, LoraConfig) and recipe.method.target_modules == "all-linear"
    assert recipe.demo.enabled and recipe.data.max_seq_length == 256


def test_find_by_name_or_path(tmp_path):
    assert find_recipe("lora-smollm2-pycode") == RECIPE_DIR / "lora-smollm2-pycode.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("method: {peft_type: LORA}\n")
    assert find_recipe(own) == own and load_recipe(own).name == "mine"
    with pytest.raises(RecipeError, match=r"not found.*qlora-smollm2-pycode"):
        find_recipe("no-such-recipe")
    own.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(own)
    own.write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(own)


def test_overrides_are_yaml_values_and_create_sections():
    data = apply_overrides({"method": {"peft_type": "LORA"}}, [
        "training.max_steps=12", "training.learning_rate=3e-4", "method.target_modules=[q_proj, v_proj]",
        "demo.enabled=true", "data.max_eval_examples=null", "quantization.bits=4", "output.dir=runs/x=y",
    ])
    recipe = recipe_from_dict(data)
    assert recipe.training.max_steps == 12 and recipe.training.learning_rate == pytest.approx(3e-4)
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    assert recipe.demo.enabled is True and recipe.data.max_eval_examples is None
    assert recipe.quantization == QuantConfig(bits=4)
    assert recipe.output.dir == "runs/x=y"  # only the first '=' splits
    for bad in ["training.max_steps", "=3", "training..x=1"]:
        with pytest.raises(RecipeError, match="key.sub=value"):
            apply_overrides({}, [bad])
    with pytest.raises(RecipeError, match=r"override training.max_steps.sub: training.max_steps is 3, not a section"):
        apply_overrides({"training": {"max_steps": 3}}, ["training.max_steps.sub=1"])


@pytest.mark.parametrize("data, message", [
    ({"trainin": {}, **MINIMAL}, r"^trainin: unknown key\. Did you mean 'training'\?"),
    ({"training": {"lerning_rate": 1.0}, **MINIMAL},
     r"^training\.lerning_rate: unknown key\. Did you mean 'learning_rate'"),
    ({"method": {"peft_type": "LORA", "rr": 4}}, r"^method\.rr: unknown key\. Did you mean 'r'\?.*lora_alpha"),
    ({"quantization": {"bitz": 4}, **MINIMAL}, r"^quantization\.bitz: unknown key.*quant_type"),
    ({"method": {"peft_type": "LORA", "r": "sixteen"}}, r"^method\.r: expected an integer, got str 'sixteen'"),
    ({"method": {"peft_type": "LORA", "r": 0}}, r"^method\.r: r=0 must be a positive integer"),
    ({"method": {"peft_type": "LORA", "target_modules": ["q", 3]}}, r"^method\.target_modules\[1\]: expected a string"),
    ({"method": {"peft_type": "NOPE"}}, r"^method\.peft_type: 'NOPE' is not a known method; use one of \[.*'LORA'"),
    ({"method": {"r": 4}}, r"^method\.peft_type: missing"),
    ({"method": {"peft_type": "LAYERDROP"}}, r"^method\.peft_type: LAYERDROP adds no parameters.*apply_layerdrop"),
    ({}, r"^method: missing"),
    ({"training": {"max_steps": 2.5}, **MINIMAL}, r"^training\.max_steps: expected an integer or null, got float"),
    ({"training": {"lr_scheduler": "cos"}, **MINIMAL}, r"^training\.lr_scheduler: expected one of 'cosine', 'linear'"),
    ({"training": {"batch_size": 0}, **MINIMAL}, r"^training\.batch_size: batch_size=0 must be at least 1"),
    ({"training": {"adam_betas": [0.9]}, **MINIMAL}, r"^training\.adam_betas: "),
    ({"training": {"optim": "sgd"}, **MINIMAL},
     r"^training\.optim: optim='sgd' is not an optimizer; use one of \['adamw'"),
    ({"training": {"loss": "fast"}, **MINIMAL}, r"^training\.loss: expected one of 'auto', 'chunked', 'full'"),
    ({"model": {"gradient_checkpointing": "yes"}, **MINIMAL},
     r"^model\.gradient_checkpointing: expected true/false or "),
    ({"training": "fast", **MINIMAL}, r"^training: expected a mapping with keys \["),
    ({"model": {"device": "gpu"}, **MINIMAL}, r"^model\.device: device='gpu' is not a device"),
    ({"quantization": {"blocksize": 48}, **MINIMAL}, r"^quantization\.blocksize: blocksize=48 is not supported"),
    ({"data": {"max_seq_length": 1}, **MINIMAL}, r"^data\.max_seq_length: "),
    ({"data": {"dataset": " "}, **MINIMAL}, r"^data\.dataset: dataset=' ' is empty; give a file"),
    ({"data": {"eval_dataset": ""}, **MINIMAL}, r"^data\.eval_dataset: eval_dataset='' is empty; .*null"),
    ({"method": {"peft_type": "LORA", "task_type": "SEQ_CLS"}}, r"^method\.task_type: 'SEQ_CLS' is not supported"),
    ({"description": 3, **MINIMAL}, r"^description: expected a string"),
    ({"training": {"adam_epsilon": -1}, **MINIMAL}, r"^training\.adam_epsilon: adam_epsilon=-1.0 must be positive"),
    ({"training": {"weight_decay": -0.1}, **MINIMAL}, r"^training\.weight_decay: weight_decay=-0.1 must be 0"),
    ({"method": {"peft_type": "PROMPT_TUNING"}, "data": {"packing": True}},
     r"^data\.packing: true cannot train PROMPT_TUNING: its virtual tokens .* set data\.packing: false"),
    ({"method": {"peft_type": "PREFIX_TUNING"}, "data": {"packing": True}},
     r"^data\.packing: true cannot train PREFIX"),
    # non-finite numbers, also where null is allowed (NaN passes `<= 0` checks and trains to NaN)
    ({"training": {"learning_rate": float("nan")}, **MINIMAL}, r"^training\.learning_rate: expected a number"),
    ({"training": {"max_grad_norm": float("nan")}, **MINIMAL}, r"^training\.max_grad_norm: expected a number or null"),
    ({"training": {"loraplus_lr_ratio": float("inf")}, **MINIMAL}, r"^training\.loraplus_lr_ratio: expected a number"),
    ({"method": {"peft_type": "LORA", "target_modules": "(q"}}, r"^method\.target_modules: .* not a valid regular"),
    ({"training": {"seed": 2**64}, **MINIMAL}, r"^training\.seed: seed=18446744073709551616 is out of range"),
    ({"method": {"peft_type": "LORA_PLUS"}, "training": {"loraplus_lr_ratio": 16.0}},
     r"^training\.loraplus_lr_ratio: method LORA_PLUS sets the optimizer's parameter groups itself"),
    ({"method": {"peft_type": "LORA_PLUS"}, "training": {"layerwise_lr_decay": 0.8}},
     r"^training\.layerwise_lr_decay: method LORA_PLUS sets"),
    ({"output": {"dir": "$SLIMTUNE_TEST_UNSET/run"}, **MINIMAL},
     r"^output\.dir: dir='\$SLIMTUNE_TEST_UNSET/run': the environment variable SLIMTUNE_TEST_UNSET is not set"),
    ({"data": {"dataset": "${SLIMTUNE_TEST_UNSET}.jsonl"}, **MINIMAL}, r"^data\.dataset: .*SLIMTUNE_TEST_UNSET is not"),
    ({"training": {"mixed_precision": True}, **MINIMAL}, r"^training\.mixed_precision: expected one of"),
    ({"method": {"peft_type": "LORA", "inference_mode": True}}, r"^method\.inference_mode: true .* train nothing"),
    ({"method": {"peft_type": "DELTA_LORA"}, "quantization": {"bits": 8}},
     r"^method\.peft_type: DELTA_LORA moves the base weights .* drop the quantization section"),
    ({"training": {"keep_dequantized": True}, **MINIMAL},
     r"^training\.keep_dequantized: true keeps a quantized base's decoded weights .* no quantization section"),
    ({"training": {"compile": True}, "model": {"gradient_checkpointing": True}, **MINIMAL},
     r"^training\.compile: true with model\.gradient_checkpointing: .* set model\.gradient_checkpointing: false"),
    ({"training": {"compile": True}, "distributed": {"strategy": "ddp"}, **MINIMAL},
     r"^training\.compile: true with a distributed section"),
    ({"training": {"compile": "yes"}, **MINIMAL}, r"^training\.compile: expected true/false"),
])
def test_bad_recipes_name_the_dotted_key(data, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(data)


def test_methods_come_from_the_registry():
    """A registered method (a plug-in's too) is usable in recipes, with its own config fields checked."""

    @dataclasses.dataclass
    class ToyConfig(LoraConfig):
        peft_type = "TOY_TEST"
        toy_ratio: float = 1.0

    class ToyMethod(LoraMethod):
        peft_type = "TOY_TEST"
        config_class: type[MethodConfig] = ToyConfig

    REGISTRY.register(ToyMethod)
    try:
        recipe = recipe_from_dict({"method": {"peft_type": "TOY_TEST", "toy_ratio": "2e0", "r": 2}})
        assert isinstance(recipe.method, ToyConfig) and recipe.method.toy_ratio == 2.0
        assert recipe.method.task_type == "CAUSAL_LM"  # filled in for causal LM training
        with pytest.raises(RecipeError, match=r"method\.toy_ratio: expected a number"):
            recipe_from_dict({"method": {"peft_type": "TOY_TEST", "toy_ratio": "big"}})
    finally:
        REGISTRY.unregister("TOY_TEST")


def test_output_dir_uses_the_recipe_name():
    recipe = recipe_from_dict(MINIMAL, name="my-run")
    assert str(recipe.output_dir) == "runs/my-run"
    assert re.search(r"dir: runs/\{name\}", recipe.to_yaml())


def test_a_loaded_recipe_knows_the_command_line_that_rebuilds_it(tmp_path):
    """Suggested commands (resume after Ctrl-C, the estimate's advice) repeat the recipe as given, path or name,
    and its overrides, quoted for a shell; the run folder's name alone pointed at another recipe."""
    path = tmp_path / "my run.yaml"
    path.write_text("method: {peft_type: LORA}\n")
    recipe = load_recipe(path, ["training.max_steps=3", "output.dir=runs/a b"])
    assert recipe.command_line("--resume") == f"'{path}' training.max_steps=3 'output.dir=runs/a b' --resume"
    assert load_recipe("lora-smollm2-pycode").command_line() == "lora-smollm2-pycode"
    assert recipe_from_dict({"method": {"peft_type": "LORA"}}).command_line("--resume") == "<recipe> --resume"
    assert recipe == recipe_from_dict(recipe.to_dict(), name=recipe.name)  # the command is not part of the recipe


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("method: {peft_type: LORA}\ntraining:\n  batch_size: 4\n  learning_rate: 1.0e-4\n"
                    "training:\n  max_steps: 2\n")
    with pytest.raises(RecipeError, match=r"the key 'training' appears twice in one mapping \(lines 2 and 5\)"):
        load_recipe(path)
    path.write_text("method: {peft_type: LORA, r: 4, r: 8}\n")
    with pytest.raises(RecipeError, match=r"the key 'r' appears twice"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"the key 'r' appears twice"):
        load_recipe("lora-smollm2-pycode", ["method={peft_type: LORA, r: 4, r: 8}"])
    path.write_text("description: x\nmethod:\n  <<: &m {peft_type: LORA, r: 4}\n  r: 8\n")
    assert load_recipe(path).method.r == 8  # a YAML merge may still be overridden


def test_yaml_booleans_read_as_the_words_they_were(tmp_path):
    """YAML 1.1 reads an unquoted `no` as false: `mixed_precision: no` (the documented value) means "no"."""
    path = tmp_path / "r.yaml"
    path.write_text("method: {peft_type: LORA}\ntraining: {mixed_precision: no}\n")
    assert load_recipe(path).training.mixed_precision == "no"
    assert load_recipe(path, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    assert load_recipe(path, ["training.mixed_precision=auto"]).training.mixed_precision == "auto"


def test_environment_variables_in_paths_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNS_ROOT", str(tmp_path / "runs"))
    recipe = recipe_from_dict({**MINIMAL, "output": {"dir": "$RUNS_ROOT/{name}"},
                               "data": {"dataset": "${RUNS_ROOT}/train.jsonl"}}, name="try")
    assert recipe.output_dir == tmp_path / "runs" / "try"
    assert recipe.data.dataset == f"{tmp_path}/runs/train.jsonl"
    assert recipe_from_dict(recipe.to_dict(), name="try") == recipe  # the saved recipe holds the resolved paths


@pytest.mark.parametrize("value, message", [("010", r"'010' reads as the YAML 1\.1 octal number 8"),
                                            ("1:30", r"'1:30' reads as the YAML 1\.1 base-60 number 90")])
def test_yaml_11_number_forms_are_refused_not_misread(tmp_path, value, message):
    path = tmp_path / "r.yaml"
    path.write_text(f"method: {{peft_type: LORA, r: {value}}}\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)
    with pytest.raises(RecipeError, match=message):
        load_recipe("lora-smollm2-pycode", [f"method.r={value}"])
    path.write_text("method: {peft_type: LORA, r: 10}\ntraining: {learning_rate: 0.0001, max_steps: 1_000}\n")
    assert load_recipe(path).training.max_steps == 1000


def test_nested_aliases_that_expand_past_any_recipe_are_refused_at_once(tmp_path):
    """A few hundred bytes of nested YAML aliases ("billion laughs") expand to 9⁹ values: writing the recipe out
    (recipe.yaml, the resume comparison) would run for hours; it is refused when read, in the file or an override."""
    levels = "\n".join(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10))
    path = tmp_path / "bomb.yaml"
    path.write_text(f"method: {{peft_type: LORA}}\nmodel:\n  init: random\n  config_overrides:\n    l0: &l0 [x]\n"
                    f"{levels}\n")
    assert len(path.read_text()) < 1000
    with pytest.raises(RecipeError, match=r"bomb.yaml is not valid YAML: its aliases expand to [\d,]+ values"):
        load_recipe(path)
    small = "{a: &a [1, 2], b: [*a, *a]}"  # ordinary anchors stay fine
    recipe = load_recipe("lora-smollm2-pycode", ["model.init=random", f"model.config_overrides={small}"])
    assert recipe.model.config_overrides == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    override = "{l0: &l0 [x], " + ", ".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
                                           for i in range(1, 8)) + "}"
    with pytest.raises(RecipeError, match="the value is not valid YAML .*aliases expand"):
        load_recipe("lora-smollm2-pycode", [f"model.config_overrides={override}"])
