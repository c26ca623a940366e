"""The ReSearch rollout: one async task per trajectory, token ids in and out, search results spliced in.

Each trajectory loops on its own: generate until `</search>` (kept) or EOS; on `</search>` take the query between
the last `<search>` and it, retrieve, append the tokens of ` <result>\\n{passages}\\n</result>` (the framing of the
ReSearch reference code) and generate again. No barrier across trajectories: while one waits for retrieval, the
engine keeps decoding the others. The ids and behaviour logprobs vLLM returned are kept as they are: generated text
is never re-tokenised, only the inserted block is tokenised. The loss mask is 1 on generated tokens and 0 on inserted
ones (prompt tokens live in their own column).

A trajectory ends at EOS (finished), at the response token budget (truncated; an inserted block that does not fit
is cut to the budget) or at the turn limit (a search issued in the last allowed turn is not executed).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pyarrow as pa

from actors.config import SamplingConfig
from actors.engine import GenerationResult
from actors.reward import reward_fn as lookup_reward_fn
from actors.tags import RESULT_CLOSE, SEARCH_CLOSE, extract_search_query
from actors.trajectory import Trajectory, to_record_batch

RESULT_TEMPLATE = " <result>\n{}\n</result>"
"""What the environment inserts after a search call (ReSearch's rollout writes exactly this)."""
EMPTY_QUERY_RESULT = "invalid query"
"""Result text for a search call without a query (ReSearch's search() answers the same)."""
RETRIEVAL_ERROR_RESULT = "Search failed: the retrieval service did not answer. Continue without this result."
"""Result text when the retrieval client gave up after its retries; counted in `retrieval_errors`."""


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
    """What the loop needs of retrieval (retrieval_service.client.RetrievalClient)."""

    async def search(self, queries: list[str], topk: int) -> list[list[Any]]: ...


@dataclass
class PromptGroup:
    """One prompt to sample a group for: its id, token ids and the golden answers that score it."""

    prompt_id: str
    prompt_ids: list[int]
    golden_answers: list[str]


@dataclass
class SearchSettings:
    """How search calls are answered: passages per call and the text format inside <result>."""

    topk: int = 5
    result_style: Literal["research", "searchr1"] = "research"
    reward_fn: Literal["research", "toy-low-token-ids"] = "research"


def result_text(passages: list[Any], style: str) -> str:
    """The text inside a result block; a literal `</result>` in a passage would end the block early, so it goes."""
    from retrieval_service.client import format_result_block

    return format_result_block(passages, style).replace(RESULT_CLOSE, "")


@dataclass
class TrajectoryState:
    """A trajectory being built: the record plus the response text so far (generated and inserted pieces)."""

    trajectory: Trajectory
    budget: int
    """Response tokens allowed: the sampling budget, capped so prompt + response fits the engine."""
    pieces: list[str] = field(default_factory=list)

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

    def end(self, reason: str) -> None:
        """Record why the trajectory stopped."""
        t = self.trajectory
        t.end_reason = reason
        t.finished = reason == "eos"
        t.truncated = reason == "length"

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


def start_state(
    prompt_ids: Sequence[int], max_response_tokens: int, max_model_len: int, *, prompt_id: str, group_index: int,
    policy_version: int,
) -> TrajectoryState:
    """An empty trajectory for one prompt with its response budget."""
    trajectory = Trajectory(
        prompt_id=prompt_id, group_index=group_index, policy_version=policy_version, prompt_ids=list(prompt_ids)
    )
    budget = min(max_response_tokens, max_model_len - len(prompt_ids))
    return TrajectoryState(trajectory=trajectory, budget=budget)


def search_query(state: TrajectoryState, result: GenerationResult) -> str | None:
    """The query if this generation ended in a search call, else None (EOS, length, another stop)."""
    if result.finish_reason != "stop" or result.stop_reason != SEARCH_CLOSE:
        return None
    # A </search> with no <search> before it still gets a (well-formed, empty-query) result block.
    return extract_search_query(state.text) or ""


async def retrieve_block(backend: SearchBackend, query: str, settings: SearchSettings) -> tuple[str, bool]:
    """The result text for one search call and whether retrieval failed."""
    from retrieval_service.client import RetrievalError

    if not query:
        return EMPTY_QUERY_RESULT, False
    try:
        (passages,) = await backend.search([query], settings.topk)
    except RetrievalError:
        return RETRIEVAL_ERROR_RESULT, True
    return result_text(passages, settings.result_style), False


def turn_seed(sampling: SamplingConfig, prompt_id: str, group_index: int, turn: int) -> int | None:
    """A distinct reproducible seed per (prompt, sample, turn) when the run is seeded; None otherwise."""
    if sampling.seed is None:
        return None
    # crc32, not hash(): Python salts str hashes per process, and seeds must repeat across runs and actors.
    mixed = zlib.crc32(f"{sampling.seed}/{prompt_id}/{group_index}/{turn}".encode())
    return mixed & 0x7FFFFFFF


async def run_trajectory(
    engine: Engine, backend: SearchBackend, prompt_ids: Sequence[int], sampling: SamplingConfig,
    settings: SearchSettings, *, prompt_id: str = "", group_index: int = 0, policy_version: int = 0,
) -> Trajectory:
    """Sample one trajectory with the search loop (unscored: the reward fields keep their defaults)."""
    state = start_state(
        prompt_ids, sampling.max_response_tokens, engine.max_model_len, prompt_id=prompt_id,
        group_index=group_index, policy_version=policy_version,
    )
    await _search_loop(state, engine, backend, sampling, settings)
    state.trajectory.response_text = state.text
    return state.trajectory


async def _search_loop(
    state: TrajectoryState, engine: Engine, backend: SearchBackend, sampling: SamplingConfig,
    settings: SearchSettings,
) -> None:
    t = state.trajectory
    for turn in range(sampling.max_turns):
        if state.remaining <= 0:
            state.end("length")
            return
        started = time.perf_counter()
        result = await engine.generate(
            state.context_ids(), state.remaining, sampling, stop=(SEARCH_CLOSE,),
            seed=turn_seed(sampling, t.prompt_id, t.group_index, turn),
        )
        state.add_generated(result, time.perf_counter() - started)
        query = search_query(state, result)
        if query is None:
            state.end("length" if result.finish_reason == "length" else "eos")
            return
        t.num_searches += 1
        if turn == sampling.max_turns - 1:
            break
        started = time.perf_counter()
        block, failed = await retrieve_block(backend, query, settings)
        t.retrieval_seconds += time.perf_counter() - started
        t.retrieval_errors += int(failed)
        if not state.insert_result(block, engine.tokenizer):
            return
    state.end("max_turns")


def score(trajectory: Trajectory, golden_answers: Sequence[str], reward_fn: str = "research") -> Trajectory:
    """Fill the reward and its parts with the registered reward function `reward_fn` (actors.reward.REWARD_FNS)."""
    lookup_reward_fn(reward_fn)(trajectory, golden_answers)
    return trajectory


async def rollout_group(
    engine: Engine, backend: SearchBackend, group: PromptGroup, group_size: int, sampling: SamplingConfig,
    settings: SearchSettings | None = None, policy_version: int = 0,
) -> pa.RecordBatch:
    """`group_size` trajectories of one prompt, sampled concurrently, scored together, as one Arrow record batch."""
    settings = settings or SearchSettings()
    trajectories = await asyncio.gather(*(
        run_trajectory(
            engine, backend, group.prompt_ids, sampling, settings, prompt_id=group.prompt_id, group_index=index,
            policy_version=policy_version,
        )
        for index in range(group_size)
    ))
    for trajectory in trajectories:
        score(trajectory, group.golden_answers, settings.reward_fn)
    return to_record_batch(list(trajectories))
