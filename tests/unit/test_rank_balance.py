"""Rows over learner ranks after the length sort: dealt round-robin, so no rank gets all the longest rows."""

from __future__ import annotations

import torch

from learner.batch import TrainBatch, deal_order


def sorted_batch(lengths: list[int]) -> TrainBatch:
    """A batch whose row i has lengths[i] real tokens (ascending, as `by_length` leaves it)."""
    width = max(lengths)
    attention = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    size = len(lengths)
    return TrainBatch(input_ids=attention.clone(), attention_mask=attention,
                      loss_mask=attention[:, 1:].float(), behaviour_logprobs=torch.zeros(size, width - 1),
                      advantages=torch.arange(size, dtype=torch.float32), rewards=torch.zeros(size),
                      response_lengths=torch.tensor(lengths), real=torch.ones(size))


def tokens_per_rank(batch: TrainBatch, ranks: int, mini_size: int) -> list[float]:
    """What each rank's contiguous share of every mini-batch holds, summed (the engine's `_rank_rows`)."""
    share = mini_size // ranks
    totals = [0.0] * ranks
    for start in range(0, batch.size, mini_size):
        for rank in range(ranks):
            rows = slice(start + rank * share, start + (rank + 1) * share)
            totals[rank] += float(batch.attention_mask[rows].sum())
    return totals


def test_dealt_rows_balance_tokens_over_ranks() -> None:
    lengths = sorted([40 + 37 * i % 900 for i in range(32)])
    batch = sorted_batch(lengths)
    for ranks, mini_size in ((4, 32), (8, 16), (2, 8)):
        before = tokens_per_rank(batch, ranks, mini_size)
        after = tokens_per_rank(batch.dealt(ranks, mini_size), ranks, mini_size)
        assert sum(after) == sum(before)
        imbalance = max(after) / (sum(after) / ranks)
        assert imbalance < 1.25, (ranks, after)
        assert max(before) / (sum(before) / ranks) > imbalance  # contiguous slices: the last rank got the longest


def test_dealing_keeps_each_mini_batch_and_every_row() -> None:
    order = deal_order(16, 4, 8)
    assert sorted(order) == list(range(16))
    assert sorted(order[:8]) == list(range(8)) and sorted(order[8:]) == list(range(8, 16))
    batch = sorted_batch(list(range(2, 18)))
    dealt = batch.dealt(4, 8)
    assert dealt.advantages.tolist() == [float(i) for i in order]  # every field moves with its row
    assert batch.dealt(1, 8) is batch
