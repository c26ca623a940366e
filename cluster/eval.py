"""The eval driver: greedy ReSearch rollouts of a policy over benchmark files, scored by EM/F1 and an LLM judge.

    python -m cluster.eval CONFIG --data FILE [--data NAME=FILE ...] --out DIR [--model PATH] [--actors N] [key=value ...]

It reuses the training config (policy, prompt template, engine, retrieval) and the training search loop: RolloutActors
(vLLM engine + retrieval client) with group size 1 at temperature 0, against the configured retrieval service URLs or
a service it starts over `retrieval.index_dir` (or the synthetic world's index). By default one actor runs in this
process with the service on 127.0.0.1; `--actors N` fans the questions out over N Ray actors (under `ray job submit`,
on the job's cluster) with the service as Ray replicas, and survives the death of all but one of them.
Each finished question is appended to `<out>/<benchmark>/records.jsonl` at once, so an interrupted eval resumes
where it stopped; a rerun with nothing left to roll out starts no engine and only judges and rewrites the tables.
Judging runs after the rollouts, over every record that has no verdict yet (so a judge can be added later).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from actors.config import RolloutConfig
from actors.prompts import Question
from cluster.config import ConfigError, JobConfig, load_config
from cluster.eval_report import (
    RECORDS,
    RecordsWriter,
    check_meta,
    read_records_file,
    summarize,
    write_records_file,
    write_tables,
)
from cluster.paper_results import canonical_benchmark
from qa.judge import JudgeSettings, LLMJudge
from qa.readers import read_records
from qa.records import QARecord
from qa.scoring import cover_exact_match
from retrieval_service.config import RetrievalConfig

log = logging.getLogger(__name__)


@dataclass
class Benchmark:
    """One benchmark file of the eval: its name (the output sub-directory) and its questions, keyed uniquely."""

    name: str
    path: Path
    questions: list[tuple[str, QARecord]]


def benchmark_name(path: Path) -> str:
    """hotpotqa, 2wikimultihopqa, musique or bamboogle when the file or its folder says so, else the file's stem."""
    return canonical_benchmark(path.name) or canonical_benchmark(path.parent.name) or path.stem


def load_benchmarks(data: Sequence[str], limit: int | None = None) -> list[Benchmark]:
    """Benchmarks from `--data` values (FILE or NAME=FILE), each limited to its first `limit` questions."""
    benchmarks: list[Benchmark] = []
    for value in data:
        name, _, file = value.rpartition("=") if "=" in value else ("", "", value)
        path = Path(file)
        name = name or benchmark_name(path)
        if any(b.name == name for b in benchmarks):
            name = f"{name}-{path.stem}"
        questions: list[tuple[str, QARecord]] = []
        seen: dict[str, int] = {}
        for record in read_records(path):
            if limit is not None and len(questions) >= limit:
                break
            # Some files repeat an id; the key must stay unique for resuming.
            seen[record.id] = seen.get(record.id, 0) + 1
            key = record.id if seen[record.id] == 1 else f"{record.id}#{seen[record.id]}"
            questions.append((key, record))
        benchmarks.append(Benchmark(name, path, questions))
    return benchmarks


def greedy_rollout_config(config: JobConfig) -> RolloutConfig:
    """The training rollout config turned into the paper's eval setting: one greedy sample per question."""
    rollout = config.rollout.model_copy(deep=True)
    rollout.num_actors = 1
    rollout.group_size = 1
    rollout.sampling.temperature = 0.0
    rollout.sampling.top_p = 1.0
    rollout.sampling.top_k = -1
    rollout.sampling.seed = config.seed
    return rollout


def eval_retrieval(config: JobConfig, urls: Sequence[str]) -> RetrievalConfig:
    """The retrieval config of the eval's actors: the job's, at `urls`, with the eval's empty-query text."""
    return config.retrieval.model_copy(update={"urls": list(urls),
                                               "empty_query_result": config.eval.empty_query_result})


def scored_prediction(row: dict[str, Any], truncated_answer: str = "empty") -> tuple[str | None, float, float]:
    """(answer, EM, F1) of a rolled-out row: with truncated_answer 'empty', a response cut by the token budget
    predicts "" and scores 0, as the reference's eval (ReCall, branch re-search,
    src/flashrag/pipeline/active_pipeline.py:81-95: over_length_flag sets pred to ""); 'keep' scores its answer."""
    if truncated_answer not in ("empty", "keep"):
        raise ValueError(f"unknown truncated_answer {truncated_answer!r}; expected 'empty' or 'keep'")
    if truncated_answer == "empty" and row["end_reason"] == "length":
        return "", 0.0, 0.0
    return row["answer"], float(row["em"]), float(row["f1"])


