"""`slimtune` end to end on a tiny offline model: train, generate, eval, merge; and clear user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import utils as hub_utils
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).parent / "train"))  # the tiny model and recipe helpers live there
from run_helpers import tiny_recipe, write_recipe  # noqa: E402

from slimtune.cli import main  # noqa: E402
from slimtune.train import generation  # noqa: E402
from slimtune.train.data import load_examples, split_examples  # noqa: E402


def test_train_generate_eval_merge(capsys, tmp_path, monkeypatch):
    # train: a QLoRA run of the tiny recipe, with the demo's generations before and after. The
    # layers are named rather than "all-linear" (the same set): a second "all-linear" adapter
    # would also wrap the first one's lora_A/lora_B (reported to the lead).
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path, method={"target_modules": linear}))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "── base model ──" in out and "── after fine-tuning ──" in out and "── summary" in out
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "checkpoints", "loss.png", "metrics.jsonl", "recipe.yaml", "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"] and summary["steps"] == 8
    adapter = run / "adapter"

    # generate: base + adapter, the run's 4-bit base rebuilt from its recipe; two named adapters
    assert main(["generate", "--adapter", str(adapter), "-p", "Repeat kilo9 twice.", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "quantized 14 linear layers" in captured.err and captured.out.strip()
    assert main(["generate", "--adapter", f"a={adapter}", "--adapter", f"b={adapter}", "--active", "a,b",
                 "-p", "hi", "--max-new-tokens", "3"]) == 0
    assert main(["generate", "--adapter", str(adapter), "--active", "zzz", "-p", "hi"]) == 2
    assert "--active ['zzz'] is not a loaded adapter" in capsys.readouterr().err

    # eval: loss and perplexity on a dataset
    assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "eval.jsonl"), "--split", "all"]) == 0
    line = capsys.readouterr().out
    assert f"eval loss {summary['eval_loss_after']:.4f}" in line and "perplexity" in line
    assert "cut at" not in line
    two = ["eval", "--adapter", f"a={adapter}", "--adapter", f"b={adapter}", "--data", str(tmp_path / "eval.jsonl"),
           "--split", "all"]
    assert main(two) == 0  # the first alone, as it says
    captured = capsys.readouterr()
    assert captured.out == line and "adapters ['a', 'b']: active ['a'] (--active" in captured.err
    assert main([*two, "--active", "a,b"]) == 0  # both: the update counted twice scores otherwise
    assert "eval loss" in (both := capsys.readouterr().out) and both != line
    assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "eval.jsonl"), "--split", "all",
                 "--max-seq-length", "28"]) == 0  # the rows' prompts are 26 to 29 tokens
    assert "left out by --max-seq-length 28" in capsys.readouterr().out
    # rows longer than the model's positions are cut there (an absolute position table would fail past it)
    with monkeypatch.context() as patch:
        patch.setattr(generation, "position_limit", lambda config: 28)
        assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "eval.jsonl"), "--split", "all",
                     "--max-seq-length", "512"]) == 0
        captured = capsys.readouterr()
        assert "--max-seq-length 512 is beyond the model's 28 positions: rows are cut at 28" in captured.err
        assert "left out by --max-seq-length 28" in captured.out
        assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "eval.jsonl"), "--split", "all"]) == 0
        captured = capsys.readouterr()  # the run's own max_seq_length (48), cut at 28 without a word about a flag
        assert "beyond" not in captured.err and "left out by --max-seq-length 28" in captured.out
    # a file's validation split is the training run's: --validation-fraction is data.validation_fraction
    for share in (0.3, 0.7):
        assert main(["eval", "--adapter", str(adapter), "--data", str(tmp_path / "eval.jsonl"),
                     "--validation-fraction", str(share)]) == 0
        held_out = split_examples(load_examples(tmp_path / "eval.jsonl"), "validation", validation_fraction=share)
        assert f"| {len(held_out)} examples," in capsys.readouterr().out

    # merge: a plain transformers folder with the logits of 4-bit base + adapter
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune.train.inference import load_with_adapters

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert AutoTokenizer.from_pretrained(merged).eos_token == "<|im_end|>"
    model, _ = load_with_adapters(None, [("default", adapter)], log=lambda m: None)
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err


def test_recipes_command_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "qlora-smollm2-pycode" in out and "run: slimtune train lora-smollm2-pycode" in out


def test_dry_run_and_default_recipe(capsys, tmp_path, monkeypatch):
    assert main(["train", "--dry-run", "training.max_steps=3"]) == 0  # the default recipe, overridden
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "quant_type: nf4" in out
    assert "the recipe is valid" in out and "trainable parameters" in out and "peak while training" in out
    # The checks a run would meet first, made without loading anything (each a clear error, status 2).
    (tmp_path / "a-file").write_text("x")
    for override, message in [("method.target_modules=[nope]", "method: target_modules=['nope'] matched no module"),
                              (f"model.name_or_path={tmp_path / 'nowhere'}", "model.name_or_path: "),
                              (f"output.dir={tmp_path / 'a-file'}", "output.dir"),
                              (f"data.dataset={tmp_path / 'none.jsonl'}", "data.dataset: "),
                              *([] if torch.cuda.is_available() else
                                [("model.device=cuda:0", "model.device: device='cuda:0' asked for, but no CUDA GPU")])]:
        assert main(["train", "--dry-run", "training.max_steps=3", override]) == 2, override
        assert message in capsys.readouterr().err, override

    from slimtune.train import dry_run  # the tests run Triton's interpreter on the CPU; a user's CPU has no Triton

    monkeypatch.setattr(dry_run, "triton_status", lambda device: "no CUDA device")
    assert main(["train", "--dry-run", "training.kernels=triton"]) == 2  # refused before any load
    assert "training.kernels: kernels='triton' but the Triton kernels cannot run on cpu: no CUDA device" in \
        capsys.readouterr().err


def test_dry_run_estimates_each_rank_and_counts_as_train_does(capsys):
    """--nproc-per-node reaches the dry run's estimate (it was ignored); the trainable share is of the model with
    its adapter, as `slimtune train` and the README print it (4,884,480 of 139,399,488 = 3.504%)."""
    assert main(["train", "lora-smollm2-pycode", "--dry-run", "--nproc-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "4,884,480 trainable parameters (3.504%)" in out
    assert re.search(r"over 2 ranks", out), out[-2000:]


def _bad(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing data", "empty data", "row without fields", "unknown model",
                                  "unwritable output", "unknown key", "method fits no module"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    override, expected = {
        "missing data": ("data.dataset=" + str(tmp_path / "nope.jsonl"), r"nope.jsonl' does not exist"),
        "empty data": ("data.dataset=" + _bad(tmp_path, "empty.jsonl", "\n"), "the file is empty; it needs rows"),
        "row without fields": ("data.dataset=" + _bad(tmp_path, "bad.jsonl", '{"prompt": "a", "response": "b"}\n'
                                                      '{"question": "c"}\n'), r"bad.jsonl: line 2: row has no"),
        "unknown model": ("model.name_or_path=" + str(tmp_path / "no-model"), r"no-model' does not exist"),
        "unwritable output": ("output.dir=" + _bad(tmp_path, "a-file", "x") + "/run", "is a file, not a folder"),
        "unknown key": ("training.max_step=3", r"training.max_step: unknown key. Did you mean 'max_steps'"),
        "method fits no module": ("method.target_modules=[nothing_here]", "nothing_here"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    hf_logging.enable_progress_bar()
    hub_utils.disable_progress_bars()  # the caller's own choice for huggingface_hub's bars
    assert main(["train", str(recipe_file), override, "--no-progress"]) == 2
    assert hf_logging.is_progress_bar_enabled()  # main() quiets transformers while it runs, not after
    assert hub_utils.are_progress_bars_disabled()
    hub_utils.enable_progress_bars()
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["r.yaml"])  # no run folder


def test_console_script_in_a_subprocess(tmp_path):
    """The entry point in a process of its own: a short real run."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tmp_path, quantized=False, demo={"enabled": False}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "slimtune.cli", "train", str(recipe), "training.max_steps=2", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "eval loss        :" in done.stdout and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["eval", "--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    (["eval", "--validation-fraction", "1"], "argument --validation-fraction: 1.0 must be between 0 and 1"),
    (["eval", "--batch-size", "-1"], "argument --batch-size: -1 must be at least 1"),
    (["eval", "--max-seq-length", "x"], "argument --max-seq-length: 'x' is not a whole number"),
    (["generate", "-p", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be at least 1"),
    (["generate", "-p", "hi", "--temperature", "nan"], "argument --temperature: nan must be a finite number ≥ 0"),
    (["train", "--nproc-per-node", "0"], "argument --nproc-per-node: 0 must be at least 1"),
])
def test_numeric_options_are_checked_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "estimate"])
def test_a_recipe_after_its_overrides_is_told_to_go_first(command, tmp_path, capsys):
    recipe_file = write_recipe(tmp_path / "my.yaml", tiny_recipe(tmp_path))
    assert main([command, "training.max_steps=1", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert f"'{recipe_file}' is not a key=value override; name the recipe first" in err
    assert f"slimtune {command} {recipe_file} training.max_steps=1" in err


def test_eval_and_generate_read_the_data_as_the_adapters_training_run_did(capsys, tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, quantized=False, data={"use_chat_template": False, "max_seq_length": 30},
                         training={"max_steps": 2, "save_every": 0}, demo={"enabled": False})
    assert main(["train", str(write_recipe(tmp_path / "r.yaml", recipe)), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    adapter = str(tmp_path / "run" / "adapter")
    capsys.readouterr()
    assert main(["eval", "--adapter", adapter, "--data", str(tmp_path / "eval.jsonl"), "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert f"eval loss {summary['eval_loss_after']:.4f}" in out  # the run's template and row length: its loss
    assert "by --max-seq-length 30" in out
    assert main(["eval", "--adapter", adapter, "--data", str(tmp_path / "eval.jsonl"), "--split", "all",
                 "--max-seq-length", "512"]) == 0
    assert "left out" not in capsys.readouterr().out  # 30 tokens left some out above; 512 does not
    seen = []
    monkeypatch.setattr(generation, "generate_text", lambda *args, **kwargs: seen.append(args[4]))
    assert main(["generate", "--adapter", adapter, "-p", "hi"]) == 0
    assert seen == [False]  # the plain template the run trained with, not the tokenizer's chat template


def test_pickle_adapters_need_the_clis_own_opt_in_and_errors_name_the_file_read(capsys, tmp_path):
    from run_helpers import tiny_model_dir
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import slimtune

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    folder = slimtune.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    command = ["generate", "--adapter", str(folder), "-p", "hi", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(command) == 2
    assert "(the CLI: --allow-pickle) if you trust its source" in capsys.readouterr().err
    assert main([*command, "--allow-pickle"]) == 0
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    torch.save(tensors, folder / "adapter_model.bin")
    assert main([*command, "--allow-pickle"]) == 2
    assert f"{folder / 'adapter_model.bin'}: " in capsys.readouterr().err  # the file read, not a .safetensors one
    (folder / "adapter_model.safetensors").mkdir()
    assert main(command) == 2
    assert "adapter_model.safetensors: is not a file (a folder?)" in capsys.readouterr().err
