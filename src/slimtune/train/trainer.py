"""The training loop: AdamW, warmup + decay, gradient accumulation, clipping, eval, checkpoints.

Plain PyTorch, one step at a time (see :meth:`Trainer.train_step`)::

    micro-batches = next `gradient_accumulation_steps` batches
    loss = Σ token losses / number of label tokens in the whole step   (each micro-batch's share)
    backward per micro-batch → clip → optimizer.step → method hooks → scheduler.step → zero_grad

The loss is the mean over every label token of the step (not a mean of per-batch means), so an
accumulated step equals the same batch run at once. The trainer knows no method internals: the
optimizer's parameter groups come from :func:`slimtune.optim.training_param_groups` (a method's own
groups, LoRA+ or layer-wise rates), and after each update :func:`slimtune.lifecycle.after_optimizer_step`
runs what the active methods need (Delta-LoRA's W update). The trainer also owns both evaluations:
of the base model before training (adapters disabled) and of the fine-tune after it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from slimtune.distributed.checkpoint import (
    load_distributed_checkpoint,
    read_distributed_state,
    save_distributed_checkpoint,
)
from slimtune.distributed.context import DistContext
from slimtune.distributed.data import ShardedBatches
from slimtune.distributed.wrap import gradient_sync, unwrap
from slimtune.errors import InvalidFileError, TrainingDivergedError
from slimtune.lifecycle import after_optimizer_step, disable_adapters, method_param_groups
from slimtune.optim import make_optimizer, training_param_groups
from slimtune.perf.losses import router_aux_coef
from slimtune.train.batching import BatchIterator, real_tokens, rows_fingerprint
from slimtune.train.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from slimtune.train.losses import (
    autocast_context,
    chunked_loss_refusal,
    chunked_loss_works,
    evaluate_loss,
    label_tokens,
    loss_terms,
    to_device,
)
from slimtune.train.progress import MetricsLog, peak_memory_mb, reset_peak_memory
from slimtune.train.recipe import TrainingSection
from slimtune.train.schedule import make_scheduler
from slimtune.train.stop_request import StopRequest


class StepMetrics(TypedDict):
    """What one optimizer step reports (the start of its metrics-log row)."""

    loss: float
    lr: float
    grad_norm: float | None  # None without max_grad_norm
    tokens: int


@dataclass
class TrainerState:
    """What a checkpoint must restore besides tensors (kept JSON-friendly)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)
    peak_memory_mb: float = 0.0  # during training steps, over every process of the run that trained (this rank's)
    # the steps since the last metrics row (a row holds their mean loss and summed tokens, as HF logs): kept in a
    # checkpoint, so a run resumed inside a log_every window writes the row an uninterrupted run writes
    unlogged_losses: list[float] = field(default_factory=list)
    unlogged_tokens: int = 0


def build_optimizer(model: nn.Module, settings: TrainingSection) -> torch.optim.Optimizer:
    """``settings.optim`` (AdamW or its 8-bit / paged kinds) over the trainable parameters, grouped as
    :func:`slimtune.optim.training_param_groups` says."""
    groups = training_param_groups(model, settings.learning_rate, method_param_groups(model, settings.learning_rate),
                                   settings.loraplus_lr_ratio, settings.loraplus_lr_embedding,
                                   settings.layerwise_lr_decay)
    beta1, beta2 = settings.adam_betas  # two numbers (checked by TrainingSection)
    options = {}
    if "8bit" in settings.optim.lower():  # as a HF Trainer does with bitsandbytes: embedding tables keep fp32 moments
        options["full_precision"] = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return make_optimizer(settings.optim, groups, lr=settings.learning_rate, betas=(beta1, beta2),
                          eps=settings.adam_epsilon, weight_decay=settings.weight_decay, **options)


