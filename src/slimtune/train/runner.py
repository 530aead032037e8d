"""`slimtune train` end to end, as small stages:

    validate (run folder, resume compatibility) → data → model (→ 4-bit) → method → train → finalize

Every input is checked before the run folder is written (the output folder is writable, a resume
matches its checkpoint, the data loads, the model loads, the method fits the model), so a bad recipe
leaves nothing behind. The run folder's layout is :class:`~slimtune.train.run_folder.RunFolder`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch
import torch.distributed as dist
from torch import nn

from slimtune.adapter_files import load_adapter, save_adapter
from slimtune.core.dtypes import resolve_device
from slimtune.core.files import atomic_write
from slimtune.estimate.fit import DoesNotFitError, check_fits
from slimtune.estimate.model_shapes import apply_config_overrides, resolve_config
from slimtune.lifecycle import add_adapter, disable_adapters
from slimtune.perf.activation_checkpointing import checkpoint_layers
from slimtune.perf.compilation import compile_blocks
from slimtune.perf.fast_path import FastPath, enable_fast_path
from slimtune.quant import QuantizedLinear, quant_summary
from slimtune.report import TrainableReport, trainable_parameters
from slimtune.train.batching import BatchIterator
from slimtune.train.checkpoint import check_no_incomplete_checkpoints, checkpoint_config, latest_checkpoint
from slimtune.train.data import load_examples
from slimtune.train.generation import (
    SamplePrompt,
    generate_text,
    position_limit,
    positions_text,
    sample_prompt,
    virtual_positions,
)
from slimtune.train.models import load_model_and_tokenizer, load_tokenizer, random_model
from slimtune.train.packing import packing_refusal
from slimtune.train.progress import human_bytes, human_seconds, plot_loss, process_peak_rss_mb
from slimtune.train.recipe import Recipe, RecipeError
from slimtune.train.run_folder import RunFolder, RunLock
from slimtune.train.tokenization import TokenizedDataset, tokenize_examples
from slimtune.train.trainer import Trainer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class RunResult:
    run_dir: Path
    finished: bool
    summary: dict[str, Any]


# ---- 1. validate --------------------------------------------------------------------------------------
def check_writable(folder: Path) -> None:
    """Raise unless ``folder`` exists as a writable folder or can be created (nothing is left behind)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RecipeError(f"output.dir: cannot create {folder}: {probe} is a file, not a folder; "
                          "choose another output.dir.")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=RunFolder.WRITE_PROBE).cleanup()
    except OSError as error:
        raise RecipeError(f"output.dir: {probe} is not writable ({error.strerror}); "
                          "choose another output.dir.") from None


def comparable(recipe: Recipe) -> dict[str, Any]:
    """The recipe parts a resumed run must share with the original (output and demo may differ). A local model
    path is made absolute: a relative one names another model from another working directory."""
    data = recipe.to_dict()
    model = dict(data["model"])
    for key in ("name_or_path", "adapter"):
        path = model.get(key)
        if isinstance(path, str) and os.path.exists(path):
            model[key] = str(Path(path).resolve())
    return {**{k: data[k] for k in ("method", "quantization", "data", "training")}, "model": model}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


TRAIN_FURTHER = ("to train its adapter further, start a new run from it (model.adapter: '{run}/adapter', and "
                 "another output.dir).")


