"""Tokens per learner rank after the length sort: contiguous slices (before) vs rows dealt round-robin (now).

ZeRO runs each step at the pace of its slowest rank, so the ratio max / mean of tokens per rank is the time a step
loses to imbalance. A batch of 256 trajectories with lengths uniform in 300-4,000 tokens, sorted as `by_length`
leaves it, one mini-batch:

    python -m bench.rank_balance [--rows 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import random

import torch

from learner.batch import TrainBatch


def tokens_per_rank(lengths: list[int], ranks: int, dealt: bool) -> list[int]:
    """Real tokens in each rank's contiguous share of one mini-batch of these (sorted) rows."""
    size, width = len(lengths), max(lengths)
    attention = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch = TrainBatch(input_ids=attention, attention_mask=attention, loss_mask=attention[:, 1:].float(),
                       behaviour_logprobs=torch.zeros(size, width - 1), advantages=torch.zeros(size),
                       rewards=torch.zeros(size), response_lengths=torch.tensor(lengths), real=torch.ones(size))
    if dealt:
        batch = batch.dealt(ranks, size)
    share = size // ranks
    return [int(batch.attention_mask[r * share:(r + 1) * share].sum()) for r in range(ranks)]


def main() -> None:
    """Print max / mean tokens per rank for 2-16 ranks, before and after dealing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lengths = sorted(rng.randint(300, 4000) for _ in range(args.rows))
    print("ranks  contiguous max/mean  dealt max/mean")
    for ranks in (2, 4, 8, 16):
        before, after = (tokens_per_rank(lengths, ranks, dealt) for dealt in (False, True))
        print(f"{ranks:5d}  {max(before) / (sum(before) / ranks):19.3f}  {max(after) / (sum(after) / ranks):14.3f}")


if __name__ == "__main__":
    main()
