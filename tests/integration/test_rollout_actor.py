"""The RolloutActor as a whole: prompt groups from the world's questions in, one scored Arrow batch per group out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.config import RolloutConfig
from actors.prompts import Question, build_prompt_ids
from actors.rollout_actor import remote_rollout_actor
from actors.trajectory import SCHEMA, from_record_batch
from tests.scripted_policy import TokenChain, scripted_policy, text_path


def sampled_chain(tokenizer: Any) -> TokenChain:
    """Think, search a random question word zero or more times, answer "Paris"."""
    tok = {t: text_path(tokenizer, t)[0] for t in ("<think>", "</think>", "<search>", "<answer>", " who", " born",
                                                     "</search>", "</result>")}
    start = tokenizer.encode("\n", add_special_tokens=False)[-1]
    answer = text_path(tokenizer, "<answer>", " The final answer is \\boxed{Paris}", "</answer>")
    return (
        TokenChain()
        .path([start, tok["<think>"], tok["</think>"]])
        .branch(tok["</think>"], {tok["<search>"]: 0.5, tok["<answer>"]: 0.5})
        .branch(tok["<search>"], {tok[" who"]: 0.5, tok[" born"]: 0.5})
        .path([tok[" who"], tok["</search>"]]).path([tok[" born"], tok["</search>"]])
        .path([tok["</result>"], tok["<think>"]])
        .path([*answer, tokenizer.eos_token_id])
    )


@pytest.mark.slow
def test_groups_come_back_scored_stamped_and_counted(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any, dev_questions: list[dict]
) -> None:
    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, sampled_chain(tokenizer)), 201)
    actor.metrics(reset=True)
    groups = [
        Question(q["id"], build_prompt_ids(q["question"], "instruct", tokenizer), q["golden_answers"])
        for q in dev_questions[:3]
    ]
    batches = run(actor.generate_groups(groups))
    assert [b.schema for b in batches] == [SCHEMA] * 3
    for group, batch in zip(groups, batches, strict=True):
        trajectories = from_record_batch(batch)
        assert len(trajectories) == actor.config.group_size
        assert {t.prompt_id for t in trajectories} == {group.prompt_id}
        assert {t.policy_version for t in trajectories} == {201}
        assert all(t.prompt_ids == group.prompt_ids for t in trajectories)

    streamed = run(actor.generate_groups(groups[:2], policy_version=7))
    assert sorted(b.column("prompt_id")[0].as_py() for b in streamed) == sorted(g.prompt_id for g in groups[:2])
    assert all(set(b.column("policy_version").to_pylist()) == {7} for b in streamed)

    metrics = actor.metrics()
    size = actor.config.group_size
    assert metrics["groups"] == 5 and metrics["trajectories"] == 5 * size
    rows = [t for b in batches + streamed for t in from_record_batch(b)]
    assert metrics["num_searches"] == sum(t.num_searches for t in rows)
    assert metrics["generated_tokens"] == sum(t.generated_tokens for t in rows)
    assert metrics["policy_version"] == 201 and metrics["in_flight_groups"] == 0
    health = run(actor.health())
    assert health["ok"] and health["worker_policy_versions"] == [201]


def test_ray_actor_factory_reserves_the_configured_resources() -> None:
    config = RolloutConfig(cpus_per_actor=3, gpus_per_actor=2)
    options = remote_rollout_actor("some/policy", config).actor_class._default_options
    assert (options["num_cpus"], options["num_gpus"]) == (3, 2)


@pytest.mark.slow
def test_driver_call_overrides_sampling_and_group_size(actor: Any, load_policy: Any, tiny_dir: Path, run: Any) -> None:
    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, sampled_chain(tokenizer)), 202)
    prompt_ids = build_prompt_ids("Who founded Varen?", "instruct", tokenizer)
    batch = run(actor.generate_group(Question("p", prompt_ids, ["Paris"]), 5, sampling={"temperature": 0.0},
                                     group_size=3))
    trajectories = from_record_batch(batch)
    assert len(trajectories) == 3 and {t.policy_version for t in trajectories} == {5}
    assert len({tuple(t.response_ids) for t in trajectories}) == 1  # greedy: three identical samples
