"""`slimtune train`'s stages that are not the trainer: the memory check before anything loads,
random-weight models (`model.init: random`) for timing real shapes without their weights, and
architectures whose loading or layers differ from Llama's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import tiny_model_dir, tiny_recipe, write_recipe
from train_helpers import make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune.cli import main
from slimtune.estimate.fit import DoesNotFitError
from slimtune.perf.compilation import cpu_compiler
from slimtune.quant import Linear4bit
from slimtune.train import runner
from slimtune.train.recipe import RecipeError, recipe_from_dict


def _config_only(tmp_path):
    """A model folder with config.json and the tokenizer but no weights."""
    folder = tmp_path / "shapes"
    shutil.copytree(tiny_model_dir(), folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    return folder


def test_random_init_trains_the_shapes_of_a_config_without_weights(tmp_path, capsys):
    folder = _config_only(tmp_path)
    recipe = tiny_recipe(tmp_path, model={"name_or_path": str(folder), "init": "random",
                                          "config_overrides": {"num_hidden_layers": 1}},
                         training={"max_steps": 2, "save_every": 0}, demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "random weights in the shapes of" in out
    assert f"tokenizer: '{folder}'" in out  # the folder's own tokenizer, not the default model's
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    built = recipe_from_dict(recipe)
    model, _ = runner.load_model(built, runner._device(built), lambda _: None)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)  # quantized as it was made
    weight = model.model.embed_tokens.weight
    assert 0.01 < float(weight.std()) < 0.03  # N(0, initializer_range²), not the checkpoint's (there is none)


def test_random_init_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="config_overrides only apply to init: random"):
        recipe_from_dict(tiny_recipe(tmp_path, model={"config_overrides": {"num_hidden_layers": 1}}))
    folder = _config_only(tmp_path)
    bad = recipe_from_dict(tiny_recipe(tmp_path, model={"name_or_path": str(folder), "init": "random",
                                                        "config_overrides": {"no_such_field": 1}}))
    with pytest.raises(RecipeError, match="model.config_overrides.no_such_field"):
        runner.load_model(bad, runner._device(bad), lambda _: None)


def test_a_run_predicted_not_to_fit_stops_before_loading_unless_forced(tmp_path, monkeypatch, capsys):
    estimate = object()

    def does_not_fit(recipe, device=None, margin=0.1, ranks=1, per_machine=None):
        raise DoesNotFitError("recipe 'r' needs about 9.0 GiB on cpu, which has 1.0 GiB free", estimate)

    monkeypatch.setattr(runner, "check_fits", does_not_fit)
    loaded = []

    class Loading(Exception):
        pass

    def load_data(recipe):
        loaded.append(recipe)
        raise Loading

    monkeypatch.setattr(runner, "load_data", load_data)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, training={"max_steps": 1}))
    assert main(["train", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs about 9.0 GiB" in err and "--force" in err
    assert not loaded and not (tmp_path / "run").exists()
    with pytest.raises(Loading):  # --force goes on to the next stage (here: the patched data stage)
        main(["train", str(recipe), "--no-progress", "--force"])
    assert loaded
    assert "Running anyway (--force)" in capsys.readouterr().out


def test_an_estimate_that_cannot_be_made_does_not_block_the_run(tmp_path, monkeypatch):
    def unknown(recipe, device=None, margin=0.1, ranks=1, per_machine=None):
        raise ValueError("model 'x/y': not in slimtune's table")

    monkeypatch.setattr(runner, "check_fits", unknown)
    notes = []
    runner.check_memory(recipe_from_dict(tiny_recipe(tmp_path)), force=False, log=notes.append)
    assert notes == ["memory estimate skipped (ValueError: model 'x/y': not in slimtune's table)"]


ARCHITECTURES = {
    # Falcon adds into its projections' outputs in place (the fused LoRA node must not return a view)
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    # GPT-NeoX's checkpoint names its head embed_out; transformers 5 calls it lm_head
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    # a mixture of experts stored expert by expert, merged by transformers 5 while loading
    "qwen3_moe": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_slimtune_train_qlora_then_generate_on_other_architectures(model_type, tmp_path, capsys):
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **ARCHITECTURES[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = tiny_recipe(tmp_path, model={"name_or_path": str(tmp_path / "model")},
                         training={"max_steps": 4, "save_every": 0}, demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_loss_after"] < summary["eval_loss_before"]
    out = capsys.readouterr().out
    assert "fused LoRA on" in out and "fused LoRA on 0 layers" not in out
    assert "loss: chunked cross-entropy" in out
    assert main(["generate", "--adapter", str(tmp_path / "run" / "adapter"), "-p", "Repeat kilo9 twice.",
                 "--max-new-tokens", "3"]) == 0


def test_the_run_says_which_loss_it_uses_and_why(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, quantized=False, training={"max_steps": 1, "save_every": 0, "loss": "full"},
                         demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    assert "loss: the model's own (full logits): training.loss: full" in capsys.readouterr().out


def test_slimtune_train_on_plain_text_learns_it_and_continues_it_without_a_template(tmp_path, monkeypatch, capsys):
    from run_helpers import WORDS

    lines = [" ".join(WORDS[i % 7:] + WORDS[:i % 7]) for i in range(40)]  # rotations of one word sequence
    (tmp_path / "train.txt").write_text("\n".join(lines[:32]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(lines[32:]) + "\n")
    recipe = tiny_recipe(tmp_path, quantized=False, data={"dataset": str(tmp_path / "train.txt"),
                                                          "eval_dataset": str(tmp_path / "eval.txt")},
                         training={"max_steps": 6, "save_every": 0})
    calls = []
    real = runner.generate_text
    monkeypatch.setattr(runner, "generate_text", lambda *a, **k: calls.append((a[2], k.get("raw"))) or real(*a, **k))
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # The sample is the opening of the first evaluation text, continued as is (before and after training).
    opening = calls[0][0]
    assert calls == [(opening, True)] * 2 and lines[32].startswith(opening + " ")
    assert f"── sample prompt ──\n{opening}\n" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(tmp_path / "run" / "adapter"), "-p", opening, "--raw",
                 "--max-new-tokens", "3"]) == 0


def test_rows_longer_than_the_models_positions_are_refused_before_the_run_folder(tmp_path, monkeypatch, capsys):
    seen = []

    def limit(config):
        seen.append(type(config).__name__)
        return 16

    monkeypatch.setattr(runner, "position_limit", limit)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, quantized=False))
    assert main(["train", str(recipe), "--no-progress"]) == 2
    assert re.search(r"data.max_seq_length: rows of up to \d+ tokens \(max_seq_length=48\) are longer than the "
                     r"model's 16 positions; set data.max_seq_length: 16", capsys.readouterr().err)
    assert seen == ["LlamaConfig"] and not (tmp_path / "run").exists()


def test_a_prompt_adapters_virtual_tokens_count_against_the_models_positions(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "position_limit", lambda config: 16)
    base = tiny_recipe(tmp_path, quantized=False, training={"max_steps": 1, "save_every": 0}, demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", base)), "--no-progress"]) == 2
    longest = int(re.search(r"rows of up to (\d+) tokens", capsys.readouterr().err).group(1))
    monkeypatch.setattr(runner, "position_limit", lambda config: longest + 4)  # the rows fit, with 8 more they do not
    prompt = {**base, "method": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}}
    assert main(["train", str(write_recipe(tmp_path / "p.yaml", prompt)), "--no-progress"]) == 2
    assert (f"are longer than the model's {longest + 4} positions less the 8 its prompt-learning adapter puts first "
            f"({longest - 4} left); set data.max_seq_length: {longest - 4}.") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", base)), "--no-progress"]) == 0  # LoRA: no virtual


def test_the_log_says_how_many_evaluation_examples_were_cut_or_left_out(tmp_path, capsys):
    from run_helpers import rows, write_jsonl

    long = " ".join(["word"] * 60)
    evals = write_jsonl(tmp_path / "long_eval.jsonl", [*rows(3), {"prompt": long, "response": "a"},
                                                       {"prompt": "Say it.", "response": long}])
    recipe = tiny_recipe(tmp_path, quantized=False, data={"eval_dataset": str(evals)},
                         training={"max_steps": 1, "save_every": 0}, demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    assert "; 4 evaluation rows (1 truncated, 1 dropped)" in capsys.readouterr().out


@pytest.mark.parametrize("resume", [False, True])
def test_another_ranks_write_probe_is_no_part_of_the_run_folder(tmp_path, monkeypatch, resume):
    """Every rank of a distributed run checks that the run folder is writable by making an empty folder in it for a
    moment: a rank validating the folder meanwhile neither refuses it for that entry nor deletes it."""
    recipe = recipe_from_dict(tiny_recipe(tmp_path, quantized=False))
    recipe.output_dir.mkdir()  # an empty folder: a new run (or a resume that starts over)
    original, outcomes = runner.tempfile.TemporaryDirectory, []

    def probe(*args, **kwargs):
        made = original(*args, **kwargs)
        if not outcomes:  # (the other rank's own probe does not start a third)
            outcomes.append("checking")
            outcomes.append(runner.validate(recipe, resume))  # the other rank, while this probe exists
            runner.RunFolder(recipe.output_dir).clear()
            assert Path(made.name).is_dir()
        return made

    monkeypatch.setattr(runner.tempfile, "TemporaryDirectory", probe)
    assert runner.validate(recipe, resume) is None
    assert outcomes == ["checking", None] and list(recipe.output_dir.iterdir()) == []


@pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile's CPU code needs a C++ compiler")
@pytest.mark.parametrize("quantized", [False, True])
def test_training_compile_trains_as_the_eager_run(tmp_path, capsys, quantized):
    """training.compile: true compiles each block (seconds: one graph for all) and trains to the eager run's losses,
    dropout masks included; with a 4-bit base too (without dropout: its decode is then compiled into the blocks)."""
    losses = {}
    for compiled in (False, True):
        folder = tmp_path / str(compiled)
        folder.mkdir()
        recipe = tiny_recipe(folder, quantized=quantized, training={"max_steps": 2, "gradient_accumulation_steps": 1,
                                                                  "save_every": 0, "compile": compiled,
                                                                  "warmup_steps": 0},  # step 2 sees step 1's grads
                             demo={"enabled": False},
                             method={"lora_dropout": 0.0 if quantized else 0.1})
        assert main(["train", str(write_recipe(folder / "r.yaml", recipe)), "--no-progress"]) == 0
        assert ("torch.compile on 2 blocks" in capsys.readouterr().out) is compiled
        rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [row[key] for row in rows for key in ("loss", "eval_loss") if key in row]
    assert len(losses[True]) >= 4
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)


def test_training_compile_is_refused_in_a_run_torchrun_started(tmp_path, monkeypatch):
    """A recipe without a distributed section still runs distributed under torchrun (or --nproc-per-node): the
    recipe check could not see it, so the run compiled blocks under DDP/FSDP."""
    recipe = recipe_from_dict(tiny_recipe(tmp_path, quantized=False, training={"compile": True}))
    model, _ = runner.load_model(recipe, runner._device(recipe), lambda _: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(RecipeError, match=r"^training\.compile: true in a distributed run .* drop training\.compile"):
        runner.add_method(model, recipe)
