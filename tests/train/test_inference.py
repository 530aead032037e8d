"""Loading a base model with adapters for generate/eval/merge: the fast-path switch reaches the model."""

from __future__ import annotations

import pytest
from run_helpers import tiny_model_dir

from slimtune.cli import main
from slimtune.perf.fast_path import FastPath
from slimtune.train import inference


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_kernels_option_reaches_the_fast_path(mode, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(inference, "enable_fast_path", lambda model, kernels: seen.append(kernels) or
                        FastPath(kernels, False, 0))
    assert main(["generate", "--model", str(tiny_model_dir()), "--device", "cpu", "--kernels", mode,
                 "--max-new-tokens", "2", "-p", "hi"]) == 0
    assert seen == [mode]
    assert f"kernels={mode}" in capsys.readouterr().err


def test_a_bad_kernel_mode_is_refused_before_loading():
    with pytest.raises(ValueError, match="kernels='fast' is not a kernel mode"):
        inference.load_with_adapters(str(tiny_model_dir()), [], kernels="fast")


def test_the_base_model_an_adapter_names_is_used_or_its_absence_said(tmp_path, capsys):
    import json

    from slimtune.train.models import default_model_folder_name

    folder = tmp_path / "adapter"
    folder.mkdir()

    def naming(base):
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
             "base_model_name_or_path": base}))
        return folder

    assert inference.base_model_of(naming(str(tiny_model_dir()))) == str(tiny_model_dir())
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert inference.base_model_of(naming(hub_id)) == hub_id
    assert inference.base_model_of(naming(None)) == "default"
    # The default model converted in another machine's cache is the default model here too.
    assert inference.base_model_of(naming(f"/elsewhere/.cache/slimtune/models/{default_model_folder_name()}")) == \
        "default"
    # A folder that is gone is not silently replaced by another model.
    with pytest.raises(FileNotFoundError, match=r"trained on '/moved/model' .* not on this machine; pass .* --model"):
        inference.base_model_of(naming("/moved/model"))
    assert main(["eval", "--adapter", str(folder), "--max-examples", "1"]) == 2
    assert "trained on '/moved/model'" in capsys.readouterr().err
