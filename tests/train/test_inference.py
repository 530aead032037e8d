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