def validate(recipe: Recipe, resume: bool) -> Path | None:
    """Check the run folder for a new run or a resume (and that a resume keeps the recipe); return the
    checkpoint to resume from. Cheap: nothing is loaded yet."""
    run = RunFolder(recipe.output_dir)
    check_writable(run.path)
    if resume:
        if run.finished():
            raise RecipeError(f"run {run.path} already finished ({run.SUMMARY} exists); nothing to resume. A finished "
                              f"run is not extended (its schedule ended): {TRAIN_FURTHER.format(run=run.path)}")
        if run.checkpoints.is_symlink():  # its checkpoints are not read through a link: say so, never start over
            raise RecipeError(f"--resume: {run.checkpoints} is a symbolic link (to {os.readlink(run.checkpoints)}); a "
                              "run keeps its checkpoints in its own folder: move that folder back in its place "
                              f"(rm {run.checkpoints} && mv {run.checkpoints.resolve()} {run.checkpoints}), then "
                              "resume.")
        checkpoint = latest_checkpoint(run.path)
        if checkpoint is None:
            check_no_incomplete_checkpoints(run.path)
            if run.entries() and not run.is_run():
                raise RecipeError(run.not_a_run())
            return None  # killed before its first checkpoint (or before it began): nothing to lose, start again
        saved = checkpoint_config(checkpoint)
        changed = _differences(saved, comparable(recipe))
        if changed:
            raise RecipeError(f"--resume: the recipe differs from the one {run.path} was started with: "
                              f"{'; '.join(changed[:6])}. Resume with the same recipe and overrides.")
        return checkpoint
    if run.entries():
        if not run.is_run():
            raise RecipeError(run.not_a_run())
        if not recipe.output.overwrite and run.finished():
            raise RecipeError(f"output.dir: {run.path} holds a finished run. Replace it with output.overwrite=true or "
                              f"pick another output.dir=...; {TRAIN_FURTHER.format(run=run.path)}")
        if not recipe.output.overwrite:
            raise RecipeError(f"output.dir: {run.path} already holds a run. Continue it with --resume, replace it "
                              "with output.overwrite=true, or pick another output.dir=...")
    return None


def check_memory(recipe: Recipe, force: bool, log: Callable[[str], None], ranks: int = 1,
                 per_machine: int | None = None) -> None:
    """Say before anything loads whether the run will fit (:func:`slimtune.estimate.check_fits`): a run
    predicted not to fit stops here with the changes that would make it fit, unless ``force``. A recipe
    the estimator cannot size (an unknown architecture, a model it cannot find without downloading) runs
    on with a note."""
    try:
        estimate = check_fits(recipe, ranks=ranks, per_machine=per_machine)
    except DoesNotFitError as error:
        if not force:
            raise DoesNotFitError(f"{error}\nTo run anyway: slimtune train ... --force", error.estimate) from None
        log(f"warning: {str(error).splitlines()[0]} Running anyway (--force).")
        return
    except (ValueError, OSError, NotImplementedError) as error:
        log(f"memory estimate skipped ({type(error).__name__}: {str(error).splitlines()[0]})")
        return
    each = f" per rank ({estimate.distribution})" if estimate.distribution is not None else ""
    log(f"memory estimate: peak about {human_bytes(estimate.peak)}{each} of {human_bytes(estimate.limit)} on "
        f"{estimate.device.name} (`slimtune estimate` for the breakdown)")


# ---- 2. data -------------------------------------------------------------------------------------------
def load_data(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train examples, eval examples) as the data section says."""
    data = recipe.data
    # with data.eval_dataset, each source is read whole (or as its named train / held-out split)
    separate = data.eval_dataset is not None
    train = load_examples(data.dataset, split="train", validation_fraction=data.validation_fraction,
                          max_examples=data.max_train_examples, hash_split=not separate)
    evals = load_examples(data.dataset if data.eval_dataset is None else data.eval_dataset, split="validation",
                          validation_fraction=data.validation_fraction, max_examples=data.max_eval_examples,
                          hash_split=not separate)
    return train, evals


# ---- 3. model --------------------------------------------------------------------------------------------
def random_model_config(recipe: Recipe) -> tuple[Any, str]:
    """``model.init: random``: the named model's config (and where it came from) with ``model.config_overrides``."""
    spec = recipe.model
    config, source = resolve_config(spec.name_or_path)
    try:
        apply_config_overrides(config, spec.config_overrides)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return config, source


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")  # a folder's own tokenizer


