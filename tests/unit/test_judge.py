"""The LLM judge client against a scripted OpenAI-compatible server on 127.0.0.1 (a paid API's interface, faked).

The server answers /v1/chat/completions from a script keyed by the question inside the prompt: valid verdicts,
fenced JSON, garbage, a judgement outside {correct, incorrect}, HTTP 500s, and slow replies to measure concurrency.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from qa.judge import (
    JudgeSettings,
    LLMJudge,
    Verdict,
    VerdictCache,
    build_judge_prompt,
    cache_key,
    parse_verdict,
)

VALID = '{"rationale": "same person", "judgement": "correct"}'


class ScriptedJudge:
    """State of the fake judge: requests per question, bodies and headers seen, concurrency reached."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def reply(self, question: str) -> tuple[int, str]:
        """(HTTP status, message content) for the n-th request about `question`."""
        n = self.calls[question]
        script = {
            "valid": (200, VALID),
            "fenced": (200, 'Sure.\n```json\n{"rationale": "different city", "judgement": "Incorrect"}\n```'),
            "garbage": (200, "I think it is probably right!"),
            "garbage-once": (200, "not json") if n == 1 else (200, VALID),
            "bad-judgement": (200, '{"rationale": "hmm", "judgement": "maybe"}'),
            "error": (500, "internal error"),
            "error-once": (500, "overloaded") if n == 1 else (200, VALID),
            "unauthorized": (401, "bad key"),
        }
        return script.get(question, (200, VALID))


def _app(state: ScriptedJudge) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> JSONResponse:
        body = await request.json()
        question = re.search(r"question: (.*)\n", body["messages"][0]["content"]).group(1)
        state.calls[question] += 1
        state.bodies.append(body)
        state.headers.append(dict(request.headers))
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if question.startswith("slow"):
                await asyncio.sleep(0.2)
            status, content = state.reply(question)
        finally:
            state.in_flight -= 1
        if status != 200:
            return JSONResponse({"error": content}, status_code=status)
        return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}]})

    return app


