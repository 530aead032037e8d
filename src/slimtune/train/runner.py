"""`slimtune train` end to end: recipe → data → model (→ 4-bit) → method → train → adapter + report.

Every input is checked before the run folder is created (the output folder is writable, the data
loads, the model loads), so a bad recipe leaves nothing behind. The run folder then holds
``recipe.yaml`` (the resolved recipe), ``metrics.jsonl``, ``loss.png``, ``checkpoints/``,
``adapter/`` (the final adapter, PEFT format) and ``summary.json`` (written last: the run finished).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from slimtune.inject import inject
from slimtune.io import atomic_folder, atomic_write, save_adapter
from slimtune.report import trainable_parameters
from slimtune.train.checkpoint import latest_checkpoint
from slimtune.train.progress import METRICS, human_bytes, human_seconds, plot_loss
from slimtune.train.quantize import apply_quantization
from slimtune.train.recipe import Recipe, RecipeError

SUMMARY = "summary.json"
RECIPE_COPY = "recipe.yaml"


@dataclass
class RunResult:
    run_dir: Path
    finished: bool
    summary: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"model.device: {name!r} asked for, but no CUDA GPU is available; use 'auto' or 'cpu'.")
    return device


def check_writable(folder: Path) -> None:
    """Raise unless ``folder`` exists as a writable folder or can be created (nothing is left behind)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RecipeError(f"output.dir: cannot create {folder}: {probe} is a file, not a folder; "
                          "choose another output.dir.")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as error:
        raise RecipeError(f"output.dir: {probe} is not writable ({error.strerror}); "
                          "choose another output.dir.") from None


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in (RECIPE_COPY, METRICS, SUMMARY, "checkpoints"))


def check_run_dir(recipe: Recipe, resume: bool) -> Path | None:
    """Validate the run folder for a new run or a resume; return the checkpoint to resume from."""
    run_dir = recipe.output_dir
    check_writable(run_dir)
    if resume:
        if (run_dir / SUMMARY).is_file():
            raise RecipeError(f"run {run_dir} already finished ({SUMMARY} exists); nothing to resume.")
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise RecipeError(f"--resume: {run_dir} has no checkpoint to resume from; start the run without --resume.")
        return checkpoint
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not _is_run_folder(run_dir):
            raise RecipeError(f"output.dir: {run_dir} exists and is not a slimtune run folder; "
                              "use a new or empty folder.")
        if not recipe.output.overwrite:
            raise RecipeError(f"output.dir: {run_dir} already holds a run. Continue it with --resume, replace it "
                              "with output.overwrite=true, or pick another output.dir=...")
    return None


def _comparable(recipe: Recipe) -> dict[str, Any]:
    """The recipe parts a resumed run must share with the original (output and demo may differ)."""
    data = recipe.to_dict()
    return {k: data[k] for k in ("model", "method", "quantization", "data", "training")}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def _checkpoint_config(checkpoint: Path | None) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    return json.loads((checkpoint / "trainer_state.json").read_text()).get("config", {})


def enable_gradient_checkpointing(model: Any, mode: bool | str) -> None:
    """Checkpoint every decoder layer (slimtune.checkpointing); ``"offload"`` keeps layer inputs on the CPU."""
    from slimtune.checkpointing import checkpoint_layers

    checkpoint_layers(model, offload=mode == "offload")


