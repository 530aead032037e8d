"""Advice, check_fits and `slimtune estimate`: the changes it proposes really fit, the JSON keeps its schema,
and wrong input is a clear error."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import TEST_CPU, GiB, make_recipe

from slimtune.cli import main
from slimtune.estimate import DoesNotFitError, check_fits, estimate, parse_memory, predict, recipe_with


def test_advice_makes_it_fit(tiny_folder):
    recipe = make_recipe(tiny_folder, data={"max_seq_length": 256}, training={"loss": "full", "batch_size": 4})
    full = predict(recipe, TEST_CPU, timing=False)
    overhead = full.memory.component("overhead")
    limit = overhead + (full.peak - overhead) * 0.6  # the run needs more than the device has
    est = estimate(recipe, TEST_CPU, memory=int(limit))
    assert not est.fits and est.advice
    fitting = [a for a in est.advice if a.fits]
    assert fitting, [a.label for a in est.advice]
    assert all(a.peak < est.peak for a in est.advice)
    for advice in fitting:  # each change, applied to the recipe, gives the peak it promised, within the limit
        changed = predict(recipe_with(recipe, advice.overrides), TEST_CPU.with_memory(int(limit)), timing=False)
        assert changed.peak == advice.peak and changed.fits
    # same training first: data truncation (shorter rows) never ranks above a change that keeps the rows
    kinds = [a.kind for a in fitting]
    assert kinds == sorted(kinds)


def test_check_fits_raises_with_the_advice(tiny_folder):
    recipe = make_recipe(tiny_folder, data={"max_seq_length": 256}, training={"loss": "full", "eval_batch_size": 1})
    device = replace(TEST_CPU, context=2**20)  # a small process, so the step's own memory decides
    peak = check_fits(recipe, device).peak
    with pytest.raises(DoesNotFitError) as info:
        check_fits(recipe, device.with_memory(int(peak * 0.75)))
    message = str(info.value)
    assert "needs about" in message and "test-cpu" in message and "Changes that make it fit" in message
    assert info.value.estimate.advice and info.value.estimate.peak == peak
    assert "model.gradient_checkpointing=true" in message  # the fitting changes, as overrides to paste
    small = check_fits(recipe, device.with_memory(int(peak / 1.05)))  # over, but within the 10% margin
    assert not small.fits
    evaluating = make_recipe(tiny_folder, data={"max_seq_length": 256}, training={"loss": "full",
                                                                                   "eval_batch_size": 16})
    with pytest.raises(DoesNotFitError, match=r"\(training.eval_batch_size=1\)"):  # its evaluation sets the peak
        check_fits(evaluating, device.with_memory(int(peak * 1.2)))


def test_gpu_profile_estimate_and_h200_llama_8b():
    from slimtune.train.recipe import load_recipe

    recipe = load_recipe("qlora-smollm2-pycode", ["model.name_or_path=meta-llama/Llama-3.1-8B",
                                                  "data.max_seq_length=2048", "model.gradient_checkpointing=true"])
    est = estimate(recipe, "h200")
    assert est.fits and est.time is not None and est.precision.autocast and est.precision.fused
    assert est.shape.params == 8_030_261_248
    assert 7 * GiB < est.peak < 20 * GiB
    weights = est.memory.component("weights")
    assert 3.2 * GiB < weights < 3.5 * GiB  # 6.98 B weights at 4.127 bits


def _cli_json(capsys, argv: list[str]) -> tuple[int, dict]:
    status = main(argv)
    return status, json.loads(capsys.readouterr().out)


def test_json_output_schema(capsys, tiny_folder):
    status, out = _cli_json(capsys, ["estimate", "qlora-smollm2-pycode", f"model.name_or_path={tiny_folder}",
                                     "--device", "h200", "--json"])
    assert status == 0
    assert out["schema"] == 1 and out["recipe"] == "qlora-smollm2-pycode"
    assert set(out) == {"schema", "recipe", "model", "method", "device", "memory", "time", "advice", "distribution"}
    assert out["distribution"] is None  # one process
    assert out["model"]["params"] > 0 and out["method"]["trainable_params"] > 0
    memory = out["memory"]
    keys = {"components", "train_peak_bytes", "load_peak_bytes", "peak_bytes", "host_bytes", "fits", "notes"}
    assert keys <= set(memory)
    for c in memory["components"]:
        assert set(c) == {"key", "label", "bytes", "why", "on_device"} and isinstance(c["bytes"], int) and c["why"]
    assert sum(c["bytes"] for c in memory["components"] if c["on_device"]) == memory["train_peak_bytes"]
    assert memory["peak_bytes"] == max(memory["train_peak_bytes"], memory["load_peak_bytes"])
    time = out["time"]
    assert time["step_seconds"] > 0 and time["tokens_per_second"] > 0 and time["total_steps"] == 48
    assert time["run_seconds"] >= 48 * time["step_seconds"]
    assert out["advice"] == []


def test_does_not_fit_exit_status_and_advice_in_json(capsys, tiny_folder):
    status, out = _cli_json(capsys, ["estimate", "lora-smollm2-pycode", f"model.name_or_path={tiny_folder}",
                                     "--device", "h200", "--memory", "620MiB", "--json"])
    assert status == 1 and not out["memory"]["fits"]
    assert out["advice"] and all({"label", "overrides", "peak_bytes", "needed_bytes", "fits", "step_seconds"} == set(a)
                                 for a in out["advice"])


def test_suggested_commands_keep_the_recipe_as_given_and_its_overrides(capsys, tiny_folder, tmp_path):
    """Each advice line is a command that trains what was estimated: the recipe path as typed and every override
    before the suggested change (before, `slimtune train <file stem> <change>` trained another model)."""
    recipe = tmp_path / "my recipe.yaml"
    recipe.write_text("method: {peft_type: LORA, target_modules: all-linear}\n")
    given = [f"model.name_or_path={tiny_folder}", "data.max_seq_length=64"]
    assert main(["estimate", str(recipe), *given, "--device", "h200", "--memory", "400MiB"]) == 1
    advice = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("slimtune ")]
    assert advice and all(line.startswith(f"slimtune train '{recipe}' {' '.join(given)} ") for line in advice)


def test_text_table(capsys, tiny_folder):
    assert main(["estimate", f"model.name_or_path={tiny_folder}", "--device", "rtx4090"]) == 0
    text = capsys.readouterr().out
    for words in ("component", "weights, 4-bit", "adapter parameters", "optimizer states", "activations",
                  "peak while training", "fits in", "tokens/s", "run "):
        assert words in text, words


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu9"], "--device 'tpu9' is not a device; use cpu, cuda, cuda:N or one of h200"),
    (["--device", "h200", "--memory", "lots"], "--memory 'lots' is not a memory size"),
    (["--device", "h200", "--memory", "24XB"], "--memory '24XB' is not a memory size"),
    (["model.name_or_path=acme/NotAModel-7B", "--device", "h200"],
     "model 'acme/NotAModel-7B': no local folder with config.json"),
    (["model.name_or_path=./no/such/folder"], "model path './no/such/folder' does not exist"),
    (["model.name_or_path=/no/such/folder"], "model path '/no/such/folder' does not exist"),
])
def test_clear_errors(argv, message, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "NotAModel" in message:
        assert "meta-llama/Llama-3.1-8B" in err and "Qwen/Qwen2.5-7B" in err and "config.json" in err


@pytest.mark.parametrize("text, expected", [("24GB", 24 * GiB), ("24 GiB", 24 * GiB), ("1.5T", int(1.5 * 2**40)),
                                            ("512MB", 512 * 2**20), ("80g", 80 * GiB), ("1000B", 1000)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-3GB", "0GB", "1.5", "ten GB", "12"])
def test_parse_memory_refuses(text):
    with pytest.raises(ValueError, match="is not a memory size|more than zero|'12' has no unit; write e.g. 12GB"):
        parse_memory(text)


def test_a_cpu_profile_scales_the_measured_rates_by_the_fitted_training_shares(monkeypatch):
    """The calibration times one large matmul, copy and decode at their best; a training step reaches only the
    fitted shares of those rates, so the profile the estimate uses is slower than the calibration."""
    from slimtune.estimate import devices

    measured = devices.CpuCalibration(matmul_flops=100e9, bandwidth=20e9, dequant_bandwidth=40e9, op_overhead=1e-5)
    monkeypatch.setattr(devices, "cpu_calibration", lambda: measured)
    cpu = devices.device_profile("cpu", measure_baseline=False)
    compute, decode = devices.CPU_COMPUTE_EFFICIENCY, devices.CPU_DECODE_EFFICIENCY
    assert 0 < compute < 1 and 0 < decode < 1
    assert cpu.matmul_flops == pytest.approx(100e9 * compute)
    assert cpu.bandwidth == pytest.approx(20e9 * compute)
    assert cpu.dequant_bandwidth == pytest.approx(40e9 * decode)
    assert cpu.op_overhead == pytest.approx(1e-5 / compute)


def test_a_random_model_is_estimated_in_its_overridden_shapes(tiny_folder):
    """``model.init: random`` with ``config_overrides`` trains those shapes, so the estimate sizes them."""
    whole = predict(make_recipe(tiny_folder), TEST_CPU, timing=False)
    smaller = predict(make_recipe(tiny_folder, model={"init": "random", "config_overrides": {"num_hidden_layers": 1,
                                                                                             "hidden_size": 32}}),
                      TEST_CPU, timing=False)
    assert (whole.shape.layers, smaller.shape.layers, smaller.shape.hidden) == (3, 1, 32)
    assert smaller.peak < whole.peak
    with pytest.raises(ValueError, match="config_overrides.no_such_field"):
        predict(make_recipe(tiny_folder, model={"init": "random", "config_overrides": {"no_such_field": 1}}), TEST_CPU)
    for bad in ({"num_hidden_layers": "two"}, {"num_hidden_layers": 2.5}, {"tie_word_embeddings": "yes"}):
        with pytest.raises(ValueError, match=rf"model.config_overrides.{next(iter(bad))}: .* is not valid for "):
            predict(make_recipe(tiny_folder, model={"init": "random", "config_overrides": bad}), TEST_CPU)