def eval_meta(config: JobConfig, model: str) -> dict[str, Any]:
    """What determines the records: a resumed eval must match it."""
    sampling = config.rollout.sampling
    return {
        "model": model,
        "prompt_template": config.rollout.prompt_template,
        "max_response_tokens": sampling.max_response_tokens,
        "max_turns": sampling.max_turns,
        "topk": config.retrieval.topk,
        "result_format": config.retrieval.result_format,
        "retrieval_index": config.retrieval.index_dir or "synthetic-world",
        "eval": config.eval.model_dump(),
    }


class EvalSession:
    """A greedy RolloutActor in this process and the retrieval service it searches (started here unless URLs are
    configured)."""

    def __init__(self, config: JobConfig, model: str, retrieval_urls: Sequence[str] = (),
                 log_dir: Path | None = None) -> None:
        from actors.rollout_actor import RolloutActor
        from cluster.models import resolve_policy

        self.config = config
        self._stack = contextlib.ExitStack()
        urls = list(retrieval_urls) or list(config.retrieval.urls)
        try:
            if not urls:
                from cluster.job_setup import ensure_index
                from retrieval_service.process import ServiceProcess

                log_path = (log_dir / "retrieval.log") if log_dir else None
                service = self._stack.enter_context(ServiceProcess(ensure_index(config), log_path=log_path))
                urls = [service.url]
            self.actor = RolloutActor(resolve_policy(model), greedy_rollout_config(config),
                                      eval_retrieval(config, urls), seed=config.seed)
        except BaseException:
            self._stack.close()
            raise
        self.tokenizer = self.actor.engine.tokenizer
        self.rollouts = 0
        """Questions rolled out by this session (tests check that a resume redoes none)."""

    async def _generate(self, question: Question) -> pa.RecordBatch:
        """The scored batch of one question's group."""
        return await self.actor.generate_group(question)

    async def rollout(self, key: str, record: QARecord) -> dict[str, Any]:
        """Roll out one question greedily and return its eval record."""
        from actors.prompts import build_prompt_ids

        prompt_ids = build_prompt_ids(record.question, self.config.rollout.prompt_template, self.tokenizer)
        batch = await self._generate(Question(key, prompt_ids, list(record.golden_answers), record.question))
        self.rollouts += 1
        row = batch.slice(0, 1).to_pylist()[0]
        answer, em, f1 = scored_prediction(row, self.config.eval.truncated_answer)
        return {
            "key": key,
            "id": record.id,
            "question": record.question,
            "golden_answers": list(record.golden_answers),
            "response": row["response_text"],
            "answer": answer,
            "format_valid": bool(row["format_valid"]),
            "em": em,
            "f1": f1,
            "cover_em": cover_exact_match(answer, record.golden_answers),
            "reward": float(row["reward"]),
            "num_searches": int(row["num_searches"]),
            "num_turns": int(row["num_turns"]),
            "response_tokens": int(row["generated_tokens"]),
            "inserted_tokens": int(row["inserted_tokens"]),
            "prompt_tokens": len(prompt_ids),
            "end_reason": row["end_reason"],
            "retrieval_errors": int(row["retrieval_errors"]),
            "judge": None,
        }

    async def aclose(self) -> None:
        """Stop the engine, then the retrieval service we started."""
        try:
            await self.actor.aclose()
        finally:
            self._stack.close()


