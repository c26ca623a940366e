"""The ReSearch reward (paper Eq. 2): F1 of the boxed answer when the format is valid, 0.1 for a valid format with
F1 = 0, and 0 for an invalid format. Pure text in, float out: a malformed model output is a scored trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

from actors.tags import extract_answer, is_valid_format
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


def score_details(
    response_text: str, golden_answers: Sequence[str] | str, finished: bool = True
) -> ScoreDetails:
    """Format validity, extracted answer, F1, EM and the Eq. 2 reward of one response."""
    format_valid = is_valid_format(response_text, finished)
    # Answer metrics are reported even when the format is invalid: "right answer, broken format" is a diagnosis
    # worth seeing on the dashboard, although Eq. 2 gives it no reward.
    answer = extract_answer(response_text)
    f1 = scoring.f1(answer, golden_answers) if answer is not None else 0.0
    em = scoring.exact_match(answer, golden_answers) if answer is not None else 0.0
    if not format_valid:
        reward = 0.0
    elif f1 > 0.0:
        reward = f1
    else:
        reward = FORMAT_REWARD
    return ScoreDetails(format_valid=format_valid, answer=answer, f1=f1, em=em, reward=reward)


def compute_score(response_text: str, golden_answers: Sequence[str] | str, finished: bool = True) -> float:
    """Paper Eq. 2: 0 if the format is invalid, else the answer's F1, or 0.1 when that F1 is 0."""
    return score_details(response_text, golden_answers, finished)["reward"]


TOY_TOKEN_THRESHOLD = 512


def toy_low_token_ids_reward(response_ids: Sequence[int], loss_mask: Sequence[int]) -> float:
    """Share of the policy's own tokens (loss_mask 1) whose id is below 512: not the method's reward, but a signal a
    random tiny policy learns in a few GRPO steps, so end-to-end tests can prove sign, masking and weight sync."""
    own = [token for token, keep in zip(response_ids, loss_mask, strict=True) if keep]
    return sum(token < TOY_TOKEN_THRESHOLD for token in own) / len(own) if own else 0.0


def _research(trajectory: Trajectory, golden_answers: Sequence[str]) -> Trajectory:
    details = score_details(trajectory.response_text, list(golden_answers), finished=trajectory.finished)
    trajectory.reward = float(details["reward"])
    trajectory.format_valid = bool(details["format_valid"])
    trajectory.f1, trajectory.em, trajectory.answer = float(details["f1"]), float(details["em"]), details["answer"]
    return trajectory


def _toy(trajectory: Trajectory, golden_answers: Sequence[str]) -> Trajectory:
    _research(trajectory, golden_answers)  # the answer metrics stay on the dashboard
    trajectory.reward = toy_low_token_ids_reward(trajectory.response_ids, trajectory.loss_mask)
    return trajectory


REWARD_FNS: dict[str, Callable[[Trajectory, Sequence[str]], Trajectory]] = {
    "research": _research, "toy-low-token-ids": _toy,
}


def reward_fn(name: str) -> Callable[[Trajectory, Sequence[str]], Trajectory]:
    """The function that fills a trajectory's reward and its parts, by its config name (`rollout.reward_fn`)."""
    if name not in REWARD_FNS:
        raise ValueError(f"unknown reward function {name!r}; expected one of {', '.join(REWARD_FNS)}")
    return REWARD_FNS[name]
