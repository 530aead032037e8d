"""Cross-entropy from the last hidden states and the output weight, in chunks of tokens: the full
``(tokens, vocab)`` fp32 logits never exist (at 2048 tokens × 128,256 vocab they are 1 GiB, plus as
much again for their gradient).

For each chunk of ``C`` label tokens (``h`` ``(C, H)``, ``W`` ``(V, H)``, targets ``y``)::

    z    = (h Wᵀ + b) in fp32            (C, V)   the only vocabulary-sized buffer, freed per chunk
    loss = Σ logsumexp(z) − z[y]                  (one exp pass: softmax(z) is written into z on the way)
    dz   = softmax(z) − onehot(y)        (times 1/N for the mean)     computed right away, in place:
    dh   = dz W          dW += dzᵀ h     db += Σ dz                  stored until backward

so the forward does the three matmuls of forward + backward (the trick of Liger-Kernel's fused linear
cross-entropy) and backward only scales the stored gradients by ``dL/dloss``. Tokens whose label is
``ignore_index`` (-100) are skipped before any matmul. Matches ``F.cross_entropy(h Wᵀ + b, y,
ignore_index=-100)`` to fp32 rounding ("mean" of zero tokens is NaN, as there).

:func:`causal_lm_loss` runs a transformers causal LM's decoder and applies this to its output layer;
an output layer that is not a plain ``nn.Linear`` (a LoRA-wrapped or trainable-copy ``lm_head``) is
handled by checkpointing each chunk instead (same memory bound, one more matmul per chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "default_chunk_size", "chunked_cross_entropy", "chunked_head_cross_entropy",
           "causal_lm_loss", "LogitTransform", "logit_transform", "router_aux_coef"]

IGNORE_INDEX = -100
_CHUNK_BYTES = 256 << 20  # fp32 logits per chunk


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 256 MiB (512 tokens at 128,256)."""
    return max(16, _CHUNK_BYTES // (4 * vocab_size))


def _check(hidden: torch.Tensor, labels: torch.Tensor, reduction: str, chunk_size: int | None) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of tokens (or None for the default)")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: labels "
                         "must have the hidden states' shape without the last (hidden) dimension")