class RayEvalSession(EvalSession):
    """The eval fanned out over `actors` greedy RolloutActors on Ray (placed like training's, one engine each).

    Each question goes to the actor with the fewest in flight. An actor that dies is dropped and its questions are
    retried on the others, once: a question whose rollout kills two actors stops the eval with its key rather than
    killing them all. When no actor is left the eval stops with an error; rerunning the command resumes it
    (finished questions are on disk). Without configured URLs the retrieval service runs as Ray replicas, reachable
    from every node.
    """

    def __init__(self, config: JobConfig, model: str, actors: int, retrieval_urls: Sequence[str] = (),
                 ray_address: str | None = None) -> None:
        import ray
        from transformers import AutoTokenizer

        from actors.rollout_actor import remote_rollout_actor
        from cluster.models import resolve_policy
        from cluster.train import connect_ray

        if actors < 1:
            raise ValueError(f"a Ray eval needs at least one rollout actor, not {actors}")
        self.config = config
        self.rollouts = 0
        self.replicas: list[Any] = []
        connect_ray(ray_address)
        from retrieval_service.config import TOKEN_ENV

        # The token of this process reaches the replicas and actors it starts, on whichever node Ray puts them.
        env_vars = {TOKEN_ENV: os.environ[TOKEN_ENV]} if os.environ.get(TOKEN_ENV) else None
        urls = list(retrieval_urls) or list(config.retrieval.urls)
        if not urls:
            from cluster.job_setup import ensure_index
            from cluster.retrieval_replicas import start_replicas

            retrieval = config.retrieval.model_copy(update={"index_dir": str(ensure_index(config))})
            self.replicas, urls = start_replicas(retrieval, config.retrieval.replicas, env_vars=env_vars)
        policy = resolve_policy(model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.policy.tokenizer or policy)
        make_actor = remote_rollout_actor(
            policy, greedy_rollout_config(config), eval_retrieval(config, urls), config.seed,
            env_vars=env_vars,
        )
        self.handles: list[Any] = [make_actor()[0] for _ in range(actors)]
        self._in_flight = [0] * actors
        self._ray = ray

    async def _generate(self, question: Question) -> pa.RecordBatch:
        from cluster.rollout_pool import ACTOR_GONE

        deaths = 0
        while True:
            if deaths >= 2:
                raise RuntimeError(f"question {question.prompt_id!r} killed {deaths} rollout actors; see the Ray logs")
            if not self.handles:
                raise RuntimeError("every rollout actor of the eval died (see the Ray logs); rerun to resume")
            index = min(range(len(self.handles)), key=self._in_flight.__getitem__)
            handle = self.handles[index]
            self._in_flight[index] += 1
            try:
                return await handle.generate_group.remote(question)
            except ACTOR_GONE:
                deaths += 1
                log.warning("rollout actor %d died; its questions go to the %d others", index, len(self.handles) - 1)
                if handle in self.handles:
                    position = self.handles.index(handle)
                    del self.handles[position], self._in_flight[position]
                    self._ray.kill(handle)
            finally:
                if handle in self.handles:
                    self._in_flight[self.handles.index(handle)] -= 1

    async def aclose(self) -> None:
        """Stop every engine cleanly, then kill the actors and the retrieval replicas we started."""
        from cluster.rollout_pool import stop_actors

        await asyncio.to_thread(stop_actors, list(self.handles))
        for replica in self.replicas:
            self._ray.kill(replica)


SessionSource = EvalSession | Callable[[], EvalSession]


async def _roll_out(benchmark: Benchmark, out_dir: Path, session: EvalSession, concurrency: int) -> None:
    """Roll out every question of `benchmark` that has no record yet, appending each record as it finishes."""
    path = out_dir / benchmark.name / RECORDS
    order = {key: index for index, (key, _) in enumerate(benchmark.questions)}
    complete = read_records_file(path)
    # Rewrite first: a line cut short by a kill must not be glued to the next appended record.
    write_records_file(path, complete)
    done = [r for r in complete if r.get("key") in order]
    finished = {r["key"] for r in done}
    pending = [(key, record) for key, record in benchmark.questions if key not in finished]
    if not pending:
        return
    slots = asyncio.Semaphore(concurrency)

    async def one(key: str, record: QARecord) -> dict[str, Any]:
        async with slots:
            return await session.rollout(key, record)

    writer = RecordsWriter(path)
    tasks = [asyncio.ensure_future(one(key, record)) for key, record in pending]
    try:
        with tqdm(total=len(benchmark.questions), initial=len(done), desc=benchmark.name, unit="q",
                  disable=None) as progress:
            for next_done in asyncio.as_completed(tasks):
                writer.append(await next_done)
                progress.update(1)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()


async def _judge(records: list[dict[str, Any]], judge: LLMJudge) -> int:
    """Fill the verdict of every record that has none or an unjudged one; returns how many were asked."""
    todo = [r for r in records if not r.get("judge") or r["judge"]["status"] == "unjudged"]
    verdicts = await judge.judge_many([(r["question"], r["answer"], r["golden_answers"]) for r in todo])
    for record, verdict in zip(todo, verdicts, strict=True):
        record["judge"] = verdict.to_json()
    return len(todo)


