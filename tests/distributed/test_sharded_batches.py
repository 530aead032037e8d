"""Rows sharded by rank: each row once per epoch on exactly one rank, the single-process order step by step,
and a position that resumes at another world size without a row seen twice or skipped."""

from __future__ import annotations

import pytest

from slimtune.distributed.data import ShardedBatches, accumulation_for
from slimtune.train.batching import epoch_order
from slimtune.train.tokenization import IGNORE_INDEX

ROWS = [{"input_ids": [i + 3, i + 4], "labels": [i + 3, i + 4]} for i in range(23)]  # row i holds token i + 3


def _step(world: int, batches: list[ShardedBatches]) -> list[list[int]]:
    """Every rank's micro-batches of one step, as dataset indices (ranks in order per micro-batch)."""
    per_rank = [b.step_rows() for b in batches]
    return [per_rank[r][m] for m in range(batches[0].accumulation) for r in range(world)]


@pytest.mark.parametrize("world, batch, accumulation", [(1, 4, 1), (2, 2, 1), (2, 1, 2), (3, 2, 2)])
def test_each_step_takes_the_next_rows_of_the_single_process_order_once(world, batch, accumulation):
    ranks = [ShardedBatches(ROWS, batch, accumulation, r, world, seed=5, pad_id=0) for r in range(world)]
    step_rows = batch * accumulation * world
    for epoch in range(2):
        seen: list[int] = []
        for _ in range(len(ranks[0])):
            parts = _step(world, ranks)
            taken = [i for part in parts for i in part]
            assert len(taken) == len(set(taken)), "a row went to two ranks"
            seen += taken
        assert seen == epoch_order(len(ROWS), 5, epoch), "rows lost, repeated or out of the single-process order"
        assert all(len(p) <= batch for p in parts)
    assert len(ranks[0]) == -(-len(ROWS) // step_rows)


def test_a_rank_without_rows_in_the_last_step_gets_a_row_that_counts_for_nothing():
    ranks = [ShardedBatches(ROWS[:5], 2, 1, r, 2, seed=0, pad_id=0) for r in range(2)]
    for b in ranks:
        b.start = 4  # one row left for two ranks
    batches = [b.next_step() for b in ranks]
    assert (batches[0][0]["labels"] != IGNORE_INDEX).any()
    assert (batches[1][0]["labels"] == IGNORE_INDEX).all() and batches[1][0]["input_ids"].shape[0] == 1


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_position_saved_at_one_world_size_resumes_at_another(before, after):
    """2 ranks × 2 rows, then 1 rank × 2 rows × 2 micro-batches (and back): the same rows per step."""
    reference = ShardedBatches(ROWS, 4, 1, 0, 1, seed=1, pad_id=0)
    expected = [sorted(i for part in reference.step_rows() for i in part) for _ in range(9)]
    old = [ShardedBatches(ROWS, 2, accumulation_for(4, 2, before), r, before, 1, 0) for r in range(before)]
    got = [sorted(i for part in _step(before, old) for i in part) for _ in range(3)]
    state = old[0].state_dict()
    new = [ShardedBatches(ROWS, 2, accumulation_for(4, 2, after), r, after, 1, 0) for r in range(after)]
    for b in new:
        b.load_state_dict(state)
    got += [sorted(i for part in _step(after, new) for i in part) for _ in range(6)]
    assert got == expected


def test_resume_refuses_another_step_size_or_order():
    saved = ShardedBatches(ROWS, 2, 1, 0, 2, seed=1, pad_id=0).state_dict()
    with pytest.raises(ValueError, match="global_batch"):
        ShardedBatches(ROWS, 2, 1, 0, 1, seed=1, pad_id=0).load_state_dict(saved)
    with pytest.raises(ValueError, match="seed"):
        ShardedBatches(ROWS, 2, 1, 0, 2, seed=2, pad_id=0).load_state_dict(saved)
    edited = [dict(row) for row in ROWS]
    edited[5] = {"input_ids": [99, 4], "labels": [99, 4]}
    with pytest.raises(ValueError, match="the training rows differ from the run's"):
        ShardedBatches(edited, 2, 1, 0, 2, seed=1, pad_id=0).load_state_dict(saved)
    with pytest.raises(ValueError, match="divides 6"):
        accumulation_for(6, 4, 1)