def load_model(recipe: Recipe, device: torch.device, log: Callable[[str], None]) -> tuple[PreTrainedModel, Any]:
    """The base model and tokenizer; with a ``quantization`` section, each linear weight is quantized as it
    is read (the full-precision model never exists). ``model.init: random``: the shapes of the named model
    with random weights, made layer by layer (the tokenizer: ``model.tokenizer``, else the model folder's when it
    has one, else the default model's)."""
    spec = recipe.model
    if spec.init == "random":
        config, source = random_model_config(recipe)
        log(f"model: random weights in the shapes of {spec.name_or_path!r} ({source})")
        model = random_model(config, spec.dtype, device, quantization=recipe.quantization, seed=recipe.training.seed)
        folder = Path(spec.name_or_path).expanduser()
        own = folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None
        tokenizer_source = spec.tokenizer or (str(own) if own is not None else "default")
        log(f"tokenizer: {tokenizer_source!r}")
        tokenizer = load_tokenizer(tokenizer_source, spec.allow_pickle)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise RecipeError(f"model.tokenizer: its {len(tokenizer):,} tokens exceed the random model's vocabulary "
                              f"({vocab:,}); raise model.config_overrides.vocab_size or pick a smaller tokenizer.")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model, tokenizer = load_model_and_tokenizer(spec.name_or_path, dtype=spec.dtype, device=device,
                                                    allow_pickle=spec.allow_pickle,
                                                    tokenizer_name_or_path=spec.tokenizer,
                                                    quantization=recipe.quantization)
    if recipe.quantization is not None or quant_summary(model).layers:  # (a folder bitsandbytes quantized: as stored)
        log(str(quant_summary(model)))
    return model, tokenizer


# ---- 4. method -------------------------------------------------------------------------------------------
def add_method(model: PreTrainedModel, recipe: Recipe) -> FastPath:
    """The recipe's adapter (initialised from ``training.seed``, or loaded from ``model.adapter``), the fast path,
    activation checkpointing, no KV cache, compiled blocks (``training.compile``)."""
    random.seed(recipe.training.seed)
    torch.manual_seed(recipe.training.seed)  # the adapter's initial weights
    if recipe.model.adapter is None:
        add_adapter(model, recipe.method)
    else:  # the saved weights replace the drawn ones; the recipe's method is the folder's (dropout aside)
        load_adapter(model, recipe.model.adapter, is_trainable=True, allow_pickle=recipe.model.allow_pickle,
                     config=recipe.method)
    fast = enable_fast_path(model, recipe.training.kernels)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.keep_dequantized = recipe.training.keep_dequantized
    if recipe.model.gradient_checkpointing:
        checkpoint_layers(model, offload=recipe.model.gradient_checkpointing == "offload")
    model.config.use_cache = False  # training never reuses a KV cache
    if recipe.training.compile:
        if dist.is_available() and dist.is_initialized():  # torchrun without a distributed section
            raise RecipeError("training.compile: true in a distributed run (started by torchrun or --nproc-per-node): "
                              "compiled blocks are not supported under DDP/FSDP yet; drop training.compile.")
        try:
            fast = dataclasses.replace(fast, compiled_blocks=compile_blocks(model))
        except ValueError as error:
            raise RecipeError(f"training.compile: true, but {error}; drop training.compile for this model.") from None
    return fast


# ---- 5. train, 6. finalize ---------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, resume: bool = False, show_progress: bool = True,
               log: Callable[[str], None] = print, stream: TextIO | None = None, force: bool = False) -> RunResult:
    """Train as ``recipe`` says; see the module docstring for the stages. ``force``: train even when the
    memory estimate says the run will not fit. The run folder's lock is held throughout (:class:`RunLock`:
    a second run on the same folder is refused)."""
    check_writable(recipe.output_dir)  # before the lock file is made beside the run folder
    with RunLock(recipe.output_dir, log), contextlib.ExitStack() as at_end:
        return _run_recipe(recipe, resume, show_progress, log, stream, force, at_end)


