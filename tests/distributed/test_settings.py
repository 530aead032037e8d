"""The `distributed` recipe section, the strategy `auto` picks, and the torchrun command `--nproc-per-node` runs."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from slimtune.distributed.launch import torchrun_command
from slimtune.distributed.wrap import choose_strategy, model_bytes
from slimtune.train.recipe import RecipeError, recipe_from_dict


def _recipe(**distributed):
    return recipe_from_dict({"method": {"peft_type": "LORA"}, "distributed": distributed})


def test_the_section_is_checked_and_round_trips():
    recipe = _recipe(strategy="fsdp", cpu_offload=True, timeout_s=30)
    assert recipe.distributed is not None and recipe.distributed.strategy == "fsdp" and recipe.distributed.cpu_offload
    assert recipe_from_dict(recipe.to_dict()) == recipe
    assert recipe_from_dict({"method": {"peft_type": "LORA"}}).distributed is None  # one process
    assert "distributed" not in recipe_from_dict({"method": {"peft_type": "LORA"}}).to_dict()
    with pytest.raises(RecipeError, match=r"distributed.strategy: expected one of 'auto', 'ddp', 'fsdp'"):
        _recipe(strategy="zero3")
    with pytest.raises(RecipeError, match=r"distributed.fsdp_fraction: .* must be in \(0, 1\]"):
        _recipe(fsdp_fraction=0.0)
    with pytest.raises(RecipeError, match="distributed.timeout: unknown key. Did you mean 'timeout_s'"):
        _recipe(timeout=5)
    with pytest.raises(RecipeError, match="cpu_offload=true keeps FSDP's parameter shards .* strategy=ddp shards"):
        _recipe(strategy="ddp", cpu_offload=True)  # a key that would do nothing


def test_auto_shards_a_base_that_is_large_for_one_device():
    model = nn.Linear(64, 64)
    assert model_bytes(model) == (64 * 64 + 64) * 4
    cpu = torch.device("cpu")
    assert choose_strategy("auto", model, cpu, fsdp_fraction=1e-12) == "fsdp"
    assert choose_strategy("auto", model, cpu, fsdp_fraction=1.0) == "ddp"
    assert choose_strategy("ddp", model, cpu, fsdp_fraction=1e-12) == "ddp"


def test_nproc_per_node_starts_torchrun_with_the_same_train_command():
    command = torchrun_command(4, ["my.yaml", "training.max_steps=3", "--resume"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and "--standalone" in command
    assert command[-6:] == ["-m", "slimtune", "train", "my.yaml", "training.max_steps=3", "--resume"]
    with pytest.raises(ValueError, match="positive number"):
        torchrun_command(0, [])


def test_an_adapter_training_base_weights_in_place_is_never_sharded():
    # FSDP2 puts new sharded parameters in the modules: a BitFit/selective adapter kept the old ones, trained
    # nothing it saved, and wrote the base values as its file
    from tiny_models import tiny_llama

    import slimtune

    with pytest.raises(RecipeError, match="distributed.strategy: fsdp cannot train SELECTIVE"):
        recipe_from_dict({"method": {"peft_type": "SELECTIVE", "target_parameters": ["norm.weight"]},
                          "distributed": {"strategy": "fsdp"}})
    model = slimtune.add_adapter(tiny_llama(), slimtune.SelectiveConfig(target_parameters=["norm.weight"]))
    cpu = torch.device("cpu")
    assert choose_strategy("auto", model, cpu, fsdp_fraction=1e-12) == "ddp"
    with pytest.raises(ValueError, match="fsdp cannot train a BitFit or selective adapter"):
        choose_strategy("fsdp", model, cpu, fsdp_fraction=1.0)


def test_the_logged_epoch_of_a_sharded_run_counts_each_ranks_micro_batches():
    # as HF's Trainer logs it under DDP, and as one process with the same rows per step does
    from types import SimpleNamespace

    from slimtune.distributed.data import ShardedBatches
    from slimtune.train.trainer import Trainer

    rows = [{"input_ids": [1, 2], "labels": [1, 2]}] * 22
    batches = ShardedBatches(rows, batch_size=1, accumulation=2, rank=0, world_size=2, seed=0, pad_id=0)
    for _ in range(3):
        batches.step_rows()
    assert Trainer._epochs_done(SimpleNamespace(batches=batches)) == round(6 / 11, 4)  # 12 rows: 6 of 11 per rank
