"""Batches: a padding collate function and a deterministic, resumable batch iterator."""

from __future__ import annotations

import functools
import hashlib
import math
import random
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch

from slimtune.train.tokenization import IGNORE_INDEX


def collate(
    batch: Sequence[Mapping[str, list[int]]], pad_id: int | None, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad token rows into tensors of shape ``(batch, seq)``.

    Returns ``input_ids`` (padded with ``pad_id``) and ``labels`` (-100 on padding). Padding is
    located by each row's length, never by comparing ids, so a pad id equal to EOS (SmolLM2) does
    not hide real EOS labels.

    - Unpacked rows also get ``attention_mask`` (1 on tokens, 0 on padding).
    - Packed rows (they have ``position_ids``) get ``position_ids`` and no ``attention_mask``:
      transformers then builds a block-diagonal causal mask from the restarting positions, so
      examples packed together do not attend to each other. The padding tail gets positions
      restarting at 0 — a segment of its own that no real token attends to.
    """
    if pad_id is None:
        raise ValueError(
            "pad_id is None: pass tokenizer.pad_token_id, or tokenizer.eos_token_id for a tokenizer without a "
            "pad token."
        )
    if not batch:
        raise ValueError("collate got an empty batch.")
    longest = max(len(row["input_ids"]) for row in batch)
    if pad_to_multiple_of:
        longest = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    packed = any("position_ids" in row for row in batch)
    shape = (len(batch), longest)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        if len(row["labels"]) != n:
            raise ValueError(f"Row {i} of the batch has {n} input_ids but {len(row['labels'])} labels.")
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
        mask[i, :n] = 1
        own = row.get("position_ids")
        positions[i, :n] = torch.tensor(own, dtype=torch.long) if own is not None else torch.arange(n)
        positions[i, n:] = torch.arange(longest - n)
    out = {"input_ids": input_ids, "labels": labels}
    if packed:
        out["position_ids"] = positions
    else:
        out["attention_mask"] = mask
    return out


def real_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """The tokens of a :func:`collate` batch that are not padding (what tokens/s counts), prompts included.

    Unpacked: its ``attention_mask``. Packed (no mask): each row's padding tail is its last segment (positions
    restart at 0 there) when none of that segment's labels is trained; a real example always has one (the
    tokenizer drops those without), so a packed row counts as many tokens as its examples hold."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" not in batch:
        return batch["input_ids"].numel()
    total = 0
    for positions, labels in zip(batch["position_ids"], batch["labels"]):
        starts = (positions == 0).nonzero()
        tail = int(starts[-1]) if len(starts) else 0
        padded = tail > 0 and bool((labels[tail:] == IGNORE_INDEX).all())
        total += tail if padded else positions.numel()
    return total


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of ``n`` rows in ``epoch``: a permutation that depends only on (seed, epoch)."""
    order = list(range(n))
    if shuffle:
        # SHA-256 of "seed:epoch" rather than seed + epoch, so (seed 0, epoch 1) and (seed 1, epoch 0)
        # differ; random.Random(int) sequences are stable across Python versions and platforms.
        key = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "big")
        random.Random(key).shuffle(order)
    return order


def rows_fingerprint(dataset: Rows) -> str:
    """A SHA-256 of the token rows (ids, labels, positions), shortened: a resume must see the very rows the run
    saw, not only as many (a data file edited in place, another tokenizer at the same path)."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        row = dataset[i]
        for key in ("input_ids", "labels", "position_ids"):
            values = row.get(key)
            if values is not None:
                digest.update(f"{key}:{len(values)}:".encode())
                digest.update(array("q", values).tobytes())
    return digest.hexdigest()[:16]


def check_same_rows(saved: Mapping[str, Any], rows_sha256: str) -> None:
    """Refuse a resume over other rows than the checkpoint's (checkpoints from before the fingerprint pass)."""
    if saved.get("rows_sha256", rows_sha256) != rows_sha256:
        raise ValueError("Cannot resume: the training rows differ from the run's (the same number of rows, other "
                         f"tokens: fingerprint {saved['rows_sha256']} then, {rows_sha256} now). The data file, the "
                         "template or the tokenizer changed since the run started: restore them, or start a new run "
                         "(output.overwrite=true or another output.dir).")


class Rows(Protocol):
    """What batches are drawn from: a length and rows by index (a list, a TokenizedDataset …)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class BatchIterator:
    """Deterministic, resumable batches over a token dataset.

    The order of epoch ``e`` is :func:`epoch_order` ``(len(dataset), seed, e)``, so a run with the
    same seed sees the same batches. Iterating yields the remaining batches of the current epoch and
    then moves to the next epoch; ``epoch`` and ``index`` (batches already yielded in this epoch)
    always describe the position, so ``state_dict()`` saved after a training step and
    ``load_state_dict()`` in a new process continue with exactly the next batch::

        batches = BatchIterator(ds, batch_size=8, seed=0, pad_id=tok.pad_token_id)
        for epoch in range(num_epochs):
            for batch in batches:   # dict of tensors from collate(), or lists of rows if pad_id is None
                ...

    Args:
        dataset: indexable rows (e.g. a :class:`~slimtune.train.tokenization.TokenizedDataset`).
        batch_size: rows per batch.
        seed: shuffling seed.
        shuffle: False keeps dataset order in every epoch.
        drop_last: drop the last, smaller batch of each epoch.
        pad_id: when given, batches are collated with :func:`collate`; otherwise lists of rows.
        pad_to_multiple_of: passed to :func:`collate`.
    """

    def __init__(
        self,
        dataset: Rows,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        pad_id: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        if len(dataset) == 0 or (drop_last and len(dataset) < batch_size):
            raise ValueError(
                f"A dataset of {len(dataset)} rows gives no batch of {batch_size}"
                f"{' with drop_last=True' if drop_last else ''}; use more data or a smaller batch_size."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch = 0
        self.index = 0

    @functools.cached_property
    def rows_sha256(self) -> str:
        return rows_fingerprint(self.dataset)  # once: the rows do not change

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        while self.index < len(self):
            start = self.index * self.batch_size
            rows = [self.dataset[i] for i in order[start : start + self.batch_size]]
            # Advance before yielding: once the caller holds a batch, it counts as consumed.
            self.index += 1
            yield rows if self.pad_id is None else collate(rows, self.pad_id, self.pad_to_multiple_of)
        self.epoch += 1
        self.index = 0

    def state_dict(self) -> dict[str, int | bool | str]:
        """The position plus what the order depends on (checked again on load)."""
        return {
            "rows_sha256": self.rows_sha256,
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_rows": len(self.dataset),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; refuse a state made with another order (it would not resume exactly)."""
        mine = self.state_dict()
        different = {k: (state.get(k), mine[k]) for k in ("seed", "batch_size", "shuffle", "drop_last", "num_rows")
                     if state.get(k) != mine[k]}
        if different:
            raise ValueError(
                f"Cannot resume: the saved batch order used different settings {{name: (saved, now)}} = {different}. "
                f"Resume with the same data, seed and batch_size."
            )
        check_same_rows(state, self.rows_sha256)
        if not 0 <= int(state["index"]) <= len(self) or int(state["epoch"]) < 0:
            raise ValueError(f"Invalid position epoch={state['epoch']!r}, index={state['index']!r} "
                             f"({len(self)} batches/epoch).")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