@pytest.fixture(scope="module")
def judge_server() -> Iterator[tuple[str, ScriptedJudge]]:
    """The scripted judge on a free 127.0.0.1 port; yields (base_url, state)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    state = ScriptedJudge()
    server = uvicorn.Server(uvicorn.Config(_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "fake judge did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", state
    server.should_exit = True
    thread.join(timeout=10)


def _settings(url: str, **changes: object) -> JudgeSettings:
    return JudgeSettings(base_url=url, model="judge-model", api_key_env="RESEARCH_TEST_JUDGE_KEY",
                         backoff_s=0.01, **changes)  # type: ignore[arg-type]


async def _judge(settings: JudgeSettings, items: list[tuple[str, str | None, list[str]]],
                 cache: Path | None = None) -> tuple[list[Verdict], int]:
    async with LLMJudge(settings, cache) as judge:
        verdicts = await judge.judge_many(items)
        return verdicts, judge.requests


def test_parse_verdict_accepts_plain_and_fenced_json() -> None:
    assert parse_verdict(VALID) == ("correct", "same person")
    assert parse_verdict('```json\n{"rationale": "r", "judgement": " Incorrect "}\n```') == ("incorrect", "r")
    assert parse_verdict('Here: {"judgement": "correct", "rationale": "x"} done') == ("correct", "x")


@pytest.mark.parametrize("reply", ["", "correct", "{not json}", "[1, 2]", '{"judgement": "maybe"}',
                                   '{"rationale": "no judgement"}'])
def test_parse_verdict_refuses_what_is_not_a_verdict(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_verdict(reply)


def test_prompt_carries_question_prediction_and_every_golden_answer() -> None:
    prompt = build_judge_prompt("Who?", "Ada", ["Ada Lovelace", "Augusta Ada King"])
    assert "question: Who?" in prompt and "pred_answer: Ada" in prompt
    assert "['Ada Lovelace', 'Augusta Ada King']" in prompt and '"judgement"' in prompt


def test_verdicts_are_parsed_retried_or_recorded_unjudged(judge_server, monkeypatch) -> None:
    url, state = judge_server
    monkeypatch.setenv("RESEARCH_TEST_JUDGE_KEY", "sk-test")
    items = [(q, "Paris", ["Paris"]) for q in
             ("valid", "fenced", "garbage", "garbage-once", "bad-judgement", "error", "error-once", "unauthorized")]
    verdicts, _ = asyncio.run(_judge(_settings(url, max_attempts=3), items))
    by_question = {q: v for (q, _, _), v in zip(items, verdicts, strict=True)}
    assert by_question["valid"].correct and by_question["valid"].rationale == "same person"
    assert by_question["fenced"].status == "incorrect"
    assert by_question["garbage-once"].correct and state.calls["garbage-once"] == 2
    assert by_question["error-once"].correct and state.calls["error-once"] == 2
    for question in ("garbage", "bad-judgement", "error"):
        assert by_question[question].status == "unjudged" and not by_question[question].correct
        assert by_question[question].error
        assert state.calls[question] == 3  # retried up to max_attempts
    # A 401 will not get better by asking again.
    assert by_question["unauthorized"].status == "unjudged" and state.calls["unauthorized"] == 1
    assert "401" in by_question["unauthorized"].error
    body = state.bodies[0]
    assert body["temperature"] == 0.0 and body["model"] == "judge-model"
    assert all(h.get("authorization") == "Bearer sk-test" for h in state.headers)


def test_empty_prediction_is_incorrect_without_a_request(judge_server) -> None:
    url, state = judge_server
    before = sum(state.calls.values())
    verdicts, requests = asyncio.run(_judge(_settings(url), [("valid", None, ["x"]), ("valid", "  ", ["x"])]))
    assert [v.status for v in verdicts] == ["incorrect", "incorrect"]
    assert requests == 0 and sum(state.calls.values()) == before


def test_concurrency_limit_holds(judge_server) -> None:
    url, state = judge_server
    state.max_in_flight = 0
    items = [(f"slow-{i}", "a", ["a"]) for i in range(12)]
    verdicts, _ = asyncio.run(_judge(_settings(url, concurrency=3), items))
    assert all(v.correct for v in verdicts)
    assert state.max_in_flight == 3


def test_cache_on_disk_answers_repeats_and_skips_unjudged(judge_server, tmp_path) -> None:
    url, state = judge_server
    cache = tmp_path / "verdicts.jsonl"
    items = [("cached-q", "Rome", ["Rome"]), ("garbage", "Rome", ["Rome"])]
    first, first_requests = asyncio.run(_judge(_settings(url, max_attempts=1), items, cache))
    assert [v.status for v in first] == ["correct", "unjudged"] and first_requests == 2
    # A new client (a resumed eval) reads the file: the real verdict is reused, the unjudged one is asked again.
    second, second_requests = asyncio.run(_judge(_settings(url, max_attempts=1), items, cache))
    assert second[0].correct and second[0].cached and second_requests == 1
    # The key covers the golden answers and the judge model: changing either is a new verdict.
    assert VerdictCache(cache).get(cache_key("judge-model", "cached-q", "Rome", ["Rome"])) is not None
    assert VerdictCache(cache).get(cache_key("judge-model", "cached-q", "Rome", ["Roma"])) is None
    assert VerdictCache(cache).get(cache_key("other-model", "cached-q", "Rome", ["Rome"])) is None
    # A line cut short by a kill is ignored, not fatal.
    with cache.open("a") as handle:
        handle.write('{"key": "abc", "stat')
    assert len(VerdictCache(cache)) == 1
    assert json.loads(cache.read_text().splitlines()[0])["status"] == "correct"


def test_unreachable_endpoint_is_unjudged_not_an_exception() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = _settings(f"http://127.0.0.1:{port}/v1", max_attempts=2, timeout_s=2.0)
    verdicts, requests = asyncio.run(_judge(settings, [("valid", "Paris", ["Paris"])]))
    assert verdicts[0].status == "unjudged" and "request failed" in verdicts[0].error and requests == 2
