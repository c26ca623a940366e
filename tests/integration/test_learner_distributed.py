"""The learner as Ray actors on a local cluster: 2-rank ZeRO-2/3 equal 1 rank; save, kill, load resumes exactly.

The runs sample at temperature 0.7, so they also check that recomputed old logprobs split over ranks.

Tolerances: loss within 1e-6 and gradient norm within 1e-5 (relative); after one AdamW step (lr 1e-3) every parameter
within 5e-5 (5 % of the step size) and the updated policy's logprobs within 1e-5 + 1e-5 relative. Only the order of float sums differs
between the runs. The parameter bound is loose because AdamW's first step is lr * g / (|g| + 1e-8): for the few
elements whose gradient is itself ~1e-8, a 1e-10 summation difference in g moves the update by ~1 % of lr
(recomputed old logprobs add their own summation order: 2.5 % seen).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from cluster.learner_group import LearnerGroup
from learner.batch import collate
from learner.config import GRPOConfig, LearnerConfig
from learner.engine import LearnerEngine
from learner.grpo import with_advantages
from tests.trajectories import random_groups

pytestmark = pytest.mark.slow

LR = 1e-3


def trajectory_groups(seed: int = 0) -> pa.Table:
    """9 trajectories (3 groups of 3) with advantages: an odd batch, as an epoch's last one can be, that 2 ranks
    split only with a zero-weight padding row."""
    return with_advantages(random_groups(n_groups=3, group_size=3, seed=seed))


def learner_config(stage: int, world_size: int) -> LearnerConfig:
    # Micro-batches of 2: 1 rank accumulates 4 of them, each of 2 ranks accumulates 2. Sampling temperature 0.7:
    # logits are scaled and each rank recomputes the old logprobs of its own rows (a collective under ZeRO-3).
    # The exact token mean: under the reference's weighting the update depends on how rows fall into micro-batches.
    grpo = GRPOConfig(kl_coef=0.001, temperature=0.7, micro_batch_weight="tokens")
    return LearnerConfig(world_size=world_size, zero_stage=stage, lr=LR, micro_batch_size=2, grpo=grpo)


@pytest.fixture(scope="module")
def one_rank(policy_path: str) -> dict:
    """The 1-rank update of the global batch, computed in this process."""
    engine = LearnerEngine(learner_config(2, 1), policy_path)
    metrics = engine.train_step(collate(trajectory_groups(), engine.pad_token_id))
    weights = {name: tensor.detach().numpy().copy() for name, tensor in engine.full_parameters()}
    logprobs = engine.compute_logprobs(collate(trajectory_groups(), engine.pad_token_id))
    return {"metrics": metrics, "weights": weights, "logprobs": logprobs}


def assert_same_update(one_rank: dict, metrics: dict, group: LearnerGroup) -> None:
    assert metrics["loss"] == pytest.approx(one_rank["metrics"]["loss"], rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(one_rank["metrics"]["grad_norm"], rel=1e-5)
    weights = group.full_parameters()
    assert weights.keys() == one_rank["weights"].keys()
    worst = max(float(np.abs(weights[name] - one_rank["weights"][name]).max()) for name in weights)
    assert worst <= 5e-2 * LR, worst
    logprobs = torch.tensor(np.array(group.compute_logprobs(trajectory_groups())))
    assert metrics["padding_rows"] == (1.0 if len(group.actors) == 2 else 0.0)
    torch.testing.assert_close(logprobs, one_rank["logprobs"], atol=1e-5, rtol=1e-5)


def test_two_rank_zero3_equals_one_rank(ray_cluster, policy_path: str, one_rank: dict) -> None:
    group = LearnerGroup(learner_config(3, 2), policy_path)
    try:
        metrics = group.train_step(trajectory_groups())
        # Each rank scored its own rows as the old policy: the one update starts exactly on-policy.
        assert metrics["clip_fraction_binding"] == 0.0 and abs(metrics["approx_kl"]) < 1e-6
        assert_same_update(one_rank, metrics, group)
    finally:
        group.shutdown()


def test_two_rank_zero2_equals_one_rank_and_resumes_after_kill(
    ray_cluster, policy_path: str, one_rank: dict, tmp_path
) -> None:
    config = learner_config(2, 2)
    group = LearnerGroup(config, policy_path)
    try:
        metrics = group.train_step(trajectory_groups())
        assert_same_update(one_rank, metrics, group)
        assert group.policy_version == 1  # counted by the ranks: one update
        group.save(str(tmp_path), data_position={"epoch": 0, "next_prompt": 16})
        uninterrupted = group.train_step(trajectory_groups(seed=5))
    finally:
        group.shutdown()  # kills both rank actors: nothing of the first run survives but the checkpoint

    resumed = LearnerGroup(config, policy_path)
    try:
        state = resumed.load(str(tmp_path))
        assert state == {"step": 1, "policy_version": 1, "data_position": {"epoch": 0, "next_prompt": 16}}
        assert resumed.policy_version == 1
        after_resume = resumed.train_step(trajectory_groups(seed=5))
        assert after_resume["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-6, abs=1e-9)
        assert after_resume["grad_norm"] == pytest.approx(uninterrupted["grad_norm"], rel=1e-6)
    finally:
        resumed.shutdown()