def _run_recipe(recipe: Recipe, resume: bool, show_progress: bool, log: Callable[[str], None],
                stream: TextIO | None, force: bool, at_end: contextlib.ExitStack) -> RunResult:
    wall_start = time.perf_counter()
    checkpoint = validate(recipe, resume)
    check_memory(recipe, force, log)
    run = RunFolder(recipe.output_dir)
    device = _device(recipe)
    train_examples, eval_examples = load_data(recipe)
    log(f"data: {len(train_examples)} training and {len(eval_examples)} evaluation examples "
        f"from {recipe.data.dataset!r}")
    model, tokenizer = load_model(recipe, device, log)
    data = recipe.data
    train_rows = tokenize_examples(train_examples, tokenizer, data.max_seq_length, data.packing, data.use_chat_template)
    eval_rows = tokenize_examples(eval_examples, tokenizer, data.max_seq_length, False, data.use_chat_template,
                                  "evaluation")
    _log_tokens(train_rows, eval_rows, data.max_seq_length, log)
    log(str(add_method(model, recipe)))
    check_positions(model, data.max_seq_length, train_rows, eval_rows)  # after: a prompt adapter takes positions
    log(str(trainable_parameters(model)))
    check_packing(recipe, model, device)
    settings = recipe.training
    batches = BatchIterator(train_rows, settings.batch_size, seed=settings.seed, pad_id=tokenizer.pad_token_id)
    trainer = Trainer(model, batches, eval_rows.rows, settings, run.path, device, tokenizer.pad_token_id,
                      config_snapshot=comparable(recipe), show_progress=show_progress, log=log)
    at_end.callback(trainer.metrics.close)  # the trackers end with the run (TensorBoard closed, W&B finished)
    log("loss: chunked cross-entropy (no full-vocabulary logits)" if trainer.chunked else
        f"loss: the model's own (full logits): {trainer.loss_refusal}")

    # Every input is valid: from here on the run folder is written.
    if resume and checkpoint is None:
        log(f"--resume: {run.path} has no checkpoint yet (the run stopped before its first); starting from the "
            f"beginning")
    if checkpoint is None:
        run.clear()  # output.overwrite=true, or what a run killed before its first checkpoint left (validate
        # refused a folder holding anything slimtune did not write)
    run.path.mkdir(parents=True, exist_ok=True)
    demo_prompt = sample_prompt(recipe.demo.prompt, eval_examples[0])
    if checkpoint is None:
        run.write_recipe(recipe.to_yaml())
        log(f"eval loss of the base model: {trainer.evaluate_base():.4f}")
        if recipe.demo.enabled:
            log(f"\n── sample prompt ──\n{demo_prompt.text}\n── base model ──")
            with disable_adapters(model):
                generate_text(model, tokenizer, demo_prompt.text, recipe.demo.max_new_tokens, data.use_chat_template,
                              stream, raw=demo_prompt.raw, system=demo_prompt.system)
    else:
        trainer.resume(checkpoint)
        log(f"resumed from {checkpoint} (step {trainer.state.step}/{trainer.total_steps})")
    log(f"training {trainer.total_steps - trainer.state.step} steps on {device.type} ...")
    if not trainer.train():
        log(f"resume with: slimtune train {recipe.command_line('--resume')} (the run folder is {run.path})")
        return RunResult(run.path, False, {})
    try:
        return finalize(recipe, model, tokenizer, trainer, run, demo_prompt, wall_start, log, stream)
    except KeyboardInterrupt:
        log(f"\ninterrupted while finishing the run; the training is saved: finish it with slimtune train "
            f"{recipe.command_line('--resume')}")
        raise


def check_positions(model: nn.Module, max_seq_length: int, *rows: TokenizedDataset) -> None:
    """Refuse rows longer than the model's positions (an absolute position table fails past its end; rotary
    positions run on, beyond what the model was trained for)."""
    limit, virtual = position_limit(getattr(model, "config", None)), virtual_positions(model)
    longest = max((len(row["input_ids"]) for part in rows for row in part.rows), default=0)
    if limit is not None and virtual + longest > limit:
        raise RecipeError(f"data.max_seq_length: rows of up to {longest:,} tokens (max_seq_length={max_seq_length:,}) "
                          f"are longer than {positions_text(limit, virtual)}; set data.max_seq_length: "
                          f"{limit - virtual}.")


def check_packing(recipe: Recipe, model: nn.Module, device: torch.device) -> None:
    """``data.packing: true`` only for a model that keeps packed examples apart (:mod:`slimtune.train.packing`)."""
    refusal = packing_refusal(model, device) if recipe.data.packing else None
    if refusal is not None:
        raise RecipeError(f"data.packing: true: {refusal}; set data.packing: false for this model.")


