"""Text generation for the demo and `slimtune generate`: the prompt in the training template, greedy
decoding, tokens streamed to the terminal as they come."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from slimtune.core.modules import evaluating
from slimtune.methods.prompts import active_prompt
from slimtune.train.examples import is_text_example
from slimtune.train.templates import encode_prompt, encode_texts


def text_opening(text: str, max_chars: int = 200) -> str:
    """The start of a plain-text example to continue in a demo: its first half, at most ``max_chars``
    characters, cut after a space where there is one (so the model continues a word boundary)."""
    head = text[: min(max_chars, max(1, len(text) // 2))]
    cut = head.rstrip().rfind(" ")
    return head[:cut] if cut > 0 else head


@dataclass(frozen=True)
class SamplePrompt:
    """The prompt of a run's sample generations: a user turn, rendered in the training template, or (``raw``)
    the opening of a plain text, continued as is."""

    text: str
    raw: bool = False
    system: str | None = None  # the example's system prompt, rendered as training rendered it


def sample_prompt(given: str | None, example: Mapping[str, Any]) -> SamplePrompt:
    """The recipe's ``demo.prompt`` (``given``), else ``example``'s prompt, or its text's opening; raw when
    ``example`` (the first evaluation example) is plain text, since the model then learns text, not turns."""
    raw = is_text_example(example)
    if given:
        return SamplePrompt(given, raw)
    if raw:
        return SamplePrompt(text_opening(example["text"]), raw)
    return SamplePrompt(example["prompt"], raw, example.get("system") or None)


def prompt_ids(tokenizer: Any, prompt: str, use_chat_template: bool | None = None, raw: bool = False,
               system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` (after the ``system`` prompt, if any) rendered exactly as training renders an
    example's prompt part; ``raw``: the text as is, as training reads a plain-text example (the tokenizer's BOS
    where it adds one, no template)."""
    if raw:
        if system:
            raise ValueError("a system prompt needs a template: drop --raw, or put the system text in the prompt.")
        return encode_texts([prompt], tokenizer, end=False)[0]
    return encode_prompt({"prompt": prompt, "system": system} if system else prompt, tokenizer, use_chat_template)


def position_limit(config: Any) -> int | None:
    """How many positions the model has (absolute position tables end there), if its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def virtual_positions(model: Any) -> int:
    """Positions the active prompt-learning adapter takes before the real tokens (its virtual tokens, or its
    prefix: the real tokens' positions start after them); 0 without one."""
    prompt = active_prompt(model)
    return 0 if prompt is None else prompt[1].num_virtual_tokens


def positions_text(limit: int, virtual: int) -> str:
    """``"the model's 1,024 positions"``, less an adapter's virtual tokens when it has some."""
    return f"the model's {limit:,} positions" + \
        (f" less the {virtual:,} its prompt-learning adapter puts first ({limit - virtual:,} left)" if virtual else "")


def check_length(model: Any, tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that is empty or, with the tokens to write, longer than the model's positions (less those
    an active prompt-learning adapter takes)."""
    if tokens == 0:
        raise ValueError("the prompt is empty (and the tokenizer adds no BOS token): give some text to continue.")
    limit, virtual = position_limit(getattr(model, "config", None)), virtual_positions(model)
    if limit is not None and virtual + tokens + max_new_tokens > limit:
        raise ValueError(f"the prompt's {tokens:,} tokens and --max-new-tokens {max_new_tokens:,} exceed "
                         f"{positions_text(limit, virtual)}: shorten the prompt or lower --max-new-tokens.")


class _StreamTo(TextStreamer):
    """transformers' TextStreamer, writing to a given stream rather than always to stdout."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and every end token of the model's generation config
    (an instruct model's end of turn, such as Llama 3's ``<|eot_id|>``, is often not the tokenizer's EOS)."""
    stops: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for token in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(token, int) and token not in stops:
                stops.append(token)
    return stops


@torch.no_grad()
def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
                  use_chat_template: bool | None = None, stream: TextIO | None = None,
                  temperature: float = 0.0, silent: bool = False, raw: bool = False, system: str | None = None) -> str:
    """Continue ``prompt`` (after ``system``, in the training template, or as plain text when ``raw``); greedy when
    ``temperature`` is 0 (the same text on every run). A sequence-to-sequence model (T5, BART) reads the prompt
    as its encoder input, as the tokenizer encodes it, and writes its answer.

    Tokens are written to ``stream`` (default: the current ``sys.stdout``) as they are generated,
    unless ``silent``. Returns the new text.
    """
    stream = None if silent else (stream or sys.stdout)
    device = next(model.parameters()).device
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    tokens = tokenizer(prompt)["input_ids"] if encoder_decoder else \
        prompt_ids(tokenizer, prompt, use_chat_template, raw, system)
    check_length(model, len(tokens), 0 if encoder_decoder else max_new_tokens)  # encoder: its own positions
    ids = torch.tensor([tokens], device=device, dtype=torch.long)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with evaluating(model):
        # The 4-bit model itself: its layers decode each weight into a reused buffer per token. A dequantized
        # copy decodes ~1.7x faster on a CPU (SmolLM2-135M, 64 tokens: 6.5 s vs 10.8 s) but holds every weight
        # in fp32 beside the model (+0.4 GiB peak for the demo), so none is made.
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer),
            streamer=_StreamTo(tokenizer, stream) if stream is not None else None,
            # the model's generation_config may ask for sampling (top_p ...): greedy means greedy
            top_p=None, top_k=None, **sampling,
        )
    return tokenizer.decode(out[0] if encoder_decoder else out[0, ids.shape[1]:], skip_special_tokens=True)
