"""Advantage estimators: one scalar per trajectory from the rewards of its group.

The driver picks one by name (`learner.grpo.advantage`) and writes the `advantage` column the learner trains on, so
the learner never sees groups and another estimator is one small function here, not a learner change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import torch

from learner.grpo import group_advantages


def grpo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """GRPO (the paper): (r - group mean) / (group std + eps)."""
    return group_advantages(rewards, group_size, eps, scale_by_std=True)


def dr_grpo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Dr. GRPO: r - group mean, no division by the std (pair it with `agg: seq-mean-token-sum-norm`)."""
    return group_advantages(rewards, group_size, eps, scale_by_std=False)


def rloo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """RLOO: r minus the mean reward of the other samples of its group (0 for a group of one)."""
    if group_size < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = group_advantages(rewards, group_size, eps, scale_by_std=False)
    return centred * (group_size / (group_size - 1))


ESTIMATORS: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "grpo": grpo, "dr-grpo": dr_grpo, "rloo": rloo,
}


def with_advantages(groups: Sequence[pa.RecordBatch], estimator: str = "grpo", eps: float = 1e-6) -> pa.Table:
    """The groups as one table with an `advantage` column, each group's rows estimated together."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    sizes = {g.num_rows for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"every record batch must hold one group of equal size; sizes {sorted(sizes)}")
    table = pa.Table.from_batches(list(groups))
    rewards = torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32)
    advantages = ESTIMATORS[estimator](rewards, sizes.pop(), eps)
    return table.append_column("advantage", pa.array(advantages.tolist(), type=pa.float32()))
