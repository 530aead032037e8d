"""How the trainer computes a batch's loss, and evaluates a model: autocast, the chunked cross-entropy or the
model's own loss (decided once by a probe), label-token counts, and the mean per-token loss over rows."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.core.modules import evaluating
from slimtune.perf.losses import causal_lm_loss, router_aux_coef, split_logits
from slimtune.train.batching import collate
from slimtune.train.tokenization import IGNORE_INDEX


def autocast_context(device: torch.device, mixed_precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on a GPU with ``auto``/``bf16``; fp32 on CPU unless ``bf16`` is asked for
    (CPUs without native bf16, like AVX2-only ones, run bf16 matmuls tens of times slower)."""
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


PROBE_TOKENS = 16  # the probe's sequence: a few predictions, a negligible forward even for a large model
LOGIT_TOLERANCE = 2e-2  # of the largest logit: bf16 rounding passes, a missed scale or cap does not


def chunked_loss_refusal(model: nn.Module, mode: str) -> str | None:
    """Why :func:`slimtune.losses.causal_lm_loss` (logits chunk by chunk, never all at once) is not used for
    ``model``; None when it is.

    ``auto`` uses it where it applies (plain decoder + output layer, no forward hooks such as prompt
    tuning's) and where, on a short probe sequence, it gives the model's own loss: a forward that does
    something to its logits the chunked loss does not know of is caught there. ``chunked`` insists (the
    reason is raised as a ValueError), ``full`` never uses it.
    """
    if mode == "full":
        return "training.loss: full"
    if router_aux_coef(model):
        reason = ("the model adds its router load-balancing loss to the cross-entropy (config.output_router_logits), "
                  "which the chunked loss leaves out; use training.loss: full or auto")
        if mode == "chunked":
            raise ValueError(reason)
        return reason
    head = getattr(model, "get_output_embeddings", lambda: None)()
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or getattr(head, "out_features", 0) or 2)
    probe = (torch.arange(PROBE_TOKENS) * 7919 % vocab).to(next(model.parameters()).device)[None]
    try:  # eval mode and a forked RNG leave the run's random stream alone
        with evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            split = split_logits(model, {"input_ids": probe})
            own = model(input_ids=probe, use_cache=False).logits.float()
        # compared logit by logit, relative to their size: a scale the split misses changes every logit by the same
        # factor even where small logits hardly move the loss (a random-weight model), yet every gradient
        difference = float((split - own).abs().max()) if split.shape == own.shape else float("inf")
        if not difference <= LOGIT_TOLERANCE * max(float(own.abs().max()), 1e-3):
            raise ValueError(f"the chunked loss's logits differ from {type(model).__name__}'s own by up to "
                             f"{difference:.3g} (largest logit {float(own.abs().max()):.3g}) on a probe sequence: its "
                             "forward changes the logits in a way the chunked loss does not know of; use "
                             "training.loss: full")
        return None
    except ValueError as why:
        if mode == "chunked":
            raise
        return str(why)


def chunked_loss_works(model: nn.Module, mode: str) -> bool:
    """Whether the chunked loss is used for ``model`` (see :func:`chunked_loss_refusal`)."""
    return chunked_loss_refusal(model, mode) is None


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], autocast, chunked: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over the label tokens of ``batch`` (fp32)."""
    return loss_terms(model, batch, autocast, chunked)[0]


def loss_terms(model: nn.Module, batch: dict[str, torch.Tensor], autocast,
               chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(:func:`loss_sum`, the router load-balancing loss the forward returned, unweighted; None without one)."""
    if chunked:
        with autocast():
            return causal_lm_loss(model, batch, reduction="sum", ignore_index=IGNORE_INDEX).float(), None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with autocast():
        out = model(**inputs, use_cache=False)
    logits = out.logits  # (batch, seq, vocab)
    # Prompt tuning and P-tuning put their virtual tokens before the input: their logits come first and
    # predict nothing of the text (PEFT gives them the label -100), so the text's positions are the last ones.
    logits = logits[:, logits.shape[1] - batch["labels"].shape[1]:]
    labels = batch["labels"][:, 1:]  # token t is predicted from the tokens before it
    keep = labels != IGNORE_INDEX  # only label positions: the prompt's logits would be a large dead copy
    aux = getattr(out, "aux_loss", None)
    return F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum"), aux


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, rows: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int,
                  device: torch.device, mixed_precision: str = "auto", loss: str = "auto",
                  chunked: bool | None = None) -> float:
    """Mean per-token loss of ``model`` on tokenized ``rows`` (dataset order, no dropout). ``chunked``: the
    decision of :func:`chunked_loss_works` for ``model`` and ``loss`` when the caller already made it."""
    autocast = autocast_context(device, mixed_precision)
    if chunked is None:
        chunked = chunked_loss_works(model, loss)
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(rows[start:start + batch_size], pad_id), device)
            total += float(loss_sum(model, batch, autocast, chunked))
            count += label_tokens(batch)
    if count == 0:
        raise ValueError("the evaluation set has no label tokens; check the data and max_seq_length.")
    return total / count
