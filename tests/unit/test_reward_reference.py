"""The default reward equals the ReSearch reference's on its 400 recorded cases; each difference of the strict grammar
from it, on hand-written responses; the reward-function registry behind `rollout.reward_fn`."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from actors import research_grammar
from actors.config import RolloutConfig
from actors.reward import (
    FORMAT_REWARD,
    REWARD_FNS,
    compute_score,
    research_verdict,
    reward_fn,
    score_details,
    strict_compute_score,
    strict_score_details,
)
from actors.trajectory import Trajectory

CASES = "reference_reward/cases.jsonl"


def _cases(shared_data: Path) -> list[dict[str, typing.Any]]:
    path = shared_data / CASES
    if not path.is_file():
        pytest.skip(f"reference reward cases not found at {path}")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- the 400 reference cases ------------------------------------------------------------------------------------

def test_default_reward_equals_reference_on_every_case(shared_data: Path) -> None:
    cases = _cases(shared_data)
    assert len(cases) == 400
    mismatches = []
    for index, case in enumerate(cases):
        reward = compute_score(case["response"], case["golden_answers"], case["finished"])
        if abs(reward - case["reference_score"]) > 1e-9:
            mismatches.append((index, reward, case["reference_score"], case["reference_reason"]))
    assert mismatches == []


def test_reference_reasons_match_too(shared_data: Path) -> None:
    # The reason names the first rule a response breaks, so equal reasons pin the order of the checks as well.
    for case in _cases(shared_data):
        verdict = research_verdict(case["response"], case["golden_answers"], case["finished"])
        assert verdict.reason == case["reference_reason"], case["response"]
        assert verdict.details["format_valid"] == (case["reference_score"] > 0)


def test_strict_grammar_disagrees_with_reference_on_51_cases(shared_data: Path) -> None:
    # The count the issue reported for the former default; it documents how far apart the two options are.
    disagreements = sum(
        abs(strict_compute_score(case["response"], case["golden_answers"], case["finished"]) - case["reference_score"])
        > 1e-9
        for case in _cases(shared_data)
    )
    assert disagreements == 51


# --- each difference, hand-written ------------------------------------------------------------------------------

BOX = "<answer> The final answer is \\boxed{Paris} </answer>"
THINK = "<think> t </think>"
SEARCH = "<search> q </search> <result>\n\"Paris\"\nParis is the capital of France.\n</result>"


@pytest.mark.parametrize(
    ("response", "reference", "strict"),
    [
        pytest.param(THINK + BOX, 1.0, 1.0, id="plain"),
        pytest.param("<think> t " + BOX + " </think>", 1.0, 0.0, id="answer inside think"),
        pytest.param(THINK + BOX + " <think> more </think>", 1.0, 0.0, id="think after answer"),
        pytest.param(THINK + BOX + " " + SEARCH, 1.0, 0.0, id="search after answer"),
        pytest.param("<think><think> t </think></think>" + BOX, 1.0, 0.0, id="nested think"),
        pytest.param("</think> t <think>" + BOX, 1.0, 0.0, id="think closed before opened"),
        pytest.param(THINK + " stray </search> " + BOX, 1.0, 0.0, id="stray search close"),
        pytest.param(THINK + " <result> made up </result> " + BOX, 1.0, 0.0, id="result without search"),
        pytest.param(THINK + " text </result> " + BOX, 1.0, 0.0, id="stray result close"),
        pytest.param("<search> <think>x</think> </search> <result>\n\n</result>" + BOX, 1.0, 0.0,
                     id="think inside search query"),
        pytest.param(THINK + "<answer><think>x</think> \\boxed{Paris} </answer>", 1.0, 0.0, id="tag inside answer"),
        pytest.param(THINK + "<search> q </search> <result>\nNested </result> tag.\n</result>" + BOX, 1.0, 0.0,
                     id="result close quoted in passage"),
        pytest.param(THINK + "<search> q </search> <result>\nA page quoting <answer>.\n</result>" + BOX, 0.0, 1.0,
                     id="answer tag quoted in passage"),
        pytest.param("<search> q </search> <result>\nThe <think> tag.\n</result>" + THINK + BOX, 0.0, 1.0,
                     id="think tag quoted in passage"),
        pytest.param(THINK + "<answer> The final answer is \\boxed {Paris} </answer>", 0.0, 1.0, id="boxed space"),
        pytest.param(THINK + "<answer> \\boxed{\\text{Paris}} </answer>", FORMAT_REWARD, 1.0, id="text wrapper"),
        pytest.param(THINK + "<answer> \\boxed {London} or \\boxed{Paris} </answer>", FORMAT_REWARD, 1.0,
                     id="boxed space anywhere wins"),
        pytest.param(THINK + "<answer> \\boxed{Paris} \\boxedx{London} </answer>", 0.0, 1.0,
                     id="last boxed not followed by brace"),
        # The reference counts "\\}" as the closing brace (answer "Paris \\"); the strict grammar reads it as content.
        pytest.param(THINK + "<answer> \\boxed{Paris \\} x} </answer>", 1.0, 2 / 3, id="escaped brace"),
    ],
)
def test_reference_and_strict_scores(response: str, reference: float, strict: float) -> None:
    assert compute_score(response, ["Paris"]) == pytest.approx(reference, abs=1e-9)
    assert strict_compute_score(response, ["Paris"]) == pytest.approx(strict, abs=1e-9)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("<think> t " + BOX, "bad format: <think> </think> not paired"),
        (BOX, "bad format: <think> or </think> not found"),
        (THINK + BOX + BOX, "bad format: <answer> or </answer> not found"),
        (THINK + "<search> q </search>" + BOX, "bad format: search/result tags are incomplete"),
        (THINK + "<search> q <result> r </result> </search>" + BOX,
         "bad format: search/result tags are nested in the wrong order"),
        # A <search> quoted after a passage's inner </result> is scanned as a call of its own.
        (THINK + "<search> q </search><result> a </result> see <search> b </result>" + BOX,
         "bad format: search/result tags are incomplete"),
        (THINK + "</answer> \\boxed{Paris} <answer>", "bad format: <answer> must be before </answer>"),
        (THINK + "<answer> Paris </answer>", "bad format: answer is missing \\boxed{} format"),
        (THINK + "<answer> \\boxed{Paris </answer>", "bad format: answer is missing \\boxed{} format"),
        (THINK + "<answer> \\boxed{{Paris} </answer>", "find box error"),
        (THINK + BOX, "correct answer, get f1 score: 1.0"),
        (THINK + "<answer> \\boxed{ London } </answer>", "wrong answer but good format:  London "),
    ],
)
def test_reference_reasons(response: str, reason: str) -> None:
    assert research_verdict(response, ["Paris"]).reason == reason


def test_truncated_response_scores_zero_after_the_format_check() -> None:
    truncated = research_verdict(THINK + BOX, ["Paris"], finished=False)
    assert truncated.reason == "over length"
    assert truncated.details == {"format_valid": False, "answer": "Paris", "f1": 1.0, "em": 1.0, "reward": 0.0}
    # The reference checks the format first, so a truncated malformed response reports its format problem.
    assert research_verdict(BOX, ["Paris"], finished=False).reason == "bad format: <think> or </think> not found"


def test_score_details_keys_and_answer_stripped() -> None:
    details = score_details(THINK + "<answer> \\boxed{ Paris } </answer>", ["Paris"])
    assert details == {"format_valid": True, "answer": "Paris", "f1": 1.0, "em": 1.0, "reward": 1.0}
    assert set(strict_score_details(THINK + BOX, ["Paris"])) == set(details)


@pytest.mark.parametrize(
    ("block", "answer"),
    [
        (" \\boxed{Paris} ", "Paris"),
        (" $\\boxed{Paris}$ ", "Paris"),
        (" \\boxed{a} and \\boxed{b} ", "b"),
        (" \\boxed{{x}} ", "{x}"),
        (" \\boxed{} ", ""),
        (" \\boxed {x} and $y$ ", "{x} and "),
        (" \\boxed{a \\} b} ", "a \\"),
        (" \\boxed{a ", None),
        (" \\boxed}{x} ", None),
        (" \\fbox{x} ", None),
        (" no box ", None),
    ],
)
def test_reference_boxed_answer(block: str, answer: str | None) -> None:
    assert research_grammar.boxed_answer(block) == answer


# --- the registry -----------------------------------------------------------------------------------------------

def test_registry_names_are_the_config_choices() -> None:
    choices = typing.get_args(RolloutConfig.model_fields["reward_fn"].annotation)
    assert set(choices) == set(REWARD_FNS)
    assert RolloutConfig().reward_fn == "research"
    assert RolloutConfig(reward_fn="research-strict").reward_fn == "research-strict"


def test_unknown_reward_fn_names_the_choices() -> None:
    with pytest.raises(ValueError, match="research-strict"):
        reward_fn("reserch")


def _trajectory(response: str) -> Trajectory:
    return Trajectory(prompt_id="p", group_index=0, policy_version=0, prompt_ids=[1], response_ids=[3, 900],
                      loss_mask=[1, 1], behaviour_logprobs=[0.0, 0.0], finished=True, response_text=response)


@pytest.mark.parametrize(
    ("name", "reward", "format_valid", "answer"),
    [
        ("research", FORMAT_REWARD, True, "\\text{Paris}"),
        ("research-strict", 1.0, True, "Paris"),
        ("toy-low-token-ids", 0.5, True, "\\text{Paris}"),  # one of the two policy tokens is below 512
    ],
)
def test_reward_fn_fills_the_trajectory(
    name: str, reward: float, format_valid: bool, answer: str
) -> None:
    trajectory = _trajectory(THINK + "<answer> \\boxed{\\text{Paris}} </answer>")
    reward_fn(name)(trajectory, ["Paris"])
    assert trajectory.reward == pytest.approx(reward)
    assert trajectory.format_valid is format_valid
    assert trajectory.answer == answer
    assert trajectory.f1 == (1.0 if name == "research-strict" else 0.0)
    assert trajectory.em == trajectory.f1
