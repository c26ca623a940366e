"""The Arrow trajectory schema: round trip, version stamp, and the checks that keep bad records out."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from actors.trajectory import (
    SCHEMA,
    SCHEMA_VERSION,
    Trajectory,
    from_record_batch,
    schema_version,
    to_record_batch,
)


def sample(group_index: int = 0, **changes: object) -> Trajectory:
    """A two-turn trajectory: 3 generated tokens, 2 inserted, 2 generated."""
    trajectory = Trajectory(
        prompt_id="q-7",
        group_index=group_index,
        policy_version=4,
        prompt_ids=[1, 2, 3],
        response_ids=[10, 11, 12, 50, 51, 13, 2],
        loss_mask=[1, 1, 1, 0, 0, 1, 1],
        behaviour_logprobs=[-0.5, -1.25, -0.125, 0.0, 0.0, -2.0, -0.25],
        reward=0.25,  # float32 columns: dyadic values survive exactly
        finished=True,
        end_reason="eos",
        num_turns=2,
        num_searches=1,
        generated_tokens=5,
        inserted_tokens=2,
        generation_seconds=0.5,
        retrieval_seconds=0.25,
        format_valid=True,
        answer=None,
        response_text="<think>x</think><search>q</search> <result>\np\n</result><answer>\\boxed{y}</answer>",
    )
    return dataclasses.replace(trajectory, **changes)


def test_round_trip_keeps_every_field() -> None:
    trajectories = [sample(0), sample(1, reward=0.75, answer="Paris", truncated=True, end_reason="length")]
    batch = to_record_batch(trajectories)
    assert batch.schema.equals(SCHEMA) and batch.num_rows == 2
    assert from_record_batch(batch) == trajectories


def test_schema_carries_its_version_and_survives_ipc() -> None:
    batch = to_record_batch([sample()])
    assert schema_version(batch) == SCHEMA_VERSION
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    table = pa.ipc.open_stream(sink.getvalue()).read_all()
    assert from_record_batch(table) == [sample()]


def test_learner_columns_have_the_types_it_expects() -> None:
    assert SCHEMA.field("response_ids").type == pa.list_(pa.int32())
    assert SCHEMA.field("loss_mask").type == pa.list_(pa.int8())
    assert SCHEMA.field("behaviour_logprobs").type == pa.list_(pa.float32())
    assert SCHEMA.field("reward").type == pa.float32()
    assert SCHEMA.field("policy_version").type == pa.int64()


def test_an_empty_response_is_a_valid_row() -> None:
    empty = sample(response_ids=[], loss_mask=[], behaviour_logprobs=[], finished=False, end_reason="length")
    assert from_record_batch(to_record_batch([empty])) == [empty]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"loss_mask": [1, 1]}, "differ in length"),
        ({"behaviour_logprobs": [0.0]}, "differ in length"),
        ({"end_reason": "crashed"}, "end_reason"),
    ],
)
def test_inconsistent_records_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_record_batch([sample(**changes)])


def test_other_schema_versions_and_missing_columns_are_refused() -> None:
    batch = to_record_batch([sample()])
    old = batch.replace_schema_metadata({b"research.trajectory_schema": b"0"})
    with pytest.raises(ValueError, match="schema version 0"):
        from_record_batch(old)
    without_reward = pa.RecordBatch.from_arrays(
        [batch.column(name) for name in SCHEMA.names if name != "reward"],
        schema=pa.schema([f for f in SCHEMA if f.name != "reward"], metadata=SCHEMA.metadata),
    )
    with pytest.raises(ValueError, match="reward"):
        from_record_batch(without_reward)
