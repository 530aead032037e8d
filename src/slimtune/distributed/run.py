"""`slimtune train` on several processes: the stages of :mod:`slimtune.train.runner`, run by every rank.

    validate → data → model (→ 4-bit) → method → wrap (DDP | FSDP2) → train → finalize

Every rank loads the data and the model the same way and adds the adapter from the same seed (identical
initial weights on every rank). Under FSDP2 with a 4-bit base, the model is an empty skeleton until it is
sharded, then each rank reads and quantizes only its own rows (:mod:`slimtune.distributed.sharded_load`);
otherwise every rank loads the whole model. Then each rank reseeds its generators with ``training.seed + rank``, so
dropout masks differ across ranks and are reproducible. Rank 0 alone writes the run folder (recipe,
metrics, checkpoints' adapter and state, final adapter, summary); the others write only their checkpoint
shards. Evaluations run on every rank over the whole evaluation set (FSDP needs every rank in each forward).
The sample generations of ``demo`` are skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from slimtune.adapter_files import save_adapter
from slimtune.core.files import atomic_write
from slimtune.distributed.checkpoint import read_distributed_state, world_size_note
from slimtune.distributed.context import DistContext, launched_by_torchrun, process_group
from slimtune.distributed.data import ShardedBatches, accumulation_for
from slimtune.distributed.sharded_load import (
    ShardedBase,
    WholeLoadNeeded,
    fill_shards,
    load_skeleton,
    stand_ins,
)
from slimtune.distributed.wrap import (
    choose_strategy,
    full_trainable_parameters,
    held_bytes,
    replicated_bytes,
    why_not_per_rank,
    wrap_model,
)
from slimtune.report import trainable_parameters
from slimtune.train.progress import plot_loss, process_peak_rss_mb
from slimtune.train.recipe import DistributedSection, Recipe, RecipeError
from slimtune.train.run_folder import RunFolder, RunLock
from slimtune.train.runner import (
    RunResult,
    add_method,
    check_memory,
    check_packing,
    check_positions,
    check_writable,
    comparable,
    format_summary,
    load_data,
    load_model,
    validate,
)
from slimtune.train.tokenization import tokenize_examples
from slimtune.train.trainer import Trainer

__all__ = ["distributed_requested", "run_distributed"]


def distributed_requested(recipe: Recipe) -> bool:
    """A recipe with a ``distributed`` section, or any recipe started by torchrun, trains through here."""
    return recipe.distributed is not None or launched_by_torchrun()


def run_distributed(recipe: Recipe, resume: bool = False, show_progress: bool = True,
                    log: Callable[[str], None] = print, stream: TextIO | None = None, force: bool = False) -> RunResult:
    """Train ``recipe`` as this rank of the process group (a group of one without torchrun)."""
    settings = recipe.distributed or DistributedSection()
    check_writable(recipe.output_dir)
    with process_group(recipe.model.device, settings.timeout_s) as ctx:
        say = log if ctx.is_main else _quiet
        with RunLock(recipe.output_dir, say), _warnings_of_rank_0(ctx.is_main), contextlib.ExitStack() as at_end:
            return _run(recipe, settings, ctx, resume, show_progress, say, force, at_end)  # (the lock: rank 0's)


def _quiet(message: str) -> None:
    """The log of ranks other than 0: their messages would repeat rank 0's."""


@contextlib.contextmanager
def _warnings_of_rank_0(is_main: bool) -> Iterator[None]:
    """Warnings (slimtune's logger, Python's ``warnings``) from rank 0 only: every rank loads the same recipe, model
    and data, so the others' would repeat them; errors still come from every rank."""
    if is_main:
        yield
        return
    logger = logging.getLogger("slimtune")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _accumulation(recipe: Recipe, checkpoint: Path | None, world_size: int) -> int:
    """Micro-batches per rank and step: the recipe's, or on resume what keeps the checkpoint's rows per step."""
    batch_size = recipe.training.batch_size
    if checkpoint is None:
        return recipe.training.gradient_accumulation_steps
    global_batch = read_distributed_state(checkpoint)["data"].get("global_batch")
    if not isinstance(global_batch, int):
        raise RecipeError(f"--resume: {checkpoint} does not record its rows per step; it was not written by a "
                          "distributed run.")
    try:
        return accumulation_for(global_batch, batch_size, world_size)
    except ValueError as error:
        raise RecipeError(f"--resume: {error}") from None