async def evaluate(
    benchmarks: Sequence[Benchmark], out_dir: Path, session: SessionSource, *, policy_name: str,
    judge_settings: JudgeSettings | None = None, concurrency: int = 64,
) -> Path:
    """Roll out what is missing, judge what is unjudged, write records in file order and the tables; returns results.md.

    `session` is an EvalSession, or a callable that starts one: it is then started only if a question is left
    to roll out, and closed here.
    """
    active = session if isinstance(session, EvalSession) else None
    owned = active is None
    try:
        for benchmark in benchmarks:
            path = out_dir / benchmark.name / RECORDS
            keys = {key for key, _ in benchmark.questions}
            if keys <= {r.get("key") for r in read_records_file(path)}:
                continue
            if active is None:
                active = session()  # type: ignore[operator]  # a factory: start the engine only when needed
            await _roll_out(benchmark, out_dir, active, concurrency)
    finally:
        if owned and active is not None:
            await active.aclose()

    rows = []
    judge = LLMJudge(judge_settings, out_dir / "judge_cache.jsonl") if judge_settings else None
    try:
        for benchmark in benchmarks:
            path = out_dir / benchmark.name / RECORDS
            order = {key: index for index, (key, _) in enumerate(benchmark.questions)}
            complete = read_records_file(path)
            by_key = {r["key"]: r for r in complete if r.get("key") in order}
            records = sorted(by_key.values(), key=lambda r: order[r["key"]])
            if judge is not None:
                asked = await _judge(records, judge)
                log.info("%s: judged %d answers (%d HTTP requests so far)", benchmark.name, asked, judge.requests)
            # Records of questions outside this run (an earlier, larger --limit) stay in the file, after ours.
            write_records_file(path, records + [r for r in complete if r.get("key") not in order])
            # Verdicts an earlier run recorded still count when this run configures no judge.
            judged = judge is not None or bool(records) and all(r.get("judge") for r in records)
            rows.append(summarize(benchmark.name, records, policy_name, judged=judged))
    finally:
        if judge is not None:
            await judge.aclose()
    description = None
    if judge_settings is not None:
        description = f"{judge_settings.model} at {judge_settings.base_url}"
    elif any(row["lj"] is not None for row in rows):
        description = "the verdicts recorded by an earlier run (no judge configured for this one)"
    return write_tables(out_dir, rows, description)


def _parser() -> argparse.ArgumentParser:
    """The argument parser of `research eval`."""
    from cluster.cli import CommandParser, non_negative_int, positive_int

    parser = CommandParser("research eval", "Evaluate a policy on benchmark files: greedy search rollouts scored by "
                           "EM/F1 and, optionally, an LLM judge; rerun with the same --out to resume.",
                           config_help=True)
    parser.add_argument("config", help="the training config (YAML file or preset name)")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides of the config, e.g. retrieval.topk=3")
    parser.add_argument("--data", action="append", required=True,
                        help="benchmark file in any format qa/ reads, or NAME=FILE; repeatable")
    parser.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    parser.add_argument("--model", default=None,
                        help="checkpoint export or HF model to evaluate (default: the config's policy)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="evaluate only the first N questions of each file")
    parser.add_argument("--actors", type=non_negative_int, default=0,
                        help="rollout actors on Ray to fan the questions out over (0 = one engine in this process)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join with --actors (default: $RAY_ADDRESS, the job's cluster, or a local one)")
    parser.add_argument("--concurrency", type=positive_int, default=None,
                        help="questions in flight at once (default: the engine's max_num_seqs per actor)")
    parser.add_argument("--restart", action="store_true", help="discard records of a different earlier eval")
    judge = parser.add_argument_group("LLM-as-a-Judge (any OpenAI-compatible chat endpoint)")
    judge.add_argument("--judge-url", default=None, help="base URL with version prefix, e.g. http://127.0.0.1:8001/v1")
    judge.add_argument("--judge-model", default=None, help="model the judge endpoint serves (the paper: gpt-4o-mini)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var holding the judge's API key")
    judge.add_argument("--judge-concurrency", type=positive_int, default=8, help="judge requests in flight at once")
    judge.add_argument("--judge-structured", action="store_true", help="ask for the verdict JSON schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `research eval` and `python -m cluster.eval`."""
    from cluster.cli import fail, log_progress
    from cluster.config import check_paths

    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.judge_url) != bool(args.judge_model):
        return fail(parser.prog, "--judge-url and --judge-model go together")
    try:
        config = load_config(args.config, args.overrides)
        check_paths(config, data=False)
        benchmarks = load_benchmarks(args.data, args.limit)
        model = args.model or config.policy.name_or_path
        out_dir = Path(args.out)
        check_meta(out_dir, eval_meta(config, model), args.restart)
    except (ConfigError, ValueError, OSError) as error:
        return fail(parser.prog, error)
    log_progress("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.restart:
        for benchmark in benchmarks:
            (out_dir / benchmark.name / RECORDS).unlink(missing_ok=True)
    judge = None
    if args.judge_url:
        judge = JudgeSettings(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                              concurrency=args.judge_concurrency, structured_output=args.judge_structured)
    concurrency = args.concurrency or config.rollout.engine.max_num_seqs * max(args.actors, 1)

    def start_session() -> EvalSession:
        if args.actors:
            return RayEvalSession(config, model, args.actors, ray_address=args.ray_address)
        return EvalSession(config, model, log_dir=out_dir)

    markdown = asyncio.run(evaluate(
        benchmarks, out_dir, start_session, policy_name=config.policy.name_or_path, judge_settings=judge,
        concurrency=concurrency,
    ))
    print(markdown.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
