"""Per-rank memory of distributed runs (slimtune.estimate.per_rank): what FSDP2 shards, what DDP adds, what every
rank keeps whole, and that ranks on one CPU node share its memory."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from conftest import TEST_CPU, GiB, make_recipe

from slimtune.cli import main
from slimtune.estimate import predict, recipe_with

QLORA = {"bits": 4, "quant_type": "nf4", "double_quant": True, "blocksize": 64}
H100 = replace(TEST_CPU, name="test-gpu", kind="cuda", memory=80 * GiB, context=500 * 2**20, heap_retention=0.08)


def _fsdp(recipe, **settings):
    return recipe_with(recipe, [f"distributed.{k}={v}" for k, v in {"strategy": "fsdp", **settings}.items()])


def _by_label(est) -> dict[str, int]:
    return {c.label: c.bytes for c in est.memory.components if c.on_device}


def test_fsdp_shards_the_blocks_and_the_adapter_and_keeps_the_root_whole(tiny_folder):
    recipe = make_recipe(tiny_folder, quantization=QLORA)
    one = _by_label(predict(recipe, H100, timing=False))
    est = predict(_fsdp(recipe), H100, timing=False, ranks=4)
    four = _by_label(est)
    assert est.distribution is not None and est.distribution.strategy == "fsdp" and est.ranks == 4
    assert four["weights, 4-bit"] == -(-one["weights, 4-bit"] // 4)
    for label in ("adapter parameters", "gradients", "optimizer states (adamw)"):
        assert four[label] == -(-one[label] // 4), label
    assert four["weights kept fp32"] == one["weights kept fp32"]  # embeddings, norms: the root, whole everywhere
    assert four["gathered decoder blocks"] == 2 * -(-one["weights, 4-bit"] // 3)  # 3 layers: two blocks whole
    for label in ("activations (checkpointed)", "activations kept for backward"):  # per-rank batch: unchanged
        assert four.get(label) == one.get(label)
    assert est.memory.train_peak == sum(four.values())
    assert est.memory.load_peak < predict(recipe, H100, timing=False).memory.load_peak  # only its own rows


def test_fsdp_keeps_an_8bit_base_whole_on_every_rank(tiny_folder):
    """FSDP2 shards parameters; an 8-bit layer's int8 codes are buffers, copied whole to every rank (the run logs
    "rank 0 holds 18,432 of the quantized layers' 18,432 bytes"): the estimate said sharded, 1/N."""
    recipe = make_recipe(tiny_folder, quantization={"bits": 8})
    one = _by_label(predict(recipe, H100, timing=False))
    four = _by_label(predict(_fsdp(recipe), H100, timing=False, ranks=4))
    assert four["weights, 8-bit"] == one["weights, 8-bit"] > 0


def test_fsdp_of_a_full_precision_base_shards_only_the_blocks_linear_weights(tiny_folder):
    recipe = make_recipe(tiny_folder)
    one = _by_label(predict(recipe, H100, timing=False))
    two = _by_label(predict(_fsdp(recipe), H100, timing=False, ranks=2))
    whole = one["weights, fp32"]
    assert 2 * two["weights, fp32"] + two["weights kept whole"] == pytest.approx(whole, abs=2)
    assert 0 < two["weights kept whole"] < whole  # the embedding (tied head) and the norms


def test_cpu_offload_moves_the_shards_to_host_memory_on_a_gpu(tiny_folder):
    recipe = _fsdp(make_recipe(tiny_folder, quantization=QLORA), cpu_offload="true")
    est = predict(recipe, H100, timing=False, ranks=2)
    host = {c.label for c in est.memory.components if not c.on_device}
    assert {"weights, 4-bit", "adapter parameters", "gradients", "optimizer states (adamw)"} <= host
    assert "gathered root" in _by_label(est) and est.memory.host_extra > 0
    assert predict(recipe, TEST_CPU, timing=False, ranks=2).distribution.cpu_offload is False  # GPUs only


def test_ddp_adds_its_gradient_buckets(tiny_folder):
    recipe = recipe_with(make_recipe(tiny_folder), ["distributed.strategy=ddp"])
    one = predict(make_recipe(tiny_folder), H100, timing=False)
    est = predict(recipe, H100, timing=False, ranks=2)
    assert _by_label(est)["DDP gradient buckets"] == one.memory.component("gradients")
    assert est.peak == one.peak + one.memory.component("gradients")


def test_auto_picks_fsdp_when_the_weights_exceed_the_fraction_of_a_device(tiny_folder):
    recipe = make_recipe(tiny_folder)  # no distributed section: the default, auto with fsdp_fraction 0.5
    weights = predict(recipe, H100, timing=False).memory.component("weights")
    assert predict(recipe, H100, timing=False, ranks=2).distribution.strategy == "ddp"
    small = replace(H100, memory=int(weights * 1.5))
    assert predict(recipe, small, timing=False, ranks=2).distribution.strategy == "fsdp"


def test_ranks_on_one_cpu_node_share_its_memory(tiny_folder):
    recipe = _fsdp(make_recipe(tiny_folder, quantization=QLORA))
    per_rank = predict(recipe, TEST_CPU, timing=False, ranks=4).peak
    node = replace(TEST_CPU, memory=int(per_rank * 2.5), free=None)
    assert predict(recipe, node, timing=False, ranks=4, per_machine=2).fits  # 2 ranks here, 2 on another node
    assert not predict(recipe, node, timing=False, ranks=4).fits  # all 4 on this one
    on_gpu = predict(recipe, H100, timing=False, ranks=4).peak
    gpu = replace(H100, memory=int(on_gpu * 1.5))
    assert predict(recipe, gpu, timing=False, ranks=4).fits  # one device per rank


def test_cli_nproc_per_node(capsys, tiny_folder):
    status = main(["estimate", "qlora-smollm2-pycode", f"model.name_or_path={tiny_folder}", "distributed.strategy=fsdp",
                   "--device", "h200", "--nproc-per-node", "4", "--nnodes", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    assert out["distribution"] == {"strategy": "fsdp", "ranks": 8, "per_machine": 4, "cpu_offload": False,
                                   "needed_bytes": out["memory"]["peak_bytes"]}
    with pytest.raises(SystemExit) as exit_:
        main(["estimate", "--nproc-per-node", "0"])
    assert exit_.value.code == 2 and "argument --nproc-per-node: 0 must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("per_machine", [2, 1])
def test_advice_for_ranks_says_per_rank_and_launches_them(tiny_folder, per_machine):
    """On a CPU node the ranks share its memory: each advice line gives what the node needs beside the rank's peak
    (it showed the rank's peak alone, under the node's limit yet marked ✗), and its command starts the same ranks
    (it started one process)."""
    from slimtune.estimate import estimate
    from slimtune.estimate.report import format_estimate

    recipe = make_recipe(tiny_folder, quantization=QLORA)
    alone = predict(recipe, TEST_CPU, timing=False).peak
    est = estimate(recipe, replace(TEST_CPU, memory=alone, free=None), timing=False, ranks=2, per_machine=per_machine)
    assert est.advice and all(a.needed == a.peak * per_machine for a in est.advice)
    lines = format_estimate(est).splitlines()
    chosen = [line.strip() for line in lines if line.strip().startswith(("✓", "✗"))]
    commands = [line.strip() for line in lines if line.strip().startswith(("slimtune train", "torchrun"))]
    assert len(chosen) == len(commands) == len(est.advice)
    launch = ("slimtune train --nproc-per-node 2 " if per_machine == 2
              else "torchrun --nnodes 2 --nproc-per-node 1 -m slimtune train ")
    assert all(command.startswith(launch) for command in commands)
    if per_machine == 2:
        assert all(re.search(r"→ \S+ \S+ \(\S+ \S+ per rank\)", line) for line in chosen), chosen
    else:
        assert not any("per rank" in line for line in chosen)
