"""Reading a range of rows (a rank's shard) from a checkpoint or a random source: the rows of the whole tensor,
and only those rows read."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM

from slimtune.core.tensor_files import SafetensorsReader
from slimtune.quant.streaming import checkpoint_source, init_empty_weights, load_in_4bit, random_source


def test_rows_from_a_checkpoint_are_the_rows_of_the_tensor_and_counted(tmp_path):
    tensors = {"w": torch.randn(7, 5), "b": torch.arange(9, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with SafetensorsReader(tmp_path / "m.safetensors") as reader:
        assert torch.equal(reader.get_rows("w", 2, 6), tensors["w"][2:6])
        assert reader.get_rows("b", 9, 9).shape == (0,)
    with contextlib.ExitStack() as stack:
        source = checkpoint_source(tmp_path, stack)
        assert torch.equal(source.get_rows("w", 4, 7), tensors["w"][4:])
        assert torch.equal(source.get_rows("b", 0, 3), tensors["b"][:3])
        assert source.rows_read == {"w": 3, "b": 3}


def test_random_rows_do_not_depend_on_what_was_made_before():
    with init_empty_weights():
        model = tiny_llama()
    one, other = random_source(model, 0.02, 0, "cpu"), random_source(model, 0.02, 0, "cpu")
    key = "model.embed_tokens.weight"
    whole = one.get(key)
    other.get("lm_head.weight")  # another tensor first: the same values
    assert torch.equal(other.get_rows(key, 3, 50), whole[3:50])
    assert 0.015 < float(whole.std()) < 0.025
    assert torch.equal(one.get("model.norm.weight"), torch.ones(32))


def _folder(path, model, shard_size=None):
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    return path


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(1, 9)[None]).logits


def test_a_folders_index_decides_which_shards_are_read(tmp_path):
    """Shards of an older revision beside the current ones (two downloads into one folder) are not read: the
    index names the model's files, as transformers reads them (the last file in name order won each key)."""
    current, older = tiny_llama(seed=0), tiny_llama(seed=1)
    folder = _folder(tmp_path / "model", current, "20KB")
    for stale in _folder(tmp_path / "older", older, "12KB").glob("*.safetensors"):
        (folder / stale.name).write_bytes(stale.read_bytes())
    clean = _folder(tmp_path / "clean", current)
    build = lambda: LlamaForCausalLM(current.config)  # noqa: E731
    torch.testing.assert_close(_logits(load_in_4bit(build, folder)), _logits(load_in_4bit(build, clean)),
                               rtol=0, atol=0)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = index["weight_map"].values()
    pickled = {**index, "weight_map": {k: v.replace(".safetensors", ".bin") for k, v in index["weight_map"].items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(pickled))  # it said "not a safetensors header"
    with pytest.raises(ValueError, match=r"index\.json names shards that are not safetensors files, e\.g\. 'model-"):
        load_in_4bit(build, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / sorted(set(names))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json names shards that are not in .*model-0000"):
        load_in_4bit(build, folder)
    (folder / "model.safetensors.index.json").unlink()  # no index: two files holding one tensor are refused
    with pytest.raises(ValueError, match=r"is stored in both .* keep one checkpoint per folder"):
        load_in_4bit(build, folder)


def test_non_persistent_buffers_are_the_models_own_not_the_checkpoints(tmp_path):
    """A checkpoint that stores a table the model computes itself (rotary inv_freq, GPT-Neo's causal masks) does
    not replace it: transformers ignores such keys."""
    model = tiny_llama()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.rotary_emb.inv_freq"] = model.model.rotary_emb.inv_freq * 3
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_in_4bit(lambda: LlamaForCausalLM(model.config), tmp_path)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
