"""Validation samples (samples.jsonl, TensorBoard text, per-hop metrics) and the per-step progress line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from actors.prompts import Question
from actors.trajectory import Trajectory, to_record_batch
from cluster.metrics import MetricsLogger
from cluster.progress import ProgressLine, total_steps
from cluster.samples import ValidationSamples, question_hops, read_samples
from cluster.validation import ValidationLog

RESPONSE = ("<think> I need the city. </think>\n<search> where was Ada born </search> <result>\n\"Ada\"\nAda was born "
            "in Velmora.\n</result>\n<think> Velmora. </think>\n<answer> The final answer is \\[ \\boxed{Velmora} \\] "
            "</answer>")


def trajectory(prompt_id: str, reward: float, searches: int, text: str = RESPONSE) -> Trajectory:
    return Trajectory(prompt_id=prompt_id, group_index=0, policy_version=0, prompt_ids=[1, 2], response_ids=[3],
                      loss_mask=[1], behaviour_logprobs=[0.0], reward=reward, num_searches=searches,
                      end_reason="eos", finished=True, response_text=text, format_valid=reward > 0, f1=reward,
                      answer="Velmora")


def test_samples_are_written_with_their_searches_results_and_reward_parts(tmp_path: Path) -> None:
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": f"dev_{i}", "question": f"Q{i}?", "golden_answers": ["Velmora"],
                                       "metadata": {"hops": 1 + i % 2}}) + "\n" for i in range(4)))
    hops = question_hops([dev])
    assert hops == {"flashrag:dev_0": 1, "flashrag:dev_1": 2, "flashrag:dev_2": 1, "flashrag:dev_3": 2}
    questions = [Question(f"flashrag:dev_{i}", [1, 2], ["Velmora"], f"Q{i}?") for i in range(4)]
    batches = [to_record_batch([trajectory("flashrag:dev_0", 1.0, 1)]), to_record_batch([trajectory("flashrag:dev_2", 0.0, 0, "x")]),
               to_record_batch([trajectory("flashrag:dev_1", 0.1, 2)]), to_record_batch([trajectory("flashrag:dev_3", 0.0, 0, "y")])]
    metrics = MetricsLogger(tmp_path / "run", tensorboard=True)
    samples = ValidationSamples(tmp_path / "run", questions, None, "base", 2, hops)
    samples.observe(3, batches, metrics)
    metrics.close()
    # the per-hop means of the same validation (ValidationLog's greedy scalars)
    scalars = ValidationLog(tmp_path / "run", hops).observe(3, batches, [])
    per_hop = {k: v for k, v in scalars.items() if "hop" in k and "correct_two_search" not in k}
    assert per_hop == pytest.approx({"val/reward_1hop": 0.5, "val/f1_1hop": 0.5, "val/searches_1hop": 0.5,
                                     "val/reward_2hop": 0.05, "val/f1_2hop": 0.05, "val/searches_2hop": 1.0})
    records = read_samples(tmp_path / "run")
    assert [r["hops"] for r in records] == [1, 2]  # one of each kind of question
    first = records[0]
    assert first["step"] == 3 and first["question"] == "Q0?" and first["prompt"].endswith("User: Q0?. Assistant:")
    assert first["searches"] == ["where was Ada born"] and first["results"] == ['"Ada"\nAda was born in Velmora.']
    assert (first["reward"], first["format_valid"], first["answer"]) == (1.0, True, "Velmora")
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # the TensorBoard text went somewhere


def test_hop_metrics_skip_questions_without_hops(tmp_path: Path) -> None:
    scalars = ValidationLog(tmp_path, {}).observe(0, [to_record_batch([trajectory("a", 1.0, 1)])], [])
    assert scalars and not [k for k in scalars if "hop" in k]


def test_progress_line_has_reward_searches_seconds_and_eta() -> None:
    stream = io.StringIO()
    progress = ProgressLine(10, True, stream)
    line = progress.step(1, {"reward/mean": 0.25, "reward/format_valid": 0.5, "rollout/searches": 1.25,
                             "time/step": 60.0})
    assert line == stream.getvalue().strip()
    assert line.startswith("[step 1/10] reward 0.250 | format 0.50 | searches 1.25 | step 60 s | ETA ")
    assert line.endswith("9 min")  # 9 steps left at the ~60 s the first one took
    quiet = io.StringIO()
    ProgressLine(10, False, quiet).step(1, {})
    assert quiet.getvalue() == ""


def test_total_steps_is_max_steps_or_the_epochs_in_batches() -> None:
    from cluster.config import TrainerConfig

    assert total_steps(TrainerConfig(max_steps=7), 100) == 7
    # Each epoch ends on its own: 10 prompts are 2 full batches and a partial one, which drop_last drops.
    assert total_steps(TrainerConfig(epochs=2, batch_size=4), 10) == 4
    assert total_steps(TrainerConfig(epochs=2, batch_size=4, drop_last=False), 10) == 6


def test_batch_metrics_give_reward_and_share_by_search_count() -> None:
    from cluster.metrics import batch_metrics

    group = to_record_batch([trajectory("q", 0.0, 2), trajectory("q", 1.0, 2), trajectory("q", 0.1, 1),
                             trajectory("q", 0.0, 4)])
    metrics = batch_metrics([group], policy_version=0)
    assert metrics["reward/searches_2_share"] == 0.5 and metrics["reward/searches_2_mean"] == 0.5
    assert metrics["reward/searches_1_mean"] == pytest.approx(0.1) and metrics["reward/searches_3+_share"] == 0.25
    assert metrics["reward/searches_0_share"] == 0.0 and "reward/searches_0_mean" not in metrics
