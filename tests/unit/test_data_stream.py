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
