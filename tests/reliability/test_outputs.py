"""Writing an output folder or file never deletes what is not the output's own: the user's files beside it, or
the inputs it is made from (the base model's folder, the adapters it combines)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama

import slimtune
from slimtune.quant import QuantConfig, quantize
from slimtune.quant.checkpoint import save_quantized
from slimtune.train.inference import export_merged


def _adapter(tmp_path, name, seed=0):
    model = slimtune.add_adapter(tiny_llama(seed=seed), slimtune.LoraConfig(r=2, target_modules=["q_proj"],
                                                                            init_lora_weights=False))
    return slimtune.save_adapter(model, tmp_path / name)


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_save_adapter_keeps_the_users_files(tmp_path):
    folder = _adapter(tmp_path, "adapter")
    (folder / "thesis.tex").write_text("mine")
    before = _contents(folder)
    with pytest.raises(ValueError, match=r"the folder holds other files \(\['thesis.tex'\]\)"):
        _adapter(tmp_path, "adapter", seed=1)
    assert _contents(folder) == before


def test_combining_adapter_files_never_replaces_an_input_or_the_users_files(tmp_path):
    first, second = _adapter(tmp_path, "a", 0), _adapter(tmp_path, "b", 1)
    before = _contents(first)
    for output in (first, tmp_path):  # an input, or a folder holding the inputs
        with pytest.raises(ValueError, match=f"replacing it would delete {first}"):
            slimtune.combine_adapter_files([first, second], [1.0, 1.0], output)
    assert _contents(first) == before
    out = slimtune.combine_adapter_files([first, second], [1.0, 1.0], tmp_path / "out")
    slimtune.combine_adapter_files([first, second], [0.5, 0.5], out)  # a combined adapter is replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"the folder holds other files \(\['notes.txt'\]\)"):
        slimtune.combine_adapter_files([first, second], [1.0, 1.0], out)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_merged_export_never_replaces_the_base_folder_it_came_from(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tiny_llama().save_pretrained(tmp_path / "base")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, "[UNK]")))

    def loaded():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        return slimtune.add_adapter(model, slimtune.LoraConfig(r=2, target_modules=["q_proj"]))

    before = _contents(tmp_path / "base")
    with pytest.raises(ValueError, match=f"replacing it would delete {tmp_path / 'base'}"):
        export_merged(loaded(), tokenizer, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="replacing it would delete"):
        export_merged(loaded(), tokenizer, tmp_path)
    assert _contents(tmp_path / "base") == before
    tokenizer.chat_template = {"default": "{{ messages }}", "tool_use": "{{ tools }}"}  # saved in a sub-folder
    export_merged(loaded(), tokenizer, tmp_path / "merged")
    assert (tmp_path / "merged" / "additional_chat_templates").is_dir()
    export_merged(loaded(), tokenizer, tmp_path / "merged")  # a merged model is replaced, whatever it wrote
    (tmp_path / "merged" / "NOTES.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"other files \(\['NOTES.txt'\]\)"):
        export_merged(loaded(), tokenizer, tmp_path / "merged")
    from slimtune.train.inference import check_merged_output

    with pytest.raises(ValueError, match=r"other files \(\['NOTES.txt'\]\)"):  # known before anything is merged
        check_merged_output(tmp_path / "merged", str(tmp_path / "base"))


def test_a_quantized_checkpoint_never_replaces_other_weights(tmp_path):
    model = quantize(tiny_llama(), QuantConfig())
    (tmp_path / "base").mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "base" / "model.safetensors")  # a base model's own weights
    before = _contents(tmp_path / "base")
    with pytest.raises(ValueError, match="that file holds other weights"):
        save_quantized(model, tmp_path / "base")
    with pytest.raises(ValueError, match="that file holds other weights"):
        save_quantized(model, tmp_path / "base" / "model.safetensors")
    assert _contents(tmp_path / "base") == before
    first = save_quantized(model, tmp_path / "q")
    assert save_quantized(model, tmp_path / "q") == first  # its own checkpoint is replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file is a file, not a folder; choose another path"):
        save_quantized(model, tmp_path / "file" / "q")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_full_disk_inside_safetensors_writer_is_a_save_error_naming_the_path(tmp_path, kind):
    from safetensors import SafetensorError

    from slimtune.core.files import atomic_file, atomic_folder
    from slimtune.errors import SaveError

    target = tmp_path / ("out.safetensors" if kind == "file" else "out")
    (target.write_bytes(b"old") if kind == "file" else (target.mkdir(), (target / "a").write_bytes(b"old")))
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(SaveError, match=rf"cannot write {target}: No space left on device; free some disk space"):
        with atomic_file(target) if kind == "file" else atomic_folder(target):
            raise full
    assert (target.read_bytes() if kind == "file" else (target / "a").read_bytes()) == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out" if kind == "folder" else "out.safetensors"]
    too_big = SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    with pytest.raises(SaveError, match=r"File too large; the file is larger than .* file-size limit \(ulimit -f\)"):
        with atomic_file(target) if kind == "file" else atomic_folder(target):
            raise too_big
    with pytest.raises(SafetensorError, match="header"):  # other safetensors errors stay what they are
        with atomic_file(tmp_path / "x") if kind == "file" else atomic_folder(tmp_path / "x"):
            raise SafetensorError("invalid header")


def test_a_folder_that_cannot_be_renamed_away_is_refused_before_writing(tmp_path, monkeypatch):
    from slimtune.core.files import atomic_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for target in (".", tmp_path):
        with pytest.raises(ValueError, match=rf"cannot replace {target} as a whole \(it is the current folder\)"):
            with atomic_folder(target):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="it is a mount point"):
        with atomic_folder("/proc"):
            pass