class Trainer:
    """Trains the trainable parameters of ``model`` on ``batches``; see the module docstring."""

    def __init__(self, model: nn.Module, batches: BatchIterator | ShardedBatches,
                 eval_rows: Sequence[dict[str, list[int]]], settings: TrainingSection, run_dir: Path,
                 device: torch.device, pad_id: int, config_snapshot: dict[str, Any] | None = None,
                 show_progress: bool = True, log: Callable[[str], None] = print, dist: DistContext | None = None,
                 strategy: str = "single") -> None:
        # Distributed (``dist``): ``model`` is the DDP wrapper or the FSDP2-sharded model (forward and backward
        # go through it); ``self.inner`` is the model itself (optimizer, evaluation, adapter files).
        self.model, self.batches, self.eval_rows = model, batches, eval_rows
        self.inner, self.dist, self.strategy = unwrap(model), dist, strategy
        self.is_main = dist is None or dist.is_main
        self.settings, self.run_dir, self.device, self.pad_id = settings, run_dir, device, pad_id
        self.show_progress, self.log = show_progress, log
        self.autocast = autocast_context(device, settings.mixed_precision)
        self.config_snapshot = config_snapshot or {}
        per_epoch = len(batches) if isinstance(batches, ShardedBatches) else \
            math.ceil(len(batches) / settings.gradient_accumulation_steps)
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch))
        warmup = settings.warmup_steps
        if warmup is None:
            warmup = math.ceil(settings.warmup_ratio * self.total_steps)  # transformers' get_warmup_steps
        if warmup >= self.total_steps and warmup and self.is_main:
            log(f"warning: the warmup ({warmup} steps) is not shorter than the run ({self.total_steps} steps): the "
                f"learning rate never reaches training.learning_rate ({settings.learning_rate:g}). Lower "
                "training.warmup_steps (or warmup_ratio), or train for more steps.")
        self.optimizer = build_optimizer(self.inner, settings)
        self.scheduler = make_scheduler(self.optimizer, settings.lr_scheduler, self.total_steps, warmup,
                                        settings.min_lr_ratio)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # wrappers (DDP, FSDP): the model's own forward
        self.loss_refusal = "distributed: the wrapped model's own forward" if dist is not None else \
            chunked_loss_refusal(model, settings.loss)
        self.chunked = self.loss_refusal is None
        self.aux_coef = router_aux_coef(self.inner)
        # evaluation runs the unwrapped model: decided once (the probe is a forward of its own)
        self.eval_chunked = self.chunked if dist is None else chunked_loss_works(self.inner, settings.loss)
        self.state = TrainerState()
        self.metrics = MetricsLog(run_dir, settings.report_to if self.is_main else [], run_config=self.config_snapshot)
        self._epoch_iter: Iterator | None = None
        self.resumed_at: int | None = None  # the step this process resumed at (None: it started the run)

    # ---- data -----------------------------------------------------------------------------------
    def _step_batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``count`` micro-batches for one optimizer step, moving on to the next epoch (a new order) when one
        runs out. A step never spans two epochs: an epoch's last step takes what is left of it (as transformers'
        Trainer does), so each row is seen once per epoch and an epoch is ``⌈batches / count⌉`` steps."""
        assert isinstance(self.batches, BatchIterator)  # sharded batches come a step at a time (train_step)
        micro: list[dict[str, torch.Tensor]] = []
        while len(micro) < count:
            if self._epoch_iter is None:
                self._epoch_iter = iter(self.batches)
            try:
                micro.append(next(self._epoch_iter))
            except StopIteration:
                self._epoch_iter = None
                if micro:
                    break
        return micro

    # ---- one optimizer step -----------------------------------------------------------------------
    def train_step(self) -> StepMetrics:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns its metrics.

        Distributed: this rank's micro-batches of the step; the label tokens are counted over every rank and
        micro-batch, and each rank's loss is scaled by the world size (DDP and FSDP average gradients), so the
        gradient is that of the mean over all label tokens of the step — as one process with the whole batch."""
        if isinstance(self.batches, ShardedBatches):
            micro = [to_device(b, self.device) for b in self.batches.next_step()]
        else:
            micro = [to_device(b, self.device) for b in self._step_batches(self.settings.gradient_accumulation_steps)]
        n_labels = sum(label_tokens(b) for b in micro)
        world = 1
        if self.dist is not None:
            n_labels, world = self.dist.sum_int(n_labels), self.dist.world_size
        total, aux_weight = 0.0, self.aux_coef / len(micro)
        for i, batch in enumerate(micro):
            with gradient_sync(self.model, enabled=i == len(micro) - 1):
                ce, aux = loss_terms(self.model, batch, self.autocast, self.chunked)
                loss = ce / max(n_labels, 1)
                # an MoE router's balancing loss: weighted as the model's own loss weighs it, averaged over the
                # micro-batches (and, by DDP/FSDP's gradient mean, over the ranks)
                balance = aux.float() * aux_weight if aux is not None and aux_weight else loss.new_zeros(())
                (loss * world + balance).backward()
            total += float(loss.detach()) + float(balance.detach()) / world
        if self.dist is not None:
            total = self.dist.sum_float(total)
        grad_norm = None
        if self.settings.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
            grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP: over all shards
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        after_optimizer_step(self.inner)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # (a rank's stand-in micro-batch at an epoch's short end has no labels, and no tokens of the run's)
        tokens = sum(real_tokens(b) for b in micro if label_tokens(b))
        if self.dist is not None:
            tokens = self.dist.sum_int(tokens)
        return {"loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}

    # ---- checkpoints ------------------------------------------------------------------------------
    def save(self, rng: dict[str, Any]) -> Path:
        """Checkpoint at the current step boundary; ``rng`` is the RNG state captured at that boundary. Trained
        weights that are no longer finite are never saved (a keep-last-N checkpoint would replace a good one)."""
        local_bad = any(not bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                        for p in self.model.parameters() if p.requires_grad)
        if local_bad if self.dist is None else self.dist.any(local_bad):
            raise self._diverged(f"step {self.state.step}: trained weights are inf or NaN")
        self.state.data = self.batches.state_dict()
        payload = {**vars(self.state), "total_steps": self.total_steps, "config": self.config_snapshot,
                   "eval_rows_sha256": self.eval_rows_sha256}
        if self.dist is not None:
            return save_distributed_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer,
                                               self.scheduler, rng, payload, self.settings.keep_checkpoints,
                                               self.dist, self.strategy)
        return save_checkpoint(self.run_dir, self.state.step, self.model, self.optimizer, self.scheduler,
                               rng, payload, self.settings.keep_checkpoints)

    def resume(self, path: Path) -> None:
        """Continue exactly where checkpoint ``path`` stopped (model, method state, optimizer, schedule, data,
        RNG). Everything is checked before anything changes: a failed resume leaves the model as it was."""
        if self.dist is not None:
            self._resume_distributed(path)
            return
        checkpoint = read_checkpoint(path)
        saved = checkpoint.state
        if saved["total_steps"] != self.total_steps:
            raise ValueError(f"checkpoint {path} was made for {saved['total_steps']} steps, this recipe "
                             f"has {self.total_steps}; resume with the same training settings.")
        self._check_eval_rows(saved)
        position = self.batches.state_dict()
        try:
            self.batches.load_state_dict(saved["data"])
        except (ValueError, TypeError, KeyError) as error:
            raise InvalidFileError(path / STATE_FILE, f"data: {error}", "data") from None
        try:
            rng = checkpoint.apply(self.model, self.optimizer, self.scheduler)
        except BaseException:
            self.batches.load_state_dict(position)  # a refused checkpoint leaves the data position too
            raise
        self._epoch_iter = None
        self._continue_from(saved, rng)

    def _resume_distributed(self, path: Path) -> None:
        """:meth:`resume` of a checkpoint written with ``torch.distributed.checkpoint`` (at any world size)."""
        assert self.dist is not None
        saved = read_distributed_state(path)  # the files and the settings first: a refused resume changes nothing
        if saved["total_steps"] != self.total_steps:
            raise ValueError(f"checkpoint {path} was made for {saved['total_steps']} steps, this run has "
                             f"{self.total_steps}; resume with the same training settings.")
        self._check_eval_rows(saved)
        try:
            self.batches.load_state_dict(saved["data"])
        except (ValueError, TypeError, KeyError) as error:
            raise InvalidFileError(path / STATE_FILE, f"data: {error}", "data") from None
        saved, rng = load_distributed_checkpoint(path, self.model, self.optimizer, self.scheduler, self.dist)
        self._continue_from(saved, rng)

    def _continue_from(self, saved: dict[str, Any], rng: Any) -> None:
        """Take the checkpoint's state, RNG and metrics position (after its tensors were applied)."""
        for key in ("step", "tokens", "train_seconds", "data", "evals"):
            setattr(self.state, key, saved[key])
        self.state.peak_memory_mb = saved.get("peak_memory_mb", 0.0)  # (checkpoints from before it was kept)
        self.state.unlogged_losses = list(saved.get("unlogged_losses", []))  # (and from before the window was)
        self.state.unlogged_tokens = saved.get("unlogged_tokens", 0)
        self.resumed_at = self.state.step
        set_rng_state(rng)
        if self.is_main:  # rank 0 writes the run's logs
            self.metrics.truncate_after(self.state.step, sum(e["step"] == self.state.step for e in self.state.evals))

    @property
    def peak_memory_mb(self) -> float:
        """Peak memory during training steps, those before a resume included (0 before any step)."""
        return self.state.peak_memory_mb

    @functools.cached_property
    def eval_rows_sha256(self) -> str:
        return rows_fingerprint(self.eval_rows)

    def _check_eval_rows(self, saved: dict[str, Any]) -> None:
        """Refuse a resume whose evaluation rows differ from the run's: its "before" and "after" losses would be
        measured on different data (checkpoints from before the fingerprint pass)."""
        then = saved.get("eval_rows_sha256", self.eval_rows_sha256)
        if then != self.eval_rows_sha256:
            raise ValueError(f"Cannot resume: the evaluation rows differ from the run's (fingerprint {then} then, "
                             f"{self.eval_rows_sha256} now). The eval data file, the template or the tokenizer "
                             "changed since the run started: restore them, or start a new run "
                             "(output.overwrite=true or another output.dir).")

    # ---- the loop ---------------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Evaluate the model as it is now (adapters on) and record the loss at the current step."""
        loss = evaluate_loss(self.inner, self.eval_rows, self.settings.eval_batch_size, self.pad_id, self.device,
                             self.settings.mixed_precision, self.settings.loss, self.eval_chunked)
        self._record_eval(loss)
        return loss

    def evaluate_base(self) -> float:
        """Evaluate the base model alone (adapters disabled): the "before" of a fresh run, at step 0."""
        with disable_adapters(self.inner):
            loss = evaluate_loss(self.inner, self.eval_rows, self.settings.eval_batch_size, self.pad_id, self.device,
                                 self.settings.mixed_precision, self.settings.loss, self.eval_chunked)
        self._record_eval(loss)
        return loss

    @property
    def eval_before(self) -> float | None:
        return self.state.evals[0]["eval_loss"] if self.state.evals else None

    def _record_eval(self, loss: float) -> None:
        self.state.evals.append({"step": self.state.step, "eval_loss": loss})
        self._write_row({"step": self.state.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))})

    def _write_row(self, row: dict[str, Any]) -> None:
        if self.is_main:  # rank 0 writes the run's logs
            self.metrics.write(row)

    def train(self) -> bool:
        """Run until ``total_steps``; return False if stopped early by Ctrl-C (a checkpoint is saved)."""
        settings = self.settings
        self.model.train()
        reset_peak_memory(self.device)
        window_tokens, window_start = 0, time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="training", unit="step",
                   disable=not (self.show_progress and self.is_main), dynamic_ncols=True)
        with StopRequest(bar.write if self.show_progress else self.log) as stop, bar:
            while self.state.step < self.total_steps:
                boundary_rng = rng_state()  # what a checkpoint at this boundary must restore
                if stop.requested if self.dist is None else self.dist.any(stop.requested):  # ranks stop together
                    path = self.checkpoint_here() or self.save(boundary_rng)  # a periodic one may be this very step
                    self.log(f"interrupted at step {self.state.step}/{self.total_steps}; checkpoint: {path}")
                    return False
                started = time.perf_counter()
                row = self.train_step()
                if not math.isfinite(row["loss"]):
                    raise self._diverged(f"step {self.state.step + 1}: the loss is {row['loss']}")
                self.state.step += 1
                self.state.tokens += row["tokens"]
                self.state.train_seconds += time.perf_counter() - started
                window_tokens += row["tokens"]
                self.state.unlogged_losses.append(row["loss"])
                self.state.unlogged_tokens += row["tokens"]
                memory = peak_memory_mb(self.device)
                self.state.peak_memory_mb = max(self.state.peak_memory_mb, memory)
                elapsed = time.perf_counter() - window_start
                rate = window_tokens / elapsed if elapsed > 0 else 0.0
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{rate:.0f}",
                                mem=f"{memory / 1024:.2f}G", refresh=False)
                bar.update(1)
                step = self.state.step
                if step % settings.log_every == 0 or step == self.total_steps:
                    losses = self.state.unlogged_losses
                    self._write_row({"step": step, **row, "loss": sum(losses) / len(losses),
                                     "tokens": self.state.unlogged_tokens, "tokens_per_s": rate, "peak_mem_mb": memory,
                                     "epoch": self._epochs_done(),
                                     "train_seconds": self.state.train_seconds})
                    self.state.unlogged_losses, self.state.unlogged_tokens = [], 0
                    window_tokens, window_start = 0, time.perf_counter()
                if settings.eval_every and step % settings.eval_every == 0 and step < self.total_steps:
                    loss = self.evaluate()  # (collective: every rank evaluates its share; rank 0 says it)
                    if self.is_main:
                        bar.write(f"step {step}: eval loss {loss:.4f}")
                    window_tokens, window_start = 0, time.perf_counter()  # tokens/s counts training only
                if settings.save_every and step % settings.save_every == 0 and step < self.total_steps:
                    self.save(rng_state())
                    window_tokens, window_start = 0, time.perf_counter()
            if self.checkpoint_here() is None:  # the finished training: a run stopped while it is finalized (the
                self.save(rng_state())  # last evaluation, the sample, the plot) resumes into finalizing it
        return True

    def _epochs_done(self) -> float:
        """Epochs done, fractional: micro-batches taken over the epoch's, as HF logs them (per rank)."""
        b = self.batches
        if isinstance(b, BatchIterator):
            return round(b.epoch + b.index / max(len(b), 1), 4)
        rows = b.batch_size * b.world_size  # a micro-batch of every rank
        return round(b.epoch + math.ceil(b.start / rows) / max(math.ceil(len(b.dataset) / rows), 1), 4)

    def _diverged(self, what: str) -> TrainingDivergedError:
        latest = latest_checkpoint(self.run_dir)
        kept = f" (the last checkpoint, {latest.name}, holds finite weights)" if latest is not None else ""
        return TrainingDivergedError(
            f"{what}: the training diverged, so it stops here and saves nothing non-finite{kept}. Lower "
            f"training.learning_rate (now {self.settings.learning_rate:g}), set training.max_grad_norm (now "
            f"{'null' if self.settings.max_grad_norm is None else self.settings.max_grad_norm}) or check the data, "
            "then start again with output.overwrite=true "
            "(a resume repeats the same steps).")

    def checkpoint_here(self) -> Path | None:
        """The checkpoint of the current step, if one was saved."""
        saved = latest_checkpoint(self.run_dir)
        return saved if saved is not None and saved.name == f"step-{self.state.step:06d}" else None
