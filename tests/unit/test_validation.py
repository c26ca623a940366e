"""Sampled validation: per-question means from real record batches, the bootstrap intervals, the learning block
written to summary.json, and the curves that show the interval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actors.trajectory import Trajectory, to_record_batch
from cluster.validation import (
    LEARNING_METRIC,
    ValidationLog,
    bootstrap_mean_ci,
    learning_block,
    learning_from_file,
    paired_bootstrap_ci,
    per_question,
    validation_results,
)


def _trajectory(prompt_id: str, reward: float, searches: int, em: float = 0.0) -> Trajectory:
    trajectory = Trajectory(prompt_id=prompt_id, group_index=0, policy_version=0, prompt_ids=[1, 2])
    trajectory.response_ids, trajectory.loss_mask, trajectory.behaviour_logprobs = [3], [1], [-0.5]
    trajectory.reward, trajectory.f1, trajectory.em, trajectory.num_searches = reward, reward, em, searches
    return trajectory


HOPS = {"w:a": 1, "w:b": 2, "w:c": 2}


def _batches(rewards: dict[str, list[tuple[float, int, float]]]) -> list:
    return [to_record_batch([_trajectory(pid, r, s, em) for r, s, em in rows]) for pid, rows in rewards.items()]


def test_per_question_means_and_correct_two_search_share() -> None:
    results = per_question(_batches({"w:b": [(1.0, 2, 1.0), (0.1, 1, 0.0), (1.0, 1, 1.0), (0.5, 3, 0.0)]}))
    assert results["w:b"] == pytest.approx({"reward": 0.65, "f1": 0.65, "searches": 1.75,
                                            "correct_two_search": 0.25, "samples": 4.0})


def test_validation_results_split_greedy_and_sampled_by_hop() -> None:
    greedy = _batches({"w:a": [(1.0, 1, 1.0)], "w:b": [(0.1, 1, 0.0)], "w:c": [(1.0, 2, 1.0)]})
    sampled = _batches({"w:a": [(1.0, 1, 1.0), (0.0, 0, 0.0)], "w:b": [(0.1, 1, 0.0), (1.0, 2, 1.0)],
                        "w:c": [(1.0, 2, 1.0), (1.0, 2, 1.0)]})
    scalars, results = validation_results(greedy, sampled, HOPS)
    assert scalars["val/reward_2hop"] == pytest.approx(0.55) and scalars["val/searches_2hop"] == pytest.approx(1.5)
    assert scalars["val/reward"] == pytest.approx(0.7)
    assert scalars[LEARNING_METRIC] == pytest.approx((0.55 + 1.0) / 2)
    assert scalars["val/searches_2hop_sampled"] == pytest.approx(1.75)
    assert scalars["val/correct_two_search_2hop_sampled"] == pytest.approx(0.75)
    assert scalars["val/reward_1hop_sampled"] == pytest.approx(0.5)
    low, high = scalars["val/reward_2hop_sampled_ci_lo"], scalars["val/reward_2hop_sampled_ci_hi"]
    assert 0.55 <= low <= scalars[LEARNING_METRIC] <= high <= 1.0
    assert "val/reward_2hop_ci_lo" not in scalars  # greedy per-hop means carry no interval
    assert set(results["sampled"]) == {"w:a", "w:b", "w:c"} and results["greedy"]["w:c"]["searches"] == 2.0


def test_bootstrap_intervals() -> None:
    assert bootstrap_mean_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))
    # A constant paired change has a zero-width interval, however spread the questions themselves are.
    before = np.linspace(0.0, 0.9, 64)
    assert paired_bootstrap_ci(before, before + 0.2) == pytest.approx((0.2, 0.2))
    # Noisy changes: the interval holds the observed mean change, is about +-1.96 standard errors wide, and is
    # narrower than an unpaired one would be because the question effect cancels.
    rng = np.random.default_rng(1)
    question = rng.uniform(0, 1, 200)
    change = rng.normal(0.1, 0.2, 200)
    low, high = paired_bootstrap_ci(question, question + change)
    assert low < change.mean() < high
    assert (high - low) / 2 == pytest.approx(1.96 * change.std() / np.sqrt(200), rel=0.15)
    assert paired_bootstrap_ci(question, question + change, seed=0) == (low, high)  # seeded: reproducible
    with pytest.raises(ValueError):
        paired_bootstrap_ci(np.zeros(3), np.zeros(4))


def test_learning_block_pairs_two_hop_questions_of_the_first_and_last_validation() -> None:
    hops = {f"w:{k}": 2 for k in range(64)} | {"w:one": 1}
    first = {"step": 0, "hops": hops,
             "sampled": {pid: {"reward": 0.2, "searches": 1.0, "samples": 4.0} for pid in hops}}
    last = {"step": 24, "hops": hops,
            "sampled": {pid: {"reward": 0.2 + (0.3 if k % 2 else 0.0), "searches": 1.5, "samples": 4.0}
                        for k, pid in enumerate(hops)}}
    del last["sampled"]["w:3"]  # a question missing at one end is left out of the paired comparison
    block = learning_block(first, last)
    assert block["metric"] == LEARNING_METRIC and block["n_questions"] == 63
    assert block["before"] == pytest.approx(0.2) and block["after"] == pytest.approx(0.2 + 0.3 * 31 / 63)
    assert block["searches_2hop_before"] == 1.0 and block["searches_2hop_after"] == 1.5
    low, high = block["ci95"]
    assert 0.0 < low < block["change"] < high < 0.3
    assert (block["step_before"], block["step_after"], block["samples_per_question"]) == (0, 24, 4)
    json.dumps(block)  # goes into summary.json as is


def test_validation_log_gives_the_learning_block_and_curves_show_the_interval(tmp_path: Path) -> None:
    from cluster.metrics import MetricsLogger, plot_curves, portable

    log = ValidationLog(tmp_path, HOPS)
    greedy = _batches({"w:a": [(1.0, 1, 1.0)], "w:b": [(0.1, 1, 0.0)], "w:c": [(0.1, 1, 0.0)]})
    before = log.observe(0, greedy, _batches({"w:b": [(0.1, 1, 0.0)] * 4, "w:c": [(0.1, 1, 0.0)] * 4}))
    assert learning_from_file(tmp_path) is None  # one validation: nothing to compare yet
    after = log.observe(5, greedy, _batches({"w:b": [(1.0, 2, 1.0)] * 4, "w:c": [(1.0, 2, 1.0)] * 4}))
    block = log.learning()
    assert block is not None and (block["before"], block["after"]) == pytest.approx((0.1, 1.0))
    assert block["ci95"] == pytest.approx([0.9, 0.9]) and block["searches_2hop_after"] == 2.0
    metrics = MetricsLogger(tmp_path, tensorboard=False)
    metrics.log(0, before)
    metrics.log(1, {"reward/mean": 0.3, "rollout/response_length": 100.0, "rollout/searches": 1.2})
    metrics.log(5, after)
    metrics.close()
    assert plot_curves(tmp_path).stat().st_size > 0
    summary = portable({"learning": block, "curves": str(tmp_path / "curves.png"), "other": "/elsewhere"}, tmp_path)
    assert summary["curves"] == "curves.png" and summary["other"] == "/elsewhere"


def test_validation_questions_are_drawn_per_hop_count(tmp_path: Path) -> None:
    """data.val_per_hop: that many questions of each hop count, seeded; asking for more than the file holds fails."""
    from transformers import AutoTokenizer

    from cluster.job_setup import load_questions
    from cluster.models import tiny_policy_dir
    from cluster.samples import question_hops
    from qa.world import generate_world

    generate_world(tmp_path, seed=0, num_passages=300, num_dev=30)
    dev = [tmp_path / "dev.jsonl"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir())
    drawn = load_questions(dev, tokenizer, "instruct", 512, sample_seed=0, per_hop={1: 3, 2: 12})
    hops = question_hops(dev)
    assert sorted(hops[q.prompt_id] for q in drawn) == [1] * 3 + [2] * 12
    again = load_questions(dev, tokenizer, "instruct", 512, sample_seed=0, per_hop={1: 3, 2: 12})
    assert [q.prompt_id for q in again] == [q.prompt_id for q in drawn]
    with pytest.raises(ValueError, match="16 2-hop questions wanted"):
        load_questions(dev, tokenizer, "instruct", 512, sample_seed=0, per_hop={2: 16})