def _load_base(recipe: Recipe, settings: DistributedSection, ctx: DistContext, log: Callable[[str], None]
               ) -> tuple[Any, Any, ShardedBase | None]:
    """The model and tokenizer, and under FSDP2 with a 4-bit base the plan that fills each rank's rows once the
    model is sharded (the model is then still empty); otherwise the whole model, loaded by every rank."""
    reason = why_not_per_rank(recipe) if settings.strategy != "ddp" else None
    if settings.strategy != "ddp" and reason is None:
        try:
            plan, tokenizer = load_skeleton(recipe, ctx.device)
        except WholeLoadNeeded as why:
            reason = str(why)
        else:
            strategy = ctx.broadcast_object(choose_strategy(settings.strategy, plan.model, ctx.device,
                                                            settings.fsdp_fraction))
            if strategy == "fsdp":
                log("fsdp: each rank reads and quantizes only its own rows of the base weights")
                return plan.model, tokenizer, plan
            plan.files.close()
            reason = "distributed.strategy: auto chose ddp"
    if reason is not None and recipe.quantization is not None:
        log(f"every rank loads the whole base: {reason}")
    model, tokenizer = load_model(recipe, ctx.device, log)
    return model, tokenizer, None


def _run(recipe: Recipe, settings: DistributedSection, ctx: DistContext, resume: bool, show_progress: bool,
         log: Callable[[str], None], force: bool, at_end: contextlib.ExitStack) -> RunResult:
    wall_start = time.perf_counter()
    checkpoint = validate(recipe, resume)
    accumulation = _accumulation(recipe, checkpoint, ctx.world_size)
    ctx.barrier()  # every rank validated before rank 0 may replace the folder
    if ctx.is_main:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))  # ranks on this node (torchrun sets it)
        check_memory(recipe, force, log, ranks=ctx.world_size, per_machine=local)
    run = RunFolder(recipe.output_dir)
    train_examples, eval_examples = load_data(recipe)
    model, tokenizer, plan = _load_base(recipe, settings, ctx, log)
    data = recipe.data
    train_rows = tokenize_examples(train_examples, tokenizer, data.max_seq_length, data.packing, data.use_chat_template)
    eval_rows = tokenize_examples(eval_examples, tokenizer, data.max_seq_length, False, data.use_chat_template,
                                  "evaluation")
    with stand_ins(model, ctx.device) if plan is not None else contextlib.nullcontext():
        log(str(add_method(model, recipe)))  # the same seed on every rank: the same initial adapter
    check_positions(model, data.max_seq_length, train_rows, eval_rows)  # after: a prompt adapter takes positions
    log(str(trainable_parameters(model)))
    training = recipe.training
    torch.manual_seed(training.seed + ctx.rank)  # per-rank streams (dropout) from here on
    strategy = "fsdp" if plan is not None else \
        str(ctx.broadcast_object(choose_strategy(settings.strategy, model, ctx.device, settings.fsdp_fraction)))
    if settings.cpu_offload and (strategy != "fsdp" or ctx.device.type != "cuda"):
        log(f"distributed.cpu_offload: nothing to offload ({strategy} on {ctx.device.type}: only FSDP's shards on "
            "a GPU move to CPU memory)")
    wrapped = wrap_model(model, strategy, ctx, settings.cpu_offload)
    if plan is not None:
        fill_shards(plan, ctx)
        log(f"fsdp: base loaded per rank; rank 0's process peak so far {process_peak_rss_mb() / 1024:.2f} GiB")
    check_packing(recipe, wrapped, ctx.device)  # every rank: a sharded forward needs them all
    mine, whole = held_bytes(wrapped)
    log(f"{strategy}: rank 0 holds {mine:,} of the model's {whole:,} bytes (parameters and buffers)")
    if strategy == "fsdp":
        log(f"fsdp: {replicated_bytes(wrapped):,} of them are whole on every rank (the root's frozen parameters: "
            "embeddings, final norm; buffers)")
    mine, whole = held_bytes(wrapped, quantized_only=True)
    if whole:  # (a quantization section, or a folder stored quantized)
        log(f"{strategy}: rank 0 holds {mine:,} of the quantized layers' {whole:,} bytes (packed weights, scales)")
    batches = ShardedBatches(train_rows, training.batch_size, accumulation, ctx.rank, ctx.world_size, training.seed,
                             tokenizer.pad_token_id)
    log(f"distributed: {ctx.world_size} ranks ({ctx.backend}), {strategy}; a step takes {batches.global_batch} rows "
        f"({training.batch_size} per micro-batch × {accumulation} micro-batches × {ctx.world_size} ranks)")
    trainer = Trainer(wrapped, batches, eval_rows.rows, training, run.path, ctx.device, tokenizer.pad_token_id,
                      config_snapshot=comparable(recipe), show_progress=show_progress, log=log, dist=ctx,
                      strategy=strategy)
    at_end.callback(trainer.metrics.close)  # the trackers end with the run (TensorBoard closed, W&B finished)
    if ctx.is_main:
        if checkpoint is None:
            run.clear()  # output.overwrite=true (validate refused a folder holding anything else)
        run.path.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            run.write_recipe(recipe.to_yaml())
    ctx.barrier()
    if recipe.demo.enabled:
        log("demo: sample generations are skipped in distributed runs")
    if checkpoint is None:
        if resume:
            log(f"--resume: {run.path} has no checkpoint yet (the run stopped before its first); starting from the "
                "beginning")
        log(f"eval loss of the base model: {trainer.evaluate_base():.4f}")
    else:
        note = world_size_note(checkpoint, ctx.world_size)
        if note is not None:
            log(f"warning: {note}")
        trainer.resume(checkpoint)
        log(f"resumed from {checkpoint} (step {trainer.state.step}/{trainer.total_steps})")
    log(f"training {trainer.total_steps - trainer.state.step} steps on {ctx.world_size} × {ctx.device.type} ...")
    if not trainer.train():
        log(f"resume with: slimtune train {recipe.command_line('--resume')} (on {ctx.world_size} processes for the "
            f"adapter an uninterrupted run ends with; the run folder is {run.path})")
        return RunResult(run.path, False, {})
    return _finalize(recipe, trainer, run, ctx, strategy, wall_start, log)


