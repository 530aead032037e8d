"""Batches sharded by rank: every row once per epoch, on exactly one rank, in the single-process order.

One optimizer step takes the next ``global_batch`` rows of the epoch's order (:func:`epoch_order`, the
same permutation a single process uses) and cuts them into ``accumulation × world_size`` contiguous
micro-batches; micro-batch ``m`` of rank ``r`` is slice ``m · world_size + r``. So 2 ranks × batch b
see, step by step, the same rows as 1 rank × batch 2b, and the loss normalized by the label tokens of
all ranks and micro-batches gives the same gradient. The last step of an epoch may be short: its rows
are split as evenly as possible, and a rank left without a row gets one row with every label masked (it
still runs forward and backward, so the collectives line up, and adds nothing to the loss).

The position is ``(epoch, rows done in the epoch)`` — it does not depend on the world size, so a run
saved with 2 ranks resumes with 1 (each step then accumulates 2 micro-batches to keep ``global_batch``)
or the other way round, mid-epoch, without a row seen twice or skipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from slimtune.train.batching import Rows, check_same_rows, collate, epoch_order, rows_fingerprint
from slimtune.train.tokenization import IGNORE_INDEX

__all__ = ["ShardedBatches", "accumulation_for"]


def accumulation_for(global_batch: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per rank and step that keep ``global_batch`` rows per step on ``world_size`` ranks."""
    per_micro = batch_size * world_size
    if global_batch % per_micro:
        raise ValueError(f"a step of {global_batch} rows cannot be cut into micro-batches of {batch_size} rows on "
                         f"{world_size} ranks; choose a world size and training.batch_size whose product divides "
                         f"{global_batch}.")
    return global_batch // per_micro


class ShardedBatches:
    """This rank's micro-batches, one optimizer step at a time (see the module docstring)."""

    def __init__(self, dataset: Rows, batch_size: int, accumulation: int, rank: int, world_size: int, seed: int,
                 pad_id: int, shuffle: bool = True) -> None:
        if batch_size < 1 or accumulation < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, accumulation={accumulation}, rank {rank} of {world_size}: "
                             "need positive sizes and a rank below the world size.")
        if len(dataset) == 0:
            raise ValueError("the training set is empty; use more data.")
        self.dataset, self.batch_size, self.accumulation = dataset, batch_size, accumulation
        self.rank, self.world_size, self.seed, self.pad_id, self.shuffle = rank, world_size, seed, pad_id, shuffle
        self.global_batch = batch_size * accumulation * world_size
        self.epoch = 0
        self.start = 0  # rows of this epoch's order already taken

    @functools.cached_property
    def rows_sha256(self) -> str:
        return rows_fingerprint(self.dataset)  # once: the rows do not change

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return math.ceil(len(self.dataset) / self.global_batch)

    def step_rows(self) -> list[list[int]]:
        """The dataset indices of this rank's micro-batches for the next step; moves the position on."""
        order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shuffle)
        rows = order[self.start:self.start + self.global_batch]
        self.start += len(rows)
        if self.start >= len(order):
            self.epoch, self.start = self.epoch + 1, 0
        parts = self.accumulation * self.world_size
        size, extra = divmod(len(rows), parts)
        bounds = [0]
        for j in range(parts):
            bounds.append(bounds[-1] + size + (j < extra))
        return [rows[bounds[j]:bounds[j + 1]] for j in range(self.rank, parts, self.world_size)]

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's ``accumulation`` collated micro-batches of the next optimizer step."""
        return [self._collate(indices) for indices in self.step_rows()]

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if indices:
            return collate([self.dataset[i] for i in indices], self.pad_id)
        batch = collate([self.dataset[0]], self.pad_id)  # nothing left for this rank: a row that counts for nothing
        batch["labels"].fill_(IGNORE_INDEX)
        return batch

    def state_dict(self) -> dict[str, int | bool | str]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed, "shuffle": self.shuffle,
                "num_rows": len(self.dataset), "global_batch": self.global_batch, "rows_sha256": self.rows_sha256}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state``'s position; refuse a state made with another order or step size."""
        mine = self.state_dict()
        different = {k: (state.get(k), mine[k]) for k in ("seed", "shuffle", "num_rows", "global_batch")
                     if state.get(k) != mine[k]}
        if different:
            raise ValueError(f"Cannot resume: the saved batch order used different settings {{name: (saved, now)}} "
                             f"= {different}. Resume with the same data, seed and rows per step.")
        check_same_rows(state, self.rows_sha256)
        if int(state["epoch"]) < 0 or not 0 <= int(state["start"]) < len(self.dataset):
            raise ValueError(f"Invalid position epoch={state['epoch']!r}, start={state['start']!r}.")
        self.epoch, self.start = int(state["epoch"]), int(state["start"])
