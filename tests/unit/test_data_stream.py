"""The prompt stream: seeded order, requeue, exactly-once per epoch, and resume from a saved position."""

from __future__ import annotations

import random

import pytest

from cluster.data_stream import PromptItem, PromptStream


def drain(stream: PromptStream, limit: int) -> list[PromptItem]:
    items = []
    while len(items) < limit and (item := stream.next()) is not None:
        items.append(item)
    return items


def test_epoch_order_is_seeded_permutation() -> None:
    a = drain(PromptStream(20, 1, seed=3), 100)
    b = drain(PromptStream(20, 1, seed=3), 100)
    c = drain(PromptStream(20, 1, seed=4), 100)
    assert [i.index for i in a] == [i.index for i in b]
    assert sorted(i.index for i in a) == list(range(20))
    assert [i.index for i in a] != [i.index for i in c]


def test_every_prompt_consumed_exactly_once_with_requeues() -> None:
    rng = random.Random(0)
    stream = PromptStream(37, epochs=2, seed=1)
    consumed: list[PromptItem] = []
    while not stream.finished:
        item = stream.next()
        if item is None:
            pytest.fail("stream stalled before finishing")
        if rng.random() < 0.3:  # an actor died or was removed: the prompt comes back
            stream.requeue(item)
            continue
        stream.consume(item)
        consumed.append(item)
    for epoch in (0, 1):
        indices = [i.index for i in consumed if i.epoch == epoch]
        assert sorted(indices) == list(range(37)), epoch
    assert stream.next() is None


def test_next_returns_none_while_epoch_has_outstanding_prompts() -> None:
    stream = PromptStream(3, epochs=2, seed=0)
    items = drain(stream, 10)
    assert len(items) == 3 and stream.next() is None  # issued but not consumed: the epoch cannot roll over yet
    for item in items:
        stream.consume(item)
    assert stream.next().epoch == 1


def test_resume_restores_position_without_replay_or_skip() -> None:
    stream = PromptStream(10, epochs=2, seed=7)
    first = drain(stream, 6)
    for item in first[:4]:
        stream.consume(item)
    state = stream.state_dict()  # 2 issued but unconsumed: they must be issued again after resume

    resumed = PromptStream(10, epochs=2, seed=7)
    resumed.load_state_dict(state)
    rest = []
    while (item := resumed.next()) is not None:
        rest.append(item)
        resumed.consume(item)
    trained = {i.index for i in first[:4]} | {i.index for i in rest if i.epoch == 0}
    assert sorted(trained) == list(range(10))
    assert not ({i.index for i in first[:4]} & {i.index for i in rest if i.epoch == 0})


def test_resume_refuses_other_dataset() -> None:
    state = PromptStream(10, 1, seed=0).state_dict()
    with pytest.raises(ValueError, match="10 prompts"):
        PromptStream(11, 1, seed=0).load_state_dict(state)


def test_empty_dataset_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        PromptStream(0, 1, seed=0)


def test_requeue_is_idempotent() -> None:
    stream = PromptStream(4, epochs=1, seed=0)
    item = stream.next()
    stream.requeue(item)
    stream.requeue(item)  # the same loss reported twice (actor death seen by two paths)
    issued = drain(stream, 10)
    assert sorted(i.index for i in issued) == [0, 1, 2, 3]
    stream.requeue(PromptItem(99, 0))  # never issued: ignored
    assert stream.next() is None


def run_through(stream: PromptStream, limit: int = 10**6) -> list[PromptItem]:
    """Issue and consume prompts one at a time (at most `limit`) until the stream finishes."""
    consumed: list[PromptItem] = []
    while not stream.finished and len(consumed) < limit:
        item = stream.next()
        assert item is not None, "stream stalled before finishing"
        stream.consume(item)
        consumed.append(item)
    return consumed


def test_drop_last_trains_only_whole_batches_each_epoch_as_the_reference() -> None:
    """The reference's train DataLoader has drop_last=True (ReCall, branch re-search,
    src/verl/trainer/ppo/ray_trainer.py:482-486): each epoch trains floor(prompts / batch) full batches of its shuffled
    order and leaves the rest out. trainer.drop_last is that default; false trains the partial batch."""
    from cluster.config import load_config

    config = load_config("test-tiny", ["trainer.epochs=3", "trainer.batch_size=4", "seed=5"])
    assert config.trainer.drop_last
    stream = PromptStream.for_job(10, config)
    consumed = run_through(stream)
    per_epoch = [[i.index for i in consumed if i.epoch == epoch] for epoch in range(3)]
    assert [len(indices) for indices in per_epoch] == [8, 8, 8] and stream.finished and stream.next() is None
    assert all(len(set(indices)) == 8 for indices in per_epoch)
    left_out = [set(range(10)) - set(indices) for indices in per_epoch]
    assert len({frozenset(s) for s in left_out}) > 1  # a different tail each epoch, as the shuffle differs
    # Without it, every prompt of every epoch is trained (the last batch of 2 is partial).
    kept = run_through(PromptStream.for_job(10, config.model_copy(
        update={"trainer": config.trainer.model_copy(update={"drop_last": False})})))
    assert len(kept) == 30
    # With drop_last an epoch is the first 8 of the order the stream without it issues.
    assert [i.index for i in consumed if i.epoch == 1] == [i.index for i in kept if i.epoch == 1][:8]


def test_drop_last_resume_continues_exactly() -> None:
    uninterrupted = run_through(PromptStream(10, epochs=2, seed=7, batch_size=4, drop_last=True))
    for stop_after in (3, 8, 11):  # mid-epoch, at the epoch boundary, in the second epoch
        stream = PromptStream(10, epochs=2, seed=7, batch_size=4, drop_last=True)
        before = run_through(stream, stop_after)
        outstanding = stream.next()  # issued, never trained: issued again after the resume
        state = stream.state_dict()
        resumed = PromptStream(10, epochs=2, seed=7, batch_size=4, drop_last=True)
        resumed.load_state_dict(state)
        after = run_through(resumed)
        assert before + after == uninterrupted, stop_after
        assert outstanding in after


def test_drop_last_position_refuses_another_epoch_size() -> None:
    dropping = PromptStream(10, epochs=2, seed=0, batch_size=4, drop_last=True)
    state = dropping.state_dict()
    assert state["epoch_size"] == 8
    with pytest.raises(ValueError, match="trainer.drop_last"):
        PromptStream(10, epochs=2, seed=0, batch_size=4).load_state_dict(state)
    # A position saved before epoch_size existed trained whole epochs: fine without a drop, refused with one.
    old = {k: v for k, v in PromptStream(10, 2, seed=0).state_dict().items() if k != "epoch_size"}
    PromptStream(10, epochs=2, seed=0).load_state_dict(old)
    PromptStream(12, epochs=2, seed=0, batch_size=4, drop_last=True).load_state_dict({**old, "num_prompts": 12})
    with pytest.raises(ValueError, match="10 prompts per epoch, this run 8"):
        PromptStream(10, epochs=2, seed=0, batch_size=4, drop_last=True).load_state_dict(old)


def test_drop_last_with_fewer_prompts_than_a_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 training prompts fill no batch of 4"):
        PromptStream(3, epochs=1, seed=0, batch_size=4, drop_last=True)
    assert PromptStream(3, epochs=1, seed=0, batch_size=4).epoch_size == 3