def _finalize(recipe: Recipe, trainer: Trainer, run: RunFolder, ctx: DistContext, strategy: str, wall_start: float,
              log: Callable[[str], None]) -> RunResult:
    """Rank 0 saves the adapter (gathered whole from the shards); every rank evaluates; rank 0 summarises."""
    with full_trainable_parameters(trainer.model, ctx):
        report = trainable_parameters(trainer.inner) if ctx.is_main else None  # sizes of the whole adapter
        if ctx.is_main:
            save_adapter(trainer.inner, run.adapter)
    ctx.barrier()
    eval_after = trainer.evaluate()
    peaks: list[tuple[float, float]] = [(0.0, 0.0)] * ctx.world_size  # (while training, whole process) per rank
    dist.all_gather_object(peaks, (round(trainer.peak_memory_mb, 1), round(process_peak_rss_mb(), 1)))
    summary = {
        "steps": trainer.state.step, "tokens": trainer.state.tokens,
        "peak_memory_mb": max(p[0] for p in peaks), "process_peak_rss_mb": max(p[1] for p in peaks),
        "peak_memory_mb_per_rank": [p[0] for p in peaks], "process_peak_rss_mb_per_rank": [p[1] for p in peaks],
        "device": trainer.device.type,
        "world_size": ctx.world_size, "strategy": strategy,
        "train_seconds": round(trainer.state.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),  # this process's (train_seconds: every one's)
        "resumed_at_step": trainer.resumed_at,
        "eval_loss_before": trainer.eval_before, "eval_loss_after": eval_after,
        "adapter": str(run.adapter), "loss_plot": None,
    }
    if report is not None:
        summary.update(trainable_params=report.trainable, total_params=report.total, adapter_bytes=report.adapter_bytes)
        plot = plot_loss(run.path) if recipe.output.plot else None
        summary["loss_plot"] = str(plot) if plot else None
        atomic_write(run.summary_file, (json.dumps(summary, indent=2) + "\n").encode())
        run.drop_checkpoints(recipe.training.save_every)
        log(format_summary(summary, report, run.path))
    ctx.barrier()
    return RunResult(run.path, True, summary)
