"""Reading a range of rows (a rank's shard) from a checkpoint or a random source: the rows of the whole tensor,
and only those rows read."""

from __future__ import annotations

import contextlib

import torch
from safetensors.torch import save_file
from tiny_models import tiny_llama

from slimtune.core.tensor_files import SafetensorsReader
from slimtune.quant.streaming import checkpoint_source, init_empty_weights, random_source


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
