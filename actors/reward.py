"""The ReSearch reward (paper Eq. 2): F1 of the boxed answer when the format is valid, 0.1 for a valid format with
F1 = 0, and 0 for an invalid format. Pure text in, float out: a malformed model output is a scored trajectory.

Two format grammars: "research" (the default) reproduces the reference implementation's checks
(actors.research_grammar), "research-strict" is this project's stricter grammar (actors.tags). `reward_fn(name)`
returns the function that fills a trajectory's reward fields for a `rollout.reward_fn` name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, TypedDict

from actors import research_grammar, tags
from actors.trajectory import Trajectory
from qa import scoring

FORMAT_REWARD = 0.1
"""Reward for a well-formed response whose answer shares no token with any golden answer (Eq. 2)."""


class ScoreDetails(TypedDict):
    """Everything the reward is made of, for metrics: the reward itself and the parts that explain it."""

    format_valid: bool
    answer: str | None
    f1: float
    em: float
    reward: float


class Verdict(NamedTuple):
    """The reference's score of one response and the reason string it gives with it."""

    details: ScoreDetails
    reason: str


def _answer_metrics(answer: str | None, golden_answers: Sequence[str] | str) -> tuple[float, float]:
    """F1 and EM of an extracted answer (0 for no answer)."""
    if answer is None:
        return 0.0, 0.0
    return scoring.f1(answer, golden_answers), scoring.exact_match(answer, golden_answers)


def research_verdict(response_text: str, golden_answers: Sequence[str] | str, finished: bool = True) -> Verdict:
    """The reference reward: its format check, then EOS, then the boxed answer's F1 (0.1 when 0), with its reason."""
    raw_answer = research_grammar.extract_answer(response_text)
    # Answer metrics are reported even when the format is invalid: "right answer, broken format" is a diagnosis
    # worth seeing on the dashboard, although Eq. 2 gives it no reward.
    answer = raw_answer.strip() if raw_answer is not None else None
    f1, em = _answer_metrics(raw_answer, golden_answers)

    def verdict(reward: float, reason: str) -> Verdict:
        # format_valid means "the format earned the reward", so it is False exactly when the reward is 0.
        details = ScoreDetails(format_valid=reward > 0.0, answer=answer, f1=f1, em=em, reward=reward)
        return Verdict(details, reason)

    # The reference checks the format before it looks for EOS, so a truncated response reports its format problem.
    problem = research_grammar.format_problem(response_text)
    if problem is not None:
        return verdict(0.0, f"bad format: {problem}")
    if not finished:
        return verdict(0.0, "over length")
    if raw_answer is None:
        # Only reached where the reference's own extraction raises (e.g. `\boxed{` with unbalanced braces); its reason
        # also carries the exception's text, which has no counterpart here.
        return verdict(0.0, "find box error")
    if f1 > 0.0:
        return verdict(f1, f"correct answer, get f1 score: {f1}")
    return verdict(FORMAT_REWARD, f"wrong answer but good format: {raw_answer}")


def score_details(
    response_text: str, golden_answers: Sequence[str] | str, finished: bool = True
) -> ScoreDetails:
    """Format validity, extracted answer, F1, EM and the Eq. 2 reward of one response, as the reference scores it."""
    return research_verdict(response_text, golden_answers, finished).details


def compute_score(response_text: str, golden_answers: Sequence[str] | str, finished: bool = True) -> float:
    """Paper Eq. 2 as the reference computes it: 0 if the format is invalid, else the answer's F1, or 0.1 for F1 0."""
    return score_details(response_text, golden_answers, finished)["reward"]


def strict_score_details(
    response_text: str, golden_answers: Sequence[str] | str, finished: bool = True
) -> ScoreDetails:
    """Like `score_details` under the strict grammar of actors.tags (tag order, no tags read inside results)."""
    format_valid = tags.is_valid_format(response_text, finished)
    answer = tags.extract_answer(response_text)
    f1, em = _answer_metrics(answer, golden_answers)
    if not format_valid:
        reward = 0.0
    elif f1 > 0.0:
        reward = f1
    else:
        reward = FORMAT_REWARD
    return ScoreDetails(format_valid=format_valid, answer=answer, f1=f1, em=em, reward=reward)


def strict_compute_score(
    response_text: str, golden_answers: Sequence[str] | str, finished: bool = True
) -> float:
    """Paper Eq. 2 under the strict grammar."""
    return strict_score_details(response_text, golden_answers, finished)["reward"]


TOY_TOKEN_THRESHOLD = 512


def toy_low_token_ids_reward(response_ids: Sequence[int], loss_mask: Sequence[int]) -> float:
    """Share of the policy's own tokens (loss_mask 1) whose id is below 512: not the method's reward, but a signal a
    random tiny policy learns in a few GRPO steps, so end-to-end tests can prove sign, masking and weight sync."""
    own = [token for token, keep in zip(response_ids, loss_mask, strict=True) if keep]
    return sum(token < TOY_TOKEN_THRESHOLD for token in own) / len(own) if own else 0.0


RewardFn = Callable[[Trajectory, Sequence[str]], None]
"""Fills a trajectory's reward, format_valid, f1, em and answer from its response and the golden answers."""


def _fill(trajectory: Trajectory, details: ScoreDetails) -> None:
    """Copy score details onto the trajectory's reward fields."""
    trajectory.reward = float(details["reward"])
    trajectory.format_valid = bool(details["format_valid"])
    trajectory.f1 = float(details["f1"])
    trajectory.em = float(details["em"])
    trajectory.answer = details["answer"]


def _research(trajectory: Trajectory, golden_answers: Sequence[str]) -> None:
    """The reference reward."""
    _fill(trajectory, score_details(trajectory.response_text, list(golden_answers), trajectory.finished))


def _research_strict(trajectory: Trajectory, golden_answers: Sequence[str]) -> None:
    """Eq. 2 under the strict grammar."""
    _fill(trajectory, strict_score_details(trajectory.response_text, list(golden_answers), trajectory.finished))


def _toy_low_token_ids(trajectory: Trajectory, golden_answers: Sequence[str]) -> None:
    """The toy reward; the answer metrics are still the reference's, so dashboards keep their meaning."""
    _research(trajectory, golden_answers)
    trajectory.reward = toy_low_token_ids_reward(trajectory.response_ids, trajectory.loss_mask)


REWARD_FNS: dict[str, RewardFn] = {
    "research": _research,
    "research-strict": _research_strict,
    "toy-low-token-ids": _toy_low_token_ids,
}
"""The `rollout.reward_fn` names and what each fills in."""


def reward_fn(name: str) -> RewardFn:
    """The reward function registered under `name`; a ValueError naming the choices for an unknown one."""
    try:
        return REWARD_FNS[name]
    except KeyError:
        raise ValueError(f"unknown reward_fn {name!r}; choose one of {sorted(REWARD_FNS)}") from None
