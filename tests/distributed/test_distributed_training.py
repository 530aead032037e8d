"""DDP and FSDP2 × LoRA and QLoRA on 2 gloo ranks: the same adapter as one process with the whole batch;
checkpoints that resume at the same and at another world size; a killed rank that ends the run cleanly.

The 2-rank runs share one torchrun launch (tests/distributed/worker.py); the references run in this process.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from dist_helpers import WORKER, adapter, assert_same_adapter, check, env, recipe_file, torchrun
from tiny_models import tiny_llama
from transformers import AutoConfig

from slimtune.cli import main
from slimtune.distributed.context import free_port
from slimtune.distributed.wrap import check_fsdp_can_shard, fsdp_shards_integer_parameters
from slimtune.quant import QuantConfig, quantize

# FSDP2 of torch 2.11 (the floor) cannot shard integer parameters: QLoRA under FSDP needs a newer torch
FSDP_QLORA = fsdp_shards_integer_parameters()
NEEDS_FSDP_QLORA = pytest.mark.skipif(not FSDP_QLORA, reason="this torch's FSDP2 cannot shard the packed 4-bit base")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """References: one process, batch 4 (2 × the ranks' batch), the plain single-process engine."""
    tmp = tmp_path_factory.mktemp("single")
    for name, quantized in (("lora", False), ("qlora", True)):
        assert main(["train", str(recipe_file(tmp, name, quantized=quantized, batch=4)), "--no-progress"]) == 0
    return tmp


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One launch of 2 ranks × batch 2: DDP and FSDP2 × LoRA and QLoRA (FSDP2 LoRA with a checkpoint at step 2;
    the QLoRA runs with activation checkpointing, as the shipped recipes)."""
    tmp = tmp_path_factory.mktemp("two-ranks")
    files = [recipe_file(tmp, "ddp", strategy="ddp", eval_every=2),
             recipe_file(tmp, "fsdp", strategy="fsdp", save_every=2),
             recipe_file(tmp, "ddp-qlora", quantized=True, strategy="ddp", checkpointing=True)]
    if FSDP_QLORA:
        files.append(recipe_file(tmp, "fsdp-qlora", quantized=True, strategy="fsdp", checkpointing=True))
    def fresh() -> None:  # a rerun starts the runs anew rather than resuming them
        for f in files:
            shutil.rmtree(f.with_suffix(""), ignore_errors=True)

    (tmp / "launch.log").write_text(check(torchrun(str(WORKER), *map(str, files), fresh=fresh)).stdout)
    return tmp


def test_an_evaluation_the_ranks_run_together_is_printed_once(two_ranks):
    out = (two_ranks / "launch.log").read_text()
    assert out.count("distributed: 2 ranks") == len(list(two_ranks.glob("*.yaml")))  # (what rank 0 alone says)
    assert out.count("step 2: eval loss") == 1
    # the quantized layers' share: for the runs with a quantized base (they have it from the section, or stored)
    assert out.count("of the quantized layers'") == len(list(two_ranks.glob("*qlora.yaml")))


@pytest.mark.parametrize("run, reference", [("ddp", "lora"), ("fsdp", "lora"), ("ddp-qlora", "qlora"),
                                            pytest.param("fsdp-qlora", "qlora", marks=NEEDS_FSDP_QLORA)])
def test_two_ranks_train_the_adapter_of_one_process_with_twice_the_batch(two_ranks, single, run, reference):
    assert_same_adapter(adapter(single / reference), adapter(two_ranks / run))


@NEEDS_FSDP_QLORA
def test_fsdp_shards_the_packed_4bit_base(two_ranks):
    """Under FSDP2 each rank holds about half the model: the packed 4-bit codes and their block scales are
    sharded by rows (whole quantization blocks), not replicated; the results above show they decode as before."""
    log = (two_ranks / "launch.log").read_text()
    number = lambda text: int(text.replace(",", ""))  # noqa: E731
    held = re.findall(r"fsdp: rank 0 holds ([\d,]+) of the quantized layers' ([\d,]+) bytes", log)
    assert len(held) == 1, "expected the FSDP QLoRA run's line"
    assert log.count("fsdp: each rank reads and quantizes only its own rows") == 1, "the QLoRA run loads per rank"
    mine, whole = held[0]  # the 4-bit storage: half, plus the replicated double-quant statistics and code books
    assert number(mine) < 0.6 * number(whole)
    models = re.findall(r"fsdp: rank 0 holds ([\d,]+) of the model's ([\d,]+) bytes.*\n.*fsdp: ([\d,]+) of them are "
                        r"whole on every rank", log)
    assert len(models) == 2, "expected the FSDP LoRA and QLoRA runs' lines"
    config = AutoConfig.from_pretrained(yaml.safe_load((two_ranks / "fsdp.yaml").read_text())["model"]["name_or_path"])
    embedding = config.vocab_size * config.hidden_size * 4  # fp32, tied to the output head
    for mine, whole, replicated in models:  # the rest is split in two; the root's frozen tensors are whole
        assert number(replicated) >= embedding
        assert number(mine) - number(replicated) < 0.6 * (number(whole) - number(replicated))


def _unfinished_copy(run: Path, to: Path) -> Path:
    """A copy of a finished run folder as if it had stopped after its last periodic checkpoint (the finished
    training's checkpoint, saved before the run was finalized, is removed too)."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "adapter")
    (to / "summary.json").unlink()
    shutil.rmtree(sorted((to / "checkpoints").iterdir())[-1])
    return to


def test_two_rank_fsdp_checkpoint_resumes_on_one_rank(two_ranks, single, tmp_path, capsys):
    copy = _unfinished_copy(two_ranks / "fsdp", tmp_path / "resumed")
    assert main(["train", str(two_ranks / "fsdp.yaml"), f"output.dir={copy}", "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-000002" in out and "1 micro-batch" not in out
    assert "2 micro-batches × 1 ranks" in out  # one rank accumulates two micro-batches: the same rows per step
    assert_same_adapter(adapter(single / "lora"), adapter(copy))


@NEEDS_FSDP_QLORA
def test_fsdp_qlora_on_one_rank_trains_the_adapter_of_the_plain_engine(tmp_path):
    """One rank (a recipe with a distributed section run in this process), blocks of 64 over the tiny model's
    32-wide rows: each layer's 4-bit codes are buffers on the meta device while the adapter is made, and the adapter
    must still be made on the rank's device (it was made on meta: 'Cannot copy out of meta tensor')."""
    for name, strategy in (("plain", None), ("fsdp", "fsdp")):
        recipe = recipe_file(tmp_path, name, quantized=True, batch=4, strategy=strategy)
        spec = yaml.safe_load(recipe.read_text())
        spec["quantization"]["blocksize"] = 64
        recipe.write_text(yaml.safe_dump(spec))
        assert main(["train", str(recipe), "--no-progress"]) == 0
    assert_same_adapter(adapter(tmp_path / "plain"), adapter(tmp_path / "fsdp"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_method_with_only_vectors_to_train_resumes(tmp_path, strategy, capsys):
    """VeRA trains vectors only (no weight-decay group): its distributed checkpoint resumes to the same adapter
    (torch's optimizer-state loader drops the options of an empty group: ``KeyError: 'lr'`` when one was made)."""
    recipe = recipe_file(tmp_path, "vera", strategy=strategy, save_every=2)
    spec = yaml.safe_load(recipe.read_text())
    spec["method"] = {"peft_type": "VERA", "r": 8, "target_modules": ["q_proj", "v_proj"], "vera_dropout": 0.0}
    recipe.write_text(yaml.safe_dump(spec))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    copy = _unfinished_copy(tmp_path / "vera", tmp_path / "resumed")
    capsys.readouterr()
    assert main(["train", str(recipe), f"output.dir={copy}", "--resume", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_adapter(adapter(tmp_path / "vera"), adapter(copy), moved_key="lambda_b")


def test_one_rank_checkpoint_resumes_on_two_nodes(single, tmp_path):
    """1 rank × batch 2 × 2 micro-batches, checkpoint at step 2, resumed by 2 nodes of 1 rank (torchrun --nnodes 2
    on localhost): 1 micro-batch per rank, the same adapter."""
    recipe = recipe_file(tmp_path, "one", accumulation=2, strategy="fsdp", save_every=2)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    assert_same_adapter(adapter(single / "lora"), adapter(tmp_path / "one"))
    copy = _unfinished_copy(tmp_path / "one", tmp_path / "resumed")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "-m", "slimtune", "train", str(recipe), f"output.dir={copy}", "--resume",
                               "--no-progress"], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=120) for node in nodes]
    except subprocess.TimeoutExpired:  # say what each node was doing (one hang was seen, once, in many runs)
        for node in nodes:
            node.kill()
        said = [node.communicate() for node in nodes]
        pytest.fail("the two-node launch hung:\n" + "\n".join(f"node {rank}: {out[-1500:]}\n{err[-3000:]}"
                                                              for rank, (out, err) in enumerate(said)))
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    assert "1 micro-batches × 2 ranks" in outputs[0][0]
    assert_same_adapter(adapter(single / "lora"), adapter(copy))


def _rank_pid(token: str, rank: int) -> int | None:
    """The pid of the rank ``rank`` started by the launch whose environment holds ``token``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLIMTUNE_TEST_LAUNCH={token}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_rank_ends_the_run_with_an_error_and_it_resumes(single, tmp_path):
    """`slimtune train --nproc-per-node 2`, rank 1 killed (SIGKILL) after the first checkpoint: the launch ends
    with an error naming it (no hang), and `torchrun -m slimtune train --resume` finishes the same adapter."""
    recipe = recipe_file(tmp_path, "killed", strategy="ddp", save_every=1)
    token = uuid.uuid4().hex
    launch = subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(recipe), "--nproc-per-node", "2",
                               "--no-progress"], env=env(SLIMTUNE_TEST_LAUNCH=token), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        checkpoints = tmp_path / "killed" / "checkpoints"
        deadline = time.monotonic() + 90
        while not (checkpoints / "step-000001").is_dir() and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = _rank_pid(token, 1)
        assert pid is not None and launch.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            launch.kill()
    assert launch.returncode != 0 and time.monotonic() - killed_at < 60
    assert "error: the distributed run failed" in err and "--resume" in err
    assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]
    assert not (tmp_path / "killed" / "summary.json").exists()
    check(torchrun("-m", "slimtune", "train", str(recipe), "--resume", "--no-progress"))
    assert_same_adapter(adapter(single / "lora"), adapter(tmp_path / "killed"))


@pytest.mark.skipif(FSDP_QLORA, reason="this torch's FSDP2 shards the packed 4-bit base")
def test_fsdp_of_a_4bit_base_on_an_older_torch_is_a_clear_error():
    with pytest.raises(ValueError, match="fsdp with a 4-bit base needs a newer torch.*strategy: ddp"):
        check_fsdp_can_shard(quantize(tiny_llama(), QuantConfig()))
