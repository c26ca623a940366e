"""The ReSearch rollout: a group of trajectories for one question, each its own async loop of generate and search.

    rollout_group   -> group_size trajectories of one Question, sampled concurrently, scored, one Arrow batch
    run_trajectory  -> generate until `</search>` or EOS; on `</search>` retrieve, insert the result block, repeat

No barrier across trajectories: while one waits for retrieval the engine keeps decoding the others. Token ids and
behaviour logprobs are kept exactly as vLLM returned them (generated text is never re-tokenised); only the inserted
result block is tokenised. loss_mask is 1 on generated tokens and 0 on inserted ones.

A trajectory ends at EOS (finished; under `sampling.finish_on: eos-token`, the reference's rule, only the tokenizer's
eos_token finishes it, and another EOS id of the model ends it unfinished: end_reason "other_eos", reward 0), at the
response token budget (truncated: an inserted block that does not fit is cut to the budget) or, when
`sampling.max_turns` is set, at the turn limit: a search issued in the last allowed turn is not executed and not
counted (end_reason "max_turns", logged as such). The reference code has no turn limit.
A generation that vLLM ended for any other reason (abort, error) raises UnfinishedGeneration: the driver requeues the
prompt rather than training on a cut-off response.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from actors.config import SamplingConfig
from actors.engine import GenerationResult
from actors.prompts import (
    RESULT_TEMPLATE,
    RETRIEVAL_ERROR_RESULT,
    Question,
    ResultStyle,
    format_passages,
)
from actors.tags import SEARCH_CLOSE, extract_search_query
from actors.trajectory import Trajectory, to_record_batch

Reward = Callable[[Trajectory, Sequence[str]], None]
"""Fills a finished trajectory's reward and its parts (actors.reward.reward_fn picks one from the config)."""


class RolloutFailed(RuntimeError):
    """A group that must not be trained on: the driver requeues its prompt."""


class UnfinishedGeneration(RolloutFailed):
    """vLLM ended a generation for a reason that is neither EOS, a stop string nor the token budget."""


class SearchFailed(RolloutFailed):
    """A search of the group found no replica answering for the whole outage wait."""


async def rollout_group(
    engine: Engine, search: SearchTool, question: Question, group_size: int, sampling: SamplingConfig,
    reward: Reward, policy_version: int = 0, keep_failed_searches: bool = False,
) -> pa.RecordBatch:
    """`group_size` trajectories of one question, sampled concurrently, scored, as one Arrow record batch; a group
    with a failed search raises SearchFailed unless `keep_failed_searches`."""
    trajectories = await asyncio.gather(*(
        run_trajectory(engine, search, question, sampling, group_index=index, policy_version=policy_version)
        for index in range(group_size)
    ))
    failed = sum(t.retrieval_errors for t in trajectories)
    if failed and not keep_failed_searches:
        raise SearchFailed(f"{failed} searches of {question.prompt_id} failed: no retrieval replica answered")
    for trajectory in trajectories:
        reward(trajectory, question.golden_answers)
    return to_record_batch(list(trajectories))


async def run_trajectory(
    engine: Engine, search: SearchTool, question: Question, sampling: SamplingConfig, *, group_index: int = 0,
    policy_version: int = 0,
) -> Trajectory:
    """Sample one trajectory with the search loop (unscored: the reward fields keep their defaults)."""
    state = TrajectoryState.start(question, sampling.max_response_tokens, engine.max_model_len, group_index,
                                  policy_version)
    t = state.trajectory
    turn = 0
    while True:
        if state.remaining <= 0:
            return state.end("length")
        started = time.perf_counter()
        result = await engine.generate(
            state.context_ids(), state.remaining, sampling, stop=(SEARCH_CLOSE,),
            seed=turn_seed(sampling, t.prompt_id, group_index, turn),
        )
        state.add_generated(result, time.perf_counter() - started)
        turn += 1
        if result.finish_reason == "length":
            return state.end("length")
        if result.finish_reason != "stop":
            raise UnfinishedGeneration(f"vLLM finished a generation of {t.prompt_id} with {result.finish_reason!r}")
        if result.stop_reason != SEARCH_CLOSE:
            return state.end(eos_end_reason(result, sampling))
        if sampling.max_turns is not None and turn >= sampling.max_turns:
            return state.end("max_turns")  # the search of the last allowed turn is neither run nor counted
        t.num_searches += 1
        # A </search> without a <search> before it still gets a (well-formed, empty-query) result block.
        query = extract_search_query(state.text) or ""
        started = time.perf_counter()
        block, failed = await search(query)
        t.retrieval_seconds += time.perf_counter() - started
        t.retrieval_errors += int(failed)
        if not state.insert_result(block, engine.tokenizer):
            return state.trajectory


def eos_end_reason(result: GenerationResult, sampling: SamplingConfig) -> str:
    """"eos", or "other_eos" when vLLM stopped on an EOS id other than the tokenizer's and only that one finishes.

    vLLM reports the tokenizer's eos_token as stop_reason None and every other EOS id of the model's
    generation_config (Qwen2.5-Instruct: <|endoftext|> besides <|im_end|>) as that token id; we pass no stop
    token ids of our own, so an int here is always such an EOS. The reference scores those responses 0
    (verl/utils/reward_score/re_search.py:161, the response must end with tokenizer.eos_token).
    """
    if isinstance(result.stop_reason, int) and sampling.finish_on == "eos-token":
        return "other_eos"
    return "eos"


