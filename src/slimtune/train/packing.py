"""Whether a model keeps packed examples apart, found by running it (``data.packing: true``).

Packed rows carry ``position_ids`` that restart at every example and no ``attention_mask``
(:func:`slimtune.train.batching.collate`): transformers then builds a block-diagonal causal mask for the
models whose mask code reads restarting positions (Llama, Qwen, Mistral, GPT-2, ...). Others (OPT, MPT)
take positions from the attention mask or ignore ``position_ids``, so packed examples would attend to each
other. Which is which depends on the model class and the installed transformers, so it is probed on the model
itself, on two short examples packed into one row: the second example's logits must not change when the first
one's tokens do, and must be those of the second example alone.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.core.modules import evaluating
from slimtune.train.batching import collate
from slimtune.train.tokenization import pack_rows

__all__ = ["packing_refusal"]

PROBE_TOKENS = 8  # per example: a negligible forward even for a large model
LEAK_TOLERANCE = 1e-4  # the second example's logits, relative to their largest: the same computation, other tokens
ALONE_TOLERANCE = 2e-2  # against the example alone: a different matmul shape rounds differently (bf16 on a GPU)


def _tokens(vocab: int, start: int) -> list[int]:
    return [(start + 7919 * i) % vocab for i in range(PROBE_TOKENS)]


def packing_refusal(model: nn.Module, device: torch.device) -> str | None:
    """Why ``model`` cannot train on packed rows, or None when packed examples stay apart. ``model`` may be
    wrapped (DDP, FSDP: every rank runs the same probe)."""
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 2
    second = {"input_ids": _tokens(vocab, 11)}
    # eval mode and a forked RNG: the run's random stream is left alone
    with evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        packed = []
        for start in (3, 5):  # the first example's tokens change, its length does not
            first = {"input_ids": _tokens(vocab, start)}
            (row,) = pack_rows([{**first, "labels": first["input_ids"]}, {**second, "labels": second["input_ids"]}],
                               2 * PROBE_TOKENS)
            batch = collate([row], pad_id=0)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            packed.append(model(**inputs, use_cache=False).logits[0, PROBE_TOKENS:].float())
        ids = torch.tensor([second["input_ids"]], device=device)
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()
    scale = max(float(alone.abs().max()), 1.0)
    leak = float((packed[0] - packed[1]).abs().max())
    name = type(getattr(model, "module", model)).__name__
    if not leak <= LEAK_TOLERANCE * scale:
        return (f"{name} lets packed examples attend to each other (its attention does not follow the restarting "
                f"position_ids: an example's logits changed by {leak:.3g} with the tokens of the example before it)")
    off = float((packed[0] - alone).abs().max())
    if not off <= ALONE_TOLERANCE * scale:
        return (f"{name} does not compute a packed example as it computes it alone (logits {off:.3g} apart: "
                f"its positions do not restart at each example)")
    return None
