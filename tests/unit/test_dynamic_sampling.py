"""Dynamic sampling (DAPO) in the producer: a group whose rewards do not vary is dropped, its prompt counted as used
and replaced by a fresh one, at most (max_draws - 1) x batch_size times a step; off, every group is kept."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from actors.trajectory import Trajectory, to_record_batch
from cluster.data_stream import PromptItem, PromptStream
from cluster.rollout_pool import ACTOR_GONE, Finished, RolloutPool, sync_outcome, zero_variance


def group(rewards: list[float], version: int = 0, f1: list[float] | None = None) -> pa.RecordBatch:
    """One scored group with these rewards (and answer F1s, 0 unless given)."""
    f1 = f1 or [0.0] * len(rewards)
    return to_record_batch([Trajectory("p", i, version, [5, 6], [7, 8], [1, 1], [-1.0, -1.0], reward=r, f1=f)
                            for i, (r, f) in enumerate(zip(rewards, f1, strict=True))])


def receive(pool: RolloutPool, stream: PromptStream, rewards: list[float], draws: int) -> PromptItem:
    item = stream.next()
    assert item is not None
    asyncio.run(pool._receive(Finished(item, 0, group(rewards)), stream, batch_size=2, draws=draws))
    return item


def test_zero_variance_groups_are_dropped_counted_and_their_prompts_used() -> None:
    pool, stream = RolloutPool(make_actor=None, learner=None), PromptStream(10, 1, seed=0)
    kept = receive(pool, stream, [0.0, 1.0, 0.5], draws=3)
    flat = [receive(pool, stream, [0.1, 0.1, 0.1], draws=3) for _ in range(4)]  # (3 - 1) x 2 = 4 may go
    assert [f.item for f in pool.buffer] == [kept]
    assert pool.dropped == flat and stream.consumed_in_epoch == 4  # used: never issued again this epoch
    capped = receive(pool, stream, [0.0, 0.0, 0.0], draws=3)  # the step's budget is spent: kept, so a step ends
    assert [f.item for f in pool.buffer] == [kept, capped]
    taken = asyncio.run(pool.take(2, 0, stream))
    assert [f.item for f in taken] == [kept, capped]
    assert pool.trained(taken, stream) == flat and pool.dropped == []  # reported with the step, then forgotten
    receive(pool, stream, [1.0, 1.0, 1.0], draws=3)  # a new step: the budget is back
    assert len(pool.dropped) == 1 and not pool.buffer


def test_without_dynamic_sampling_every_group_is_kept() -> None:
    pool, stream = RolloutPool(make_actor=None, learner=None), PromptStream(10, 1, seed=0)
    items = [receive(pool, stream, rewards, draws=0) for rewards in ([0.0] * 3, [1.0, 0.0, 1.0], [0.5] * 3)]
    assert [f.item for f in pool.buffer] == items and pool.dropped == [] and stream.consumed_in_epoch == 0


def test_zero_variance_reads_the_rewards() -> None:
    assert zero_variance(group([0.3, 0.3])) and not zero_variance(group([0.3, 0.31]))


def test_on_f1_a_group_whose_rewards_differ_only_by_format_is_dropped() -> None:
    """All answers wrong, one format invalid (0 vs 0.1): kept on 'reward' (the std division would make it teach
    format at full strength), dropped on 'f1'; a group with a right answer is kept on both."""
    format_only, answered = ([0.0, 0.1, 0.1], [0.0, 0.0, 0.0]), ([0.1, 1.0, 0.0], [0.0, 1.0, 0.0])
    assert not zero_variance(group(*format_only[:1], f1=format_only[1]))
    assert zero_variance(group(format_only[0], f1=format_only[1]), "f1")
    assert not zero_variance(group(answered[0], f1=answered[1]), "f1")
    assert zero_variance(group([1.0, 1.0], f1=[1.0, 1.0]), "f1")  # all right: nothing to contrast either
    for metric, kept in (("reward", 2), ("f1", 1)):
        pool, stream = RolloutPool(make_actor=None, learner=None), PromptStream(10, 1, seed=0)
        for rewards, f1 in (format_only, answered):
            item = stream.next()
            assert item is not None
            asyncio.run(pool._receive(Finished(item, 0, group(rewards, f1=f1)), stream, 2, 3, metric))
        assert len(pool.buffer) == kept and len(pool.dropped) == 2 - kept


def test_sync_outcome_restores_a_learner_and_replaces_only_engines_that_died_or_hang() -> None:
    """The decision both transports share after a sync's deadline (gloo gives up by itself, NCCL is aborted)."""
    assert sync_outcome({"rank0": "ok"}, {1: "ok", 2: "ok"}) == (False, [])
    # an engine died mid-sync: the learner's broadcast failed at its deadline and it is alive; others rejoin
    assert sync_outcome({"rank0": "failed"}, {1: "gone", 2: "failed"}) == (False, [1])
    assert sync_outcome({"rank0": "ok"}, {1: "stuck", 2: "ok"}) == (False, [1])
    assert sync_outcome({"rank0": "stuck", "rank1": "ok"}, {1: "failed"}) == (True, [])
    assert sync_outcome({"rank0": "gone"}, {1: "ok"})[0]


def test_take_waits_at_an_epoch_boundary_and_ends_after_the_last_epoch() -> None:
    """Right after the last batch of an epoch is trained, the next epoch is still to come (the producer may not have
    run yet): `take` waits instead of ending the run; after the last epoch it returns None."""
    pool, stream = RolloutPool(make_actor=None, learner=None), PromptStream(3, 2, seed=0)
    for epoch in range(2):
        for _ in range(3):
            receive(pool, stream, [0.0, 1.0], draws=0)
        assert not stream.can_issue()  # the epoch's last prompts are out: a partial batch may go
        taken = asyncio.run(pool.take(2, 0, stream)) + asyncio.run(pool.take(2, 0, stream))
        assert len(taken) == 3
        pool.trained(taken, stream)
        if epoch == 0:
            assert stream.can_issue()
            with pytest.raises(asyncio.TimeoutError):  # the next epoch comes: wait for it, do not stop
                asyncio.run(asyncio.wait_for(pool.take(2, 0, stream), 0.2))
    assert asyncio.run(pool.take(2, 0, stream)) is None


def test_an_actor_killed_by_rays_memory_monitor_counts_as_gone() -> None:
    """Ray's memory monitor kills the worker process and the call raises OutOfMemoryError (a RayError, not a
    RayActorError): the supervisor must restore a learner rank killed so, and the pool replace a rollout actor."""
    from ray.exceptions import OutOfMemoryError

    error = OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")
    assert isinstance(error, ACTOR_GONE)
    assert Finished(PromptItem(0, 0), 0, None, error).actor_died
