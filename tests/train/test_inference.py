"""Loading a base model with adapters for generate/eval/merge: the fast-path switch reaches the model."""

from __future__ import annotations

import pytest
import torch
from run_helpers import tiny_model_dir
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import slimtune
from slimtune.cli import main
from slimtune.perf.fast_path import FastPath
from slimtune.quant import Linear4bit, Linear8bit
from slimtune.train import inference
from slimtune.train.run_folder import RunFolder


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


def _t5_with_adapter(tmp_path, config):
    """A tiny T5 folder (with the tests' tokenizer) and an adapter trained for it, saved by slimtune."""
    from train_helpers import make_tokenizer
    from transformers import T5Config, T5ForConditionalGeneration

    import slimtune

    tokenizer = make_tokenizer(chat_template=None)
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    base.generation_config.eos_token_id = None  # random weights may say EOS at once: always write max_new_tokens
    base.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    torch.manual_seed(1)
    model = slimtune.add_adapter(base, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    slimtune.save_adapter(model, tmp_path / "adapter")
    return model.eval(), tokenizer


@pytest.mark.parametrize("method", ["lora", "prompt", "lora-without-task-type"])
def test_a_seq2seq_adapter_generates_with_its_seq2seq_base(tmp_path, capsys, method):
    """generate loads the model class the adapter's task_type names (it loaded a causal LM and failed), reads the
    prompt as the encoder's input and prints the decoder's answer; eval refuses clearly."""
    import slimtune

    config = {"lora": slimtune.LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"),
              "prompt": slimtune.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"),
              # LoraConfig's default task_type is None: the base model's config says encoder-decoder
              "lora-without-task-type": slimtune.LoraConfig(r=2, target_modules=["q", "v"])}[method]
    model, tokenizer = _t5_with_adapter(tmp_path, config)
    ids = tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    argv = ["--model", str(tmp_path / "t5"), "--adapter", str(tmp_path / "adapter"), "--device", "cpu"]
    assert main(["generate", *argv, "--max-new-tokens", "6", "-p", "def add(a, b):"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    from slimtune.train.generation import generate_text

    loaded, _ = inference.load_with_adapters(str(tmp_path / "t5"), [("default", tmp_path / "adapter")], device="cpu",
                                             log=lambda m: None)
    assert generate_text(loaded, tokenizer, "def add(a, b):", 6, silent=True).strip() == printed
    # A random tiny T5 may write the same tokens with or without the adapter: its logits say it was loaded.
    with torch.no_grad():
        start = torch.tensor([[model.config.decoder_start_token_id]])
        adapted = model(input_ids=ids, decoder_input_ids=start).logits
        # (the loaded model runs the fast path's fused LoRA node, the reference LoraLinear: their roundings differ by
        # CPU, 1.1e-5 on an AVX-512 one; without the adapter the logits move by more than 1e-3)
        torch.testing.assert_close(loaded(input_ids=ids, decoder_input_ids=start).logits, adapted, atol=1e-4, rtol=1e-4)
        with slimtune.disable_adapters(model):
            assert (model(input_ids=ids, decoder_input_ids=start).logits - adapted).abs().max() > 1e-3
    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["eval", *argv, "--data", str(data), "--split", "all"]) == 2
    assert "a sequence-to-sequence model: evaluate it from Python" in capsys.readouterr().err
    if method != "prompt":  # the merged folder loads with the class merge names (it named AutoModelForCausalLM)
        assert main(["merge", *argv, "--output", str(tmp_path / "merged")]) == 0
        assert "load it with transformers' AutoModelForSeq2SeqLM.from_pretrained" in capsys.readouterr().out
        merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
        with torch.no_grad():
            merged_logits = merged(input_ids=ids, decoder_input_ids=start).logits
        torch.testing.assert_close(merged_logits, adapted, atol=1e-4, rtol=1e-4)  # merged W + s·BA rounds differently


def test_an_adapter_of_a_classifier_is_refused_by_name(tmp_path):
    import slimtune

    model = slimtune.add_adapter(__import__("tiny_models").tiny_llama_cls(), slimtune.LoraConfig(
        r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    slimtune.save_adapter(model, tmp_path / "cls")
    with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] are SEQ_CLS adapters: `slimtune generate`"):
        inference.load_with_adapters(str(tiny_model_dir()), [("default", tmp_path / "cls")])


def test_merging_an_adapter_that_cannot_merge_is_a_clear_error(tmp_path, capsys):
    from train_helpers import tiny_llama

    import slimtune

    model = slimtune.add_adapter(tiny_llama(), slimtune.PromptTuningConfig(num_virtual_tokens=2))
    slimtune.save_adapter(model, tmp_path / "prompt")
    assert main(["merge", "--model", str(tiny_model_dir()), "--adapter", str(tmp_path / "prompt"), "--device", "cpu",
                 "-o", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "\nerror: PROMPT_TUNING adapter(s) ['default'] add virtual tokens and cannot be merged" in err
    assert "Traceback" not in err and not (tmp_path / "merged").exists()


def test_load_in_4bit_gives_4_bits_even_for_an_adapter_of_an_8bit_run(tmp_path):
    """By default an adapter's base is loaded as its run's was (8-bit here); --load-in-4bit asks for NF4, which it
    gave as the run's 8 bits before."""
    folder = tiny_model_dir()
    model = slimtune.add_adapter(AutoModelForCausalLM.from_pretrained(folder),
                                 slimtune.LoraConfig(r=2, target_modules=["q_proj"]))
    run = tmp_path / "run"
    slimtune.save_adapter(model, run / "adapter")
    (run / "recipe.yaml").write_text(f"{RunFolder.RECIPE_MARK}\nquantization: {{bits: 8}}\n")
    for load_in_4bit, kind in ((None, Linear8bit), (True, Linear4bit)):
        loaded, _ = inference.load_with_adapters(None, [("default", run / "adapter")], load_in_4bit=load_in_4bit,
                                                 device="cpu", log=lambda message: None)
        assert isinstance(loaded.model.layers[0].self_attn.k_proj, kind), load_in_4bit


def test_generate_system_option_reaches_the_prompt(monkeypatch):
    from slimtune.train import generation

    seen = []
    monkeypatch.setattr(generation, "prompt_ids", lambda tok, prompt, chat, raw, system: seen.append(system) or [1])
    assert main(["generate", "--model", str(tiny_model_dir()), "--device", "cpu", "--max-new-tokens", "1",
                 "-p", "hi", "--system", "Be brief."]) == 0
    assert seen == ["Be brief."]