def load_data(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """(train examples, eval examples) as the data section says."""
    from slimtune.train.data import load_examples

    data = recipe.data
    separate = data.eval_dataset is not None
    train = load_examples(data.dataset, split="all" if separate else "train",
                          validation_fraction=data.validation_fraction, max_examples=data.max_train_examples)
    evals = load_examples(data.eval_dataset if separate else data.dataset, split="all" if separate else "validation",
                          validation_fraction=data.validation_fraction, max_examples=data.max_eval_examples)
    return train, evals


def run_recipe(recipe: Recipe, resume: bool = False, show_progress: bool = True,
               log: Callable[[str], None] = print, stream: TextIO | None = None) -> RunResult:
    """Train as ``recipe`` says; see the module docstring for what the run folder holds."""
    from slimtune.train.batching import BatchIterator
    from slimtune.train.generation import generate_text
    from slimtune.train.models import load_model_and_tokenizer
    from slimtune.train.tokenization import tokenize_examples
    from slimtune.train.trainer import Trainer, evaluate_loss

    wall_start = time.perf_counter()
    checkpoint = check_run_dir(recipe, resume)
    run_dir = recipe.output_dir
    device = resolve_device(recipe.model.device)
    train_examples, eval_examples = load_data(recipe)
    log(f"data: {len(train_examples)} training and {len(eval_examples)} evaluation examples "
        f"from {recipe.data.dataset!r}")

    model, tokenizer = load_model_and_tokenizer(recipe.model.name_or_path, dtype=recipe.model.dtype, device=device,
                                                allow_pickle=recipe.model.allow_pickle,
                                                tokenizer_name_or_path=recipe.model.tokenizer)
    quant = apply_quantization(model, recipe.quantization)
    if quant:
        log(quant)
    data = recipe.data
    train_rows = tokenize_examples(train_examples, tokenizer, data.max_seq_length, data.packing, data.use_chat_template)
    eval_rows = tokenize_examples(eval_examples, tokenizer, data.max_seq_length, False, data.use_chat_template)
    stats = train_rows.stats
    log(f"tokens: {stats.n_tokens:,} in {stats.n_sequences} training rows of at most {data.max_seq_length} "
        f"({stats.n_truncated} examples truncated, {stats.n_dropped} dropped); {len(eval_rows)} evaluation rows")
    saved_config = _checkpoint_config(checkpoint)
    if saved_config is not None:
        changed = _differences(saved_config, _comparable(recipe))
        if changed:
            raise RecipeError(f"--resume: the recipe differs from the one {run_dir} was started with: "
                              f"{'; '.join(changed[:6])}. Resume with the same recipe and overrides.")

    # "Before" is the base model itself, measured before any adapter exists (nothing is written yet).
    settings, demo = recipe.training, recipe.demo
    demo_prompt = demo.prompt or eval_examples[0]["prompt"]
    eval_before = None
    if checkpoint is None:
        eval_before = evaluate_loss(model, eval_rows.rows, settings.eval_batch_size, tokenizer.pad_token_id, device,
                                    settings.mixed_precision, settings.loss)
        log(f"eval loss of the base model: {eval_before:.4f}")
        if demo.enabled:
            log(f"\n── sample prompt ──\n{demo_prompt}\n── base model ──")
            generate_text(model, tokenizer, demo_prompt, demo.max_new_tokens, data.use_chat_template, stream)

    random.seed(settings.seed)
    torch.manual_seed(settings.seed)  # the adapter's initial weights
    inject(model, recipe.method)
    if recipe.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, recipe.model.gradient_checkpointing)
    model.config.use_cache = False  # training never reuses a KV cache
    log(str(trainable_parameters(model)))

    batches = BatchIterator(train_rows, settings.batch_size, seed=settings.seed, pad_id=tokenizer.pad_token_id)
    trainer = Trainer(model, batches, eval_rows, settings, run_dir, device, tokenizer.pad_token_id,
                      config_snapshot=_comparable(recipe), show_progress=show_progress, log=log)

    # Every input is valid (the method fits the model too): from here on the run folder is written.
    if not resume and run_dir.exists() and _is_run_folder(run_dir):
        shutil.rmtree(run_dir)  # output.overwrite=true (check_run_dir refused otherwise)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write(run_dir / RECIPE_COPY, recipe.to_yaml().encode())

    if checkpoint is not None:
        trainer.resume(checkpoint)
        eval_before = trainer.state.evals[0]["eval_loss"]
        log(f"resumed from {checkpoint} (step {trainer.state.step}/{trainer.total_steps})")
    else:
        trainer.record_eval(eval_before)

    log(f"training {trainer.total_steps - trainer.state.step} steps on {device.type} ...")
    if not trainer.train():
        log(f"resume with: slimtune train {recipe.name if recipe.name != 'recipe' else '<recipe>'} --resume "
            f"(same overrides; the run folder is {run_dir})")
        return RunResult(run_dir, False, {})

    adapter_dir = _save_final_adapter(model, run_dir)  # first: the result is safe whatever happens next
    eval_after = trainer.evaluate()
    if demo.enabled:
        log("── after fine-tuning ──")
        generate_text(model, tokenizer, demo_prompt, demo.max_new_tokens, data.use_chat_template, stream)
    plot = plot_loss(run_dir) if recipe.output.plot else None
    report = trainable_parameters(model)
    summary = {
        "steps": trainer.state.step, "tokens": trainer.state.tokens,
        "trainable_params": report.trainable, "total_params": report.total, "adapter_bytes": report.adapter_bytes,
        "peak_memory_mb": round(trainer.peak_memory_mb, 1), "device": device.type,
        "train_seconds": round(trainer.state.train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
        "eval_loss_before": eval_before, "eval_loss_after": eval_after,
        "adapter": str(adapter_dir), "loss_plot": str(plot) if plot else None,
    }
    atomic_write(run_dir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    log(format_summary(summary, report, run_dir))
    return RunResult(run_dir, True, summary)


def _save_final_adapter(model: Any, run_dir: Path) -> Path:
    """``<run>/adapter`` written whole into a temp folder, then renamed into place."""
    final = run_dir / "adapter"
    with atomic_folder(final) as tmp:
        save_adapter(model, tmp)
    return final


def format_summary(s: dict[str, Any], report: Any, run_dir: Path) -> str:
    import math

    memory = "GPU max allocated" if s["device"] == "cuda" else "peak RSS"
    rate = s["tokens"] / s["train_seconds"] if s["train_seconds"] else 0.0
    before, after = s["eval_loss_before"], s["eval_loss_after"]
    lines = [
        "",
        "── summary " + "─" * 50,
        f"trainable params : {s['trainable_params']:,} of {s['total_params']:,} ({report.percent:.2f}%)",
        f"adapter size     : {human_bytes(s['adapter_bytes'])} (adapter_model.safetensors)",
        f"peak memory      : {s['peak_memory_mb'] / 1024:.2f} GiB ({memory} while training)",
        f"steps / tokens   : {s['steps']} / {s['tokens']:,} ({rate:,.0f} tokens/s)",
        f"wall time        : {human_seconds(s['wall_seconds'])} (training {human_seconds(s['train_seconds'])})",
        f"eval loss        : {before:.4f} -> {after:.4f} (perplexity {math.exp(before):.2f} -> {math.exp(after):.2f})",
        f"run folder       : {run_dir} (adapter/, metrics.jsonl{', loss.png' if s['loss_plot'] else ''})",
    ]
    return "\n".join(lines)
