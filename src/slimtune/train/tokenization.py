"""Tokenize normalized examples for causal-LM fine-tuning: prompt masking, truncation, packing.

Each row is ``{"input_ids": [...], "labels": [...]}`` with ``labels[i] = -100`` on prompt tokens
(transformers ignores -100 in the loss, and shifts labels itself), so the loss covers the response
and its EOS only; in a ``train_all_turns`` example (ShareGPT) every assistant turn is labelled, and in a
plain-text example every token.
Packed rows also carry ``position_ids`` that restart at 0 for each example: transformers (>= 4.50)
reads restarting positions as packed sequences and, when no 2-D ``attention_mask`` is passed, builds
a block-diagonal causal mask, so packed examples do not see each other
(:func:`slimtune.train.batching.collate` relies on this).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from slimtune.train.examples import is_text_example
from slimtune.train.templates import encode_conversation, encode_examples, encode_texts

IGNORE_INDEX = -100


@dataclass
class TokenStats:
    """What tokenization did, for logs and reports."""

    n_examples: int = 0  # examples given
    n_truncated: int = 0  # examples cut at max_length, kept (their EOS is lost, some response kept)
    n_dropped: int = 0  # examples longer than max_length whose prompt alone fills it: left out
    n_sequences: int = 0  # rows produced (fewer than examples when packing)
    n_tokens: int = 0  # tokens in all rows (before padding)
    n_label_tokens: int = 0  # tokens that carry a loss (response + EOS)
    max_length: int = 0
    packing: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenizedDataset:
    """A list of token rows plus the :class:`TokenStats` of how they were made."""

    rows: list[dict[str, list[int]]]
    stats: TokenStats = field(default_factory=TokenStats)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return iter(self.rows)


def pack_rows(rows: Sequence[Mapping[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack rows into sequences of at most ``max_length`` tokens (first-fit decreasing).

    Longest rows are placed first, each into the first sequence with room, which wastes less space
    than filling in order; within a sequence, rows keep their original order. The first label of
    every packed example is forced to -100: it would be predicted from the previous example's tokens.
    """
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    packed = []
    # Sequences in order of their first example, so the row order follows the input order.
    for members in sorted((sorted(m) for m in bins), key=lambda m: m[0]):
        seq: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            ids, labels = rows[i]["input_ids"], rows[i]["labels"]
            seq["input_ids"] += ids
            seq["labels"] += [IGNORE_INDEX] + labels[1:]
            seq["position_ids"] += list(range(len(ids)))
        packed.append(seq)
    return packed


def _labelled(examples: Sequence[Mapping[str, Any]], tokenizer: Any,
              use_chat_template: bool | None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example, in order: the prompt masked, or, for ``train_all_turns``
    examples, everything but the assistant turns; plain texts labelled whole."""
    texts = [i for i, ex in enumerate(examples) if is_text_example(ex)]
    multi = [i for i, ex in enumerate(examples) if ex.get("train_all_turns")]
    single = [i for i, ex in enumerate(examples) if not ex.get("train_all_turns") and not is_text_example(ex)]
    out: dict[int, tuple[list[int], list[int]]] = {}
    for i, ids in zip(texts, encode_texts([examples[i]["text"] for i in texts], tokenizer)):
        out[i] = (ids, list(ids))
    encoded = encode_examples([examples[i] for i in single], tokenizer, use_chat_template)  # one batch: fast
    for i, (prompt_ids, response_ids) in zip(single, encoded):
        out[i] = (prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids)
    for i in multi:
        segments = encode_conversation(examples[i], tokenizer, use_chat_template)
        out[i] = ([t for ids, _ in segments for t in ids],
                  [t if trained else IGNORE_INDEX for ids, trained in segments for t in ids])
    return [out[i] for i in range(len(examples))]


def tokenize_examples(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    packing: bool = False,
    use_chat_template: bool | None = None,
    part: str = "",
) -> TokenizedDataset:
    """Tokenize examples into training rows (``part``: which set they are, e.g. "evaluation", for errors).

    Args:
        examples: normalized examples (see :mod:`slimtune.train.data`).
        tokenizer: a transformers tokenizer with an EOS token.
        max_length: most tokens per row. Longer examples (plain texts too) are cut at the end (counted
            in ``stats.n_truncated``); examples with no response token left are dropped (``stats.n_dropped``).
        packing: pack several examples per row (see :func:`pack_rows`), with ``position_ids``.
        use_chat_template: see :func:`slimtune.train.templates.encode_examples`.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be at least 2 (a prompt token and a response token).")
    stats = TokenStats(n_examples=len(examples), max_length=max_length, packing=packing)
    rows = []
    for input_ids, labels in _labelled(examples, tokenizer, use_chat_template):
        if len(input_ids) > max_length:
            if all(label == IGNORE_INDEX for label in labels[:max_length]):  # the prompt alone fills it
                stats.n_dropped += 1
                continue
            stats.n_truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        rows.append({"input_ids": input_ids, "labels": labels})
    if packing:
        rows = pack_rows(rows, max_length)
    stats.n_sequences = len(rows)
    stats.n_tokens = sum(len(r["input_ids"]) for r in rows)
    # a row's first label predicts nothing (no token before it), as the loss counts them
    stats.n_label_tokens = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in rows)
    if not rows:
        raise ValueError(
            f"No {part + ' ' if part else ''}example fits max_length={max_length}: all {stats.n_examples} prompts fill "
            f"it. Raise the length "
            f"(data.max_seq_length in a recipe, --max-seq-length for slimtune eval)."
        )
    return TokenizedDataset(rows, stats)