def _kept(labels: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions of label tokens, their labels) of the flattened labels; raises on out-of-range labels."""
    flat = labels.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)
    y = flat[idx]
    bad = (y < 0) | (y >= vocab)
    if bool(bad.any()):
        raise ValueError(f"label {int(y[bad][0])} is outside the vocabulary [0, {vocab}); mark positions without "
                         f"a target with ignore_index={ignore_index}")
    return idx, y


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``h Wᵀ + b`` before its loss: ``logits = cap · tanh(scale · z / cap)`` with
    ``softcap`` set (Gemma 2/3's ``final_logit_softcapping``), else ``scale · z`` (Cohere's ``logit_scale``,
    1 / Granite's ``logits_scaling``)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float | None]:
        """(the logits, d logits / d z: None for the identity), ``z`` overwritten."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is None:
            return z, (None if self.scale == 1.0 else self.scale)
        t = z.div_(self.softcap).tanh_()  # in z's buffer
        logits = t * self.softcap
        slope = t.square_().neg_().add_(1.0)  # 1 − tanh², in the same buffer
        return logits, slope.mul_(self.scale) if self.scale != 1.0 else slope

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The same, differentiable by autograd (for chunks recomputed in backward)."""
        z = z * self.scale if self.scale != 1.0 else z
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap


IDENTITY = LogitTransform()


def _softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax of ``z`` over its last dimension, written into ``z``; logsumexp ``(C, 1)``): one pass of ``exp``
    and no second vocabulary-sized buffer (``torch.logsumexp`` allocates one, and softmax would need a second
    ``exp``). Logits of -inf (masked entries) are fine; a row without a finite logit gives NaN, as F.cross_entropy."""
    m = z.amax(-1, keepdim=True)
    total = z.sub_(m).exp_().sum(-1, keepdim=True)
    return z.div_(total), total.log_().add_(m)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, reduction, transform):
        h2 = hidden.reshape(-1, hidden.shape[-1])  # (T, H)
        idx, y = _kept(labels, ignore_index, weight.shape[0])
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h2.dtype
        w = weight.to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # logits and sums: at least fp32
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h2) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        n = idx.numel()
        scale = 1.0 / n if reduction == "mean" and n else 1.0
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, n, chunk_size):
                rows, yc = idx[start:start + chunk_size], y[start:start + chunk_size]
                hc = h2.index_select(0, rows).to(dtype)  # (C, H)
                z = (hc @ w.T).to(acc)  # (C, V)
                if bias is not None:
                    z += bias.to(acc)
                z, slope = transform.apply(z)
                zy = z.gather(1, yc[:, None])  # (C, 1), before z turns into the softmax
                dz, lse = _softmax_(z)
                total += (lse - zy).sum()  # row by row: two large sums would cancel in fp32 at large logits
                if need_h or need_w or need_b:
                    dz[torch.arange(len(yc), device=dz.device), yc] -= 1.0
                    if slope is not None:  # through the transform: d(logits)/d(h Wᵀ + b)
                        dz.mul_(slope)
                    if scale != 1.0:
                        dz.mul_(scale)
                    if grad_b is not None:
                        grad_b += dz.sum(0)
                    dz = dz.to(dtype)
                    if grad_h is not None:
                        grad_h.index_copy_(0, rows, (dz @ w).to(h2.dtype))
                    if grad_w is not None and dtype == acc:
                        grad_w.addmm_(dz.T, hc)
                    elif grad_w is not None:  # half-precision matmul, summed over chunks in fp32
                        grad_w += dz.T @ hc
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.shapes = (hidden.shape, weight.dtype, None if bias is None else bias.dtype)
        return total / n if reduction == "mean" else total  # mean of no tokens: 0/0 = NaN, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hidden_shape, w_dtype, b_dtype = ctx.shapes
        dh = (grad_h * grad_loss.to(grad_h.dtype)).reshape(hidden_shape) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        db = (grad_b * grad_loss).to(b_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_size: int | None = None,
                          ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                          transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """``F.cross_entropy(transform(hidden @ weight.T + bias), labels)`` without materializing the logits.

    hidden ``(..., H)``; weight ``(V, H)`` (an output layer's / tied embedding's weight); labels
    ``hidden.shape[:-1]`` (already shifted for next-token prediction). ``chunk_size`` tokens per chunk
    (default :func:`default_chunk_size`). ``reduction`` "mean" (over label tokens) or "sum".
    """
    _check(hidden, labels, reduction, chunk_size)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the output weight {tuple(weight.shape)} "
                         "(expected (vocab, hidden))")
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    if not torch.is_grad_enabled():  # (inside the Function grad mode is off: it would build gradients all the same)
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, ignore_index, reduction, transform)


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hc: torch.Tensor, yc: torch.Tensor,
                transform: LogitTransform) -> torch.Tensor:
    z = head(hc)  # (C, V)
    return F.cross_entropy(transform(z if z.dtype == torch.float64 else z.float()), yc, reduction="sum")