def _device(recipe: Recipe) -> torch.device:
    try:
        return resolve_device(recipe.model.device)
    except ValueError as error:
        raise RecipeError(f"model.device: {error}") from None


def _log_tokens(train_rows: TokenizedDataset, eval_rows: TokenizedDataset, max_len: int,
                log: Callable[[str], None]) -> None:
    stats, held = train_rows.stats, eval_rows.stats
    log(f"tokens: {stats.n_tokens:,} in {stats.n_sequences} training rows of at most {max_len} "
        f"({stats.n_truncated} examples truncated, {stats.n_dropped} dropped); {len(eval_rows)} evaluation rows"
        f"{f' ({held.n_truncated} truncated, {held.n_dropped} dropped)' if held.n_truncated or held.n_dropped else ''}")


def finalize(recipe: Recipe, model: nn.Module, tokenizer: Any, trainer: Trainer, run: RunFolder,
             demo_prompt: SamplePrompt, wall_start: float, log: Callable[[str], None],
             stream: TextIO | None) -> RunResult:
    """Save the adapter first (the result is safe whatever happens next), evaluate, plot, summarise."""
    save_adapter(model, run.adapter)  # written as one unit (core/files.atomic_folder)
    eval_after = trainer.evaluate()
    if recipe.demo.enabled:
        log("── after fine-tuning ──")
        generate_text(model, tokenizer, demo_prompt.text, recipe.demo.max_new_tokens, recipe.data.use_chat_template,
                      stream, raw=demo_prompt.raw, system=demo_prompt.system)
    plot = plot_loss(run.path) if recipe.output.plot else None
    report = trainable_parameters(model)
    summary = {
        "steps": trainer.state.step, "tokens": trainer.state.tokens,
        "trainable_params": report.trainable, "total_params": report.total, "adapter_bytes": report.adapter_bytes,
        "peak_memory_mb": round(trainer.peak_memory_mb, 1), "process_peak_rss_mb": round(process_peak_rss_mb(), 1),
        "device": trainer.device.type,
        "train_seconds": round(trainer.state.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),  # this process's (train_seconds: every one's)
        "resumed_at_step": trainer.resumed_at,
        "eval_loss_before": trainer.eval_before, "eval_loss_after": eval_after,
        "adapter": str(run.adapter), "loss_plot": str(plot) if plot else None,
    }
    atomic_write(run.summary_file, (json.dumps(summary, indent=2) + "\n").encode())
    run.drop_checkpoints(recipe.training.save_every)
    log(format_summary(summary, report, run.path))
    return RunResult(run.path, True, summary)


def format_summary(s: dict[str, Any], report: TrainableReport, run_dir: Path) -> str:
    memory = "GPU max allocated" if s["device"] == "cuda" else "peak RSS"
    rate = s["tokens"] / s["train_seconds"] if s["train_seconds"] else 0.0
    before, after = s["eval_loss_before"], s["eval_loss_after"]
    lines = [
        "",
        "── summary " + "─" * 50,
        f"trainable params : {s['trainable_params']:,} of {s['total_params']:,} ({report.percent:.2f}%)",
        f"adapter size     : {human_bytes(s['adapter_bytes'])} (adapter_model.safetensors)",
        f"peak memory      : {s['peak_memory_mb'] / 1024:.2f} GiB ({memory} while training); whole process "
        f"{s['process_peak_rss_mb'] / 1024:.2f} GiB (VmHWM, file-backed mmap pages included)",
        f"steps / tokens   : {s['steps']} / {s['tokens']:,} ({rate:,.0f} tokens/s)",
        f"wall time        : {human_seconds(s['wall_seconds'])} (training {human_seconds(s['train_seconds'])})"
        if s.get("resumed_at_step") is None else
        f"wall time        : {human_seconds(s['wall_seconds'])} since the resume at step {s['resumed_at_step']} "
        f"(training {human_seconds(s['train_seconds'])} over the whole run)",
        f"eval loss        : {before:.4f} -> {after:.4f} (perplexity {math.exp(before):.2f} -> {math.exp(after):.2f})",
        f"run folder       : {run_dir} (adapter/, metrics.jsonl{', loss.png' if s['loss_plot'] else ''})",
    ]
    return "\n".join(lines)