class Engine(Protocol):
    """What the loop needs of an engine (actors.engine.RolloutEngine)."""

    max_model_len: int

    @property
    def tokenizer(self) -> Any: ...

    async def generate(
        self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingConfig,
        stop: Sequence[str] = ..., seed: int | None = None,
    ) -> GenerationResult: ...


class SearchBackend(Protocol):
    """What the search tool needs of retrieval (retrieval_service.client.RetrievalClient)."""

    async def search(self, queries: list[str], topk: int) -> list[list[Any]]: ...


@dataclass
class SearchTool:
    """Answers one search call with the text of its result block: top-k passages formatted in `style`.

    While no replica answers, it keeps trying for `outage_wait_s` (a replica that died comes back in seconds): an
    outage costs time, not a trajectory.
    """

    backend: SearchBackend
    topk: int = 5
    style: ResultStyle = "research"
    outage_wait_s: float = 0.0
    empty_query_result: str | None = None
    """The text an empty query gets without searching; None searches the empty string, as the reference's
    training rollout does (ReCall re-search, src/verl/workers/rollout/vllm_rollout/vllm_rollout.py:392-416)."""

    async def __call__(self, query: str) -> tuple[str, bool]:
        """(result text, whether retrieval failed) for one query; an empty one is searched unless
        `empty_query_result` gives its text."""
        from retrieval_service.client import RetrievalError

        if not query and self.empty_query_result is not None:
            return self.empty_query_result, False
        deadline, pause = time.monotonic() + self.outage_wait_s, 0.5
        while True:
            try:
                (passages,) = await self.backend.search([query], self.topk)
                return format_passages(passages, self.style), False
            except RetrievalError:
                if time.monotonic() + pause > deadline:
                    return RETRIEVAL_ERROR_RESULT, True
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)


@dataclass
class TrajectoryState:
    """A trajectory being built: the record plus the response text so far (generated and inserted pieces)."""

    trajectory: Trajectory
    budget: int
    """Response tokens allowed: the sampling budget, capped so prompt + response fits the engine."""
    pieces: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, question: Question, max_response_tokens: int, max_model_len: int, group_index: int,
              policy_version: int) -> TrajectoryState:
        """An empty trajectory for one question with its response budget."""
        trajectory = Trajectory(prompt_id=question.prompt_id, group_index=group_index, policy_version=policy_version,
                                prompt_ids=list(question.prompt_ids))
        return cls(trajectory, min(max_response_tokens, max_model_len - len(question.prompt_ids)))

    @property
    def text(self) -> str:
        """The response text so far."""
        return "".join(self.pieces)

    @property
    def remaining(self) -> int:
        """Response tokens still allowed."""
        return self.budget - len(self.trajectory.response_ids)

    def context_ids(self) -> list[int]:
        """Prompt and response ids: what the next generation call continues."""
        return self.trajectory.prompt_ids + self.trajectory.response_ids

    def add_generated(self, result: GenerationResult, seconds: float) -> None:
        """Append what the policy generated: mask 1, vLLM's behaviour logprobs."""
        t = self.trajectory
        t.response_ids.extend(result.token_ids)
        t.loss_mask.extend([1] * len(result.token_ids))
        t.behaviour_logprobs.extend(result.logprobs)
        t.generated_tokens += len(result.token_ids)
        t.generation_seconds += seconds
        t.num_turns += 1
        self.pieces.append(result.text)

    def add_inserted(self, token_ids: list[int], text: str) -> None:
        """Append environment tokens: mask 0, logprob 0.0."""
        t = self.trajectory
        t.response_ids.extend(token_ids)
        t.loss_mask.extend([0] * len(token_ids))
        t.behaviour_logprobs.extend([0.0] * len(token_ids))
        t.inserted_tokens += len(token_ids)
        self.pieces.append(text)

    def insert_result(self, block: str, tokenizer: Any) -> bool:
        """Append the result block, cut to the budget; False (and ended as truncated) if it did not fit."""
        text = RESULT_TEMPLATE.format(block)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if len(ids) <= self.remaining:
            self.add_inserted(ids, text)
            return True
        ids = ids[: max(self.remaining, 0)]
        self.add_inserted(ids, tokenizer.decode(ids) if ids else "")
        self.end("length")
        return False

    def end(self, reason: str) -> Trajectory:
        """Record why the trajectory stopped and its final text; returns the trajectory."""
        t = self.trajectory
        t.end_reason = reason
        t.finished = reason == "eos"
        t.truncated = reason == "length"
        t.response_text = self.text
        return t


def turn_seed(sampling: SamplingConfig, prompt_id: str, group_index: int, turn: int) -> int | None:
    """A distinct reproducible seed per (prompt, sample, turn) when the run is seeded; None otherwise."""
    if sampling.seed is None:
        return None
    # crc32, not hash(): Python salts str hashes per process, and seeds must repeat across runs and actors.
    mixed = zlib.crc32(f"{sampling.seed}/{prompt_id}/{group_index}/{turn}".encode())
    return mixed & 0x7FFFFFFF