def chunked_head_cross_entropy(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                               labels: torch.Tensor, vocab_size: int, chunk_size: int | None = None,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """The same loss for any output module ``head`` (``(C, H) → (C, V)``): each chunk's logits are
    recomputed in backward (activation checkpointing), so at most one chunk of logits lives at a time."""
    _check(hidden, labels, reduction, chunk_size)
    chunk = chunk_size or default_chunk_size(vocab_size)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    idx, y = _kept(labels, ignore_index, vocab_size)
    # no label tokens: the head's loss on no tokens (0), which keeps the graph to a trained head's parameters
    total = _chunk_loss(head, h2[:0], y[:0], transform) if idx.numel() == 0 else h2.new_zeros(
        (), dtype=torch.float64 if h2.dtype == torch.float64 else torch.float32)
    for start in range(0, idx.numel(), chunk):
        hc = h2.index_select(0, idx[start:start + chunk])
        yc = y[start:start + chunk]
        total = total + (checkpoint(_chunk_loss, head, hc, yc, transform, use_reentrant=False)
                         if torch.is_grad_enabled() else _chunk_loss(head, hc, yc, transform))
    return total / idx.numel() if reduction == "mean" else total


def router_aux_coef(model: nn.Module) -> float:
    """The weight of a mixture-of-experts model's router load-balancing loss in its training objective, as its
    own forward adds it (``output_router_logits`` on: Mixtral, Qwen-MoE, OLMoE …); 0 when it adds none."""
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


# Model types whose ``logits_scaling`` multiplies the logits (Granite and the others divide them by it)
MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax"})


def logit_transform(model: nn.Module) -> LogitTransform:
    """What ``model``'s forward does to its output layer's result, from its (text) config (see LogitTransform):
    Cohere's ``logit_scale``, Granite's ``logits_scaling`` (HyperCLOVAX multiplies by it), Falcon-H1's
    ``lm_head_multiplier``, Gemma's ``final_logit_softcapping``. Others are caught by the trainer's probe."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text = get_text_config() if get_text_config is not None else config
    scale = float(getattr(text, "logit_scale", None) or 1.0) * float(getattr(text, "lm_head_multiplier", None) or 1.0)
    scaling = float(getattr(text, "logits_scaling", None) or 1.0)
    scale = scale * scaling if getattr(text, "model_type", None) in MULTIPLYING_LOGITS_SCALING else scale / scaling
    cap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


def _decoder_of(model: nn.Module) -> nn.Module | None:
    """The module giving ``model``'s last hidden states: ``get_decoder()``, or the base model where that is the
    model itself (GPT-2, GPT-NeoX, Falcon, BLOOM under transformers 4). None for an encoder-decoder model (its
    decoder needs the encoder's output) or when there is no such module."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder giving the last hidden states, the output layer) where the chunked loss splits ``model``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    decoder = _decoder_of(model)
    if head is None or decoder is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings / decoder to split the loss at; "
                         "use the model's own loss (model(**batch).loss)")
    if model._forward_pre_hooks or model._forward_hooks:
        raise ValueError("the model has forward hooks (e.g. prompt tuning) that running its decoder directly would "
                         "bypass; use the model's own loss (model(**batch).loss)")
    return decoder, head


def _hidden_states(decoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = decoder(**inputs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def split_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (fp32) as :func:`causal_lm_loss` computes them, all at once: the decoder's hidden states
    through the output layer and :func:`logit_transform`. For checking them against the model's own."""
    decoder, head = _split(model)
    z = head(_hidden_states(decoder, inputs))
    return logit_transform(model)(z if z.dtype == torch.float64 else z.float())


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None,
                   reduction: str = "sum", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token cross-entropy of a transformers causal LM on ``batch`` (``input_ids``, ``labels``, …)
    without full-vocabulary logits: ``model.get_decoder()`` gives the hidden states, the output layer's
    weight (``model.get_output_embeddings()``) the logits chunk by chunk.

    Position t is scored on ``labels[:, t + 1]`` (the shift is done here). ``reduction="sum"`` (the
    trainer divides by the step's label count) or ``"mean"``.
    """
    decoder, head = _split(model)
    config = getattr(model, "config", None)
    transform = logit_transform(model)
    labels = batch["labels"]
    hidden = _hidden_states(decoder, {k: v for k, v in batch.items() if k != "labels"})  # (B, S, H)
    # shift by padding the labels (a view of hidden, no copy): position t is scored on labels[t + 1]
    shifted = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)), dim=1)
    if type(head) is nn.Linear:
        return chunked_cross_entropy(hidden, head.weight, shifted, head.bias, chunk_size, ignore_index, reduction,
                                     transform)
    vocab = config.vocab_size if config is not None else head(hidden[:1, :1]).shape[-1]
    return chunked_head_cross_entropy(hidden, head, shifted, vocab, chunk_size, ignore_index, reduction, transform)
