"""The trajectory record and its Arrow schema: what a rollout actor hands the learner, one record batch per group.

The learner reads only the token columns (prompt_ids, response_ids, loss_mask, behaviour_logprobs), reward,
policy_version, prompt_id and group_index; every other column is a per-trajectory metric for the dashboard.
`response_ids`, `loss_mask` and `behaviour_logprobs` have the same length; behaviour_logprobs is 0.0 wherever
loss_mask is 0 (tokens the environment inserted carry no sampling probability).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import pyarrow as pa

SCHEMA_VERSION = 1
"""Bumped whenever a column changes meaning, type or disappears; stored in the schema metadata."""

END_REASONS = ("eos", "other_eos", "length", "max_turns")
"""Why a trajectory ended: the tokenizer's EOS, another EOS id of the model (unfinished under the reference's rule,
`sampling.finish_on`), the response token budget, or the turn limit."""

SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_index", pa.int32(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("behaviour_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("finished", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("end_reason", pa.string(), nullable=False),
        pa.field("num_turns", pa.int32(), nullable=False),
        pa.field("num_searches", pa.int32(), nullable=False),
        pa.field("retrieval_errors", pa.int32(), nullable=False),
        pa.field("generated_tokens", pa.int32(), nullable=False),
        pa.field("inserted_tokens", pa.int32(), nullable=False),
        pa.field("generation_seconds", pa.float32(), nullable=False),
        pa.field("retrieval_seconds", pa.float32(), nullable=False),
        pa.field("format_valid", pa.bool_(), nullable=False),
        pa.field("f1", pa.float32(), nullable=False),
        pa.field("em", pa.float32(), nullable=False),
        pa.field("answer", pa.string(), nullable=True),
        pa.field("response_text", pa.string(), nullable=False),
    ],
    metadata={b"research.trajectory_schema": str(SCHEMA_VERSION).encode()},
)


@dataclass
class Trajectory:
    """One sampled response to one prompt: tokens, loss mask, behaviour logprobs, reward and counts."""

    prompt_id: str
    group_index: int
    policy_version: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    finished: bool = False
    truncated: bool = False
    end_reason: str = "max_turns"
    num_turns: int = 0
    num_searches: int = 0
    retrieval_errors: int = 0
    generated_tokens: int = 0
    inserted_tokens: int = 0
    generation_seconds: float = 0.0
    retrieval_seconds: float = 0.0
    format_valid: bool = False
    f1: float = 0.0
    em: float = 0.0
    answer: str | None = None
    response_text: str = ""

    @property
    def response_length(self) -> int:
        """Response tokens, inserted result tokens included."""
        return len(self.response_ids)


_FIELD_NAMES = [f.name for f in fields(Trajectory)]
assert _FIELD_NAMES == SCHEMA.names, "Trajectory fields and SCHEMA columns must match one to one, in order"


def schema_version(batch: pa.RecordBatch | pa.Table) -> int:
    """The trajectory schema version a batch was written with (0 if it carries none)."""
    metadata = batch.schema.metadata or {}
    return int(metadata.get(b"research.trajectory_schema", b"0"))


def to_record_batch(trajectories: list[Trajectory]) -> pa.RecordBatch:
    """One Arrow record batch holding `trajectories` (a group, usually), in SCHEMA."""
    for trajectory in trajectories:
        lengths = {len(trajectory.response_ids), len(trajectory.loss_mask), len(trajectory.behaviour_logprobs)}
        if len(lengths) != 1:
            raise ValueError(f"trajectory {trajectory.prompt_id}/{trajectory.group_index}: response_ids, loss_mask "
                             f"and behaviour_logprobs differ in length")
        if trajectory.end_reason not in END_REASONS:
            raise ValueError(f"unknown end_reason {trajectory.end_reason!r}")
    columns = [[getattr(t, name) for t in trajectories] for name in _FIELD_NAMES]
    arrays = [pa.array(column, type=column_field.type) for column, column_field in zip(columns, SCHEMA, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> list[Trajectory]:
    """Trajectories back from a batch written by `to_record_batch`; refuses other schema versions."""
    version = schema_version(batch)
    if version != SCHEMA_VERSION:
        raise ValueError(f"trajectory schema version {version}; this code reads version {SCHEMA_VERSION}")
    missing = [name for name in _FIELD_NAMES if name not in batch.schema.names]
    if missing:
        raise ValueError(f"trajectory batch lacks columns: {', '.join(missing)}")
    columns = {name: batch.column(name).to_pylist() for name in _FIELD_NAMES}
    return [Trajectory(**{name: columns[name][row] for name in _FIELD_NAMES}) for row in range(batch.num_rows)]
