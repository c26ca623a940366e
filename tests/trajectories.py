"""Fixed trajectories of random tokens for learner tests: ragged prompts and responses, a masked-out span in each."""

from __future__ import annotations

import pyarrow as pa
import torch

from actors.trajectory import Trajectory, to_record_batch


def random_groups(n_groups: int = 2, group_size: int = 4, seed: int = 0) -> list[pa.RecordBatch]:
    """`n_groups` record batches of `group_size` trajectories; tokens 2-3 of each response stand for a retrieved
    span (in context, loss_mask 0), behaviour logprobs are a constant -6.9, rewards vary within each group."""
    generator = torch.Generator().manual_seed(seed)

    def ints(low: int, high: int, count: int) -> list[int]:
        return torch.randint(low, high, (count,), generator=generator).tolist()

    groups = []
    for g in range(n_groups):
        trajectories = []
        for i in range(group_size):
            prompt, response = ints(10, 1000, 3 + (i + g) % 4), ints(10, 1000, 6 + (3 * i + g) % 7)
            mask = [1] * len(response)
            mask[2:4] = [0, 0]
            logprobs = [-6.9 if m else 0.0 for m in mask]
            trajectories.append(
                Trajectory(f"p{g}", i, 0, prompt, response, mask, logprobs, reward=float((i * 7 + g) % 3) / 2)
            )
        groups.append(to_record_batch(trajectories))
    return groups
