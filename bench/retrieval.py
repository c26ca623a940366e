"""Retrieval service benchmark: QPS and latency of single-query requests at concurrency 1, 8 and 32.

Judged by two ratios at concurrency 32:
  * micro-batching on vs off (goal >= 3x): coalescing concurrent queries into one forward is the point of the server;
  * service vs the in-process floor (goal >= 0.6): the same queries encoded and searched in batches of
    `micro_batch_max_size` in one process, with no HTTP in between.
The world (>= 50k passages) and its index are built once under --cache-dir and reused (the build resumes if it was
interrupted). The servers run as `research serve` child processes on 127.0.0.1 with the cache off, so every request
is a real search.

    python -m bench.retrieval [--passages 50000] [--cache-dir DIR] [--build-only] [--cpu-threads 1] [--batch-workers N]

The batching server runs one worker per core, each with one torch thread; the unbatched server runs each request on
its own thread with one torch thread (with more, 32 requests oversubscribe OpenMP and it gets slower, not faster).
The floor runs the same workers in one process. The run also measures the ceiling of the on/off ratio on this
hardware: in-process QPS in batches of 64 over QPS one query per call. Figures go to stdout and a plot (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import numpy as np

from qa.world import generate_world
from retrieval_service.build import build_index
from retrieval_service.config import EncoderConfig
from retrieval_service.process import ServiceProcess
from retrieval_service.retriever import Retriever

CONCURRENCY = (1, 8, 32)
MAX_BATCH = 64


def prepare(cache_dir: Path, passages: int) -> tuple[Path, list[str]]:
    """The world and its index under cache_dir (built on first use), and the questions to send."""
    world = cache_dir / f"world_{passages}"
    if not (world / "dev.jsonl").is_file():
        generate_world(world, seed=0, num_passages=passages)
    index_dir = cache_dir / f"index_{passages}"
    started = time.perf_counter()
    meta = build_index(world / "corpus.jsonl", index_dir, EncoderConfig(), shard_size=2000)
    print(f"index: {meta.count} passages ready in {time.perf_counter() - started:.0f} s ({index_dir})")
    questions = []
    for name in ("dev.jsonl", "train.jsonl"):
        with (world / name).open() as handle:
            questions += [json.loads(line)["question"] for line in handle]
    return index_dir, list(dict.fromkeys(questions))


async def load(url: str, questions: list[str], concurrency: int, requests: int) -> dict[str, float]:
    """Send `requests` single-query requests from `concurrency` workers; QPS and latency percentiles.

    aiohttp rather than httpx: the load generator shares the machine's cores with the server, and aiohttp spends
    several times less CPU per request, so more of the machine measures the server.
    """
    latencies: list[float] = []
    todo = iter(questions[:requests])
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def worker() -> None:
            for question in todo:
                started = time.perf_counter()
                payload = {"queries": [question], "topk": 5, "return_scores": True}
                async with http.post(url, json=payload) as response:
                    response.raise_for_status()
                    await response.read()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"qps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def measure_service(
    index_dir: Path, questions: list[str], micro_batching: bool, requests: dict[int, int], cpu_threads: int, workers: int
) -> dict:
    """Figures of one server configuration at each concurrency level."""
    args = ["--cache-size", "0", "--max-batch", str(MAX_BATCH), "--cpu-threads", str(cpu_threads)]
    args += ["--batch-workers", str(workers)]
    args += [] if micro_batching else ["--no-micro-batching"]
    server = ServiceProcess(index_dir, extra_args=args).start()
    url = f"{server.url}/retrieve"
    figures = {}
    try:
        offset = 0
        asyncio.run(load(url, questions[-16:], 4, 16))  # warm-up, queries not reused below
        for concurrency in CONCURRENCY:
            batch = questions[offset : offset + requests[concurrency]]
            offset += requests[concurrency]
            figures[concurrency] = asyncio.run(load(url, batch, concurrency, len(batch)))
    finally:
        server.stop()
    return figures


def measure_floor(index_dir: Path, questions: list[str], cpu_threads: int, workers: int) -> tuple[float, float]:
    """In-process QPS (no HTTP, no queueing) of the same queries on `workers` threads, as the batching server runs
    them: batched by MAX_BATCH (the floor), and one query per call.

    Their quotient is what batching alone can buy on this hardware: the ceiling of the on/off ratio.
    """
    retriever = Retriever(index_dir, EncoderConfig(cpu_threads=cpu_threads))
    retriever.search(questions[:8], 5)

    def qps(chunks: list[list[str]]) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda chunk: retriever.search(chunk, 5), chunks))
        return sum(map(len, chunks)) / (time.perf_counter() - started)

    batched = qps([questions[start : start + MAX_BATCH] for start in range(0, len(questions), MAX_BATCH)])
    single = qps([[question] for question in questions[: max(len(questions) // 4, workers)]])
    retriever.close()
    return batched, single


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the bench index, measure both server configurations and the floor, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=50_000)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "research-bench-retrieval"))
    parser.add_argument("--requests", type=int, default=320, help="requests at concurrency 32 (fewer below)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument(
        "--batch-workers", type=int, default=os.cpu_count() or 1,
        help="micro-batch workers of the batching server (default: one per core, each with --cpu-threads threads)",
    )
    parser.add_argument("--plot", default="bench/retrieval.png", help="where the QPS/latency plot goes ('' = none)")
    parser.add_argument(
        "--cpu-threads", type=int, default=1,
        help="torch threads of servers and floor alike (0 = all cores; on a shared machine 1 avoids OpenMP stalls)",
    )
    args = parser.parse_args(argv)

    index_dir, questions = prepare(Path(args.cache_dir), args.passages)
    if args.build_only:
        return 0
    requests = {1: max(40, args.requests // 8), 8: max(80, args.requests // 2), 32: args.requests}
    if len(questions) < sum(requests.values()) + 16:
        raise SystemExit(f"the world has {len(questions)} questions; lower --requests")
    on = measure_service(index_dir, questions, True, requests, args.cpu_threads, args.batch_workers)
    off = measure_service(index_dir, questions, False, requests, args.cpu_threads, 1)
    floor, single = measure_floor(index_dir, questions[: requests[32]], args.cpu_threads, args.batch_workers)

    threads = args.cpu_threads or "all"
    print(f"\nretrieval service, {args.passages} passages, MiniLM-L6 384-d, faiss Flat, single-query requests, "
          f"torch threads {threads}, batch workers {args.batch_workers}")
    print(f"{'micro-batching':<15}{'concurrency':>12}{'QPS':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for label, figures in (("on", on), ("off", off)):
        for concurrency in CONCURRENCY:
            f = figures[concurrency]
            print(f"{label:<15}{concurrency:>12}{f['qps']:>9.1f}{f['p50']:>9.1f}{f['p99']:>9.1f}")
    print(f"{f'in-process floor ({args.batch_workers} x batches of {MAX_BATCH})':<36}{floor:>9.1f}")
    print(f"{f'in-process ({args.batch_workers} x one query per call)':<36}{single:>9.1f}")
    print(f"batching ceiling (floor / one by one): {floor / single:.2f}x")
    print(f"ratio micro-batching on/off at 32: {on[32]['qps'] / off[32]['qps']:.2f}x (goal >= 3)")
    print(f"ratio service/floor at 32:         {on[32]['qps'] / floor:.2f} (goal >= 0.6)")
    if args.plot:
        print(f"plot: {plot(Path(args.plot), on, off, floor, f'{args.passages} passages, {args.batch_workers} workers')}")
    return 0


def plot(out: Path, on: dict, off: dict, floor: float, title: str) -> Path:
    """QPS and p50/p99 latency against concurrency, batching on and off, with the in-process floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, figures, color in (("micro-batching on", on, "tab:blue"), ("off", off, "tab:orange")):
        left.plot(CONCURRENCY, [figures[c]["qps"] for c in CONCURRENCY], "-o", color=color, label=label)
        right.plot(CONCURRENCY, [figures[c]["p50"] for c in CONCURRENCY], "-o", color=color, label=f"{label} p50")
        right.plot(CONCURRENCY, [figures[c]["p99"] for c in CONCURRENCY], "--", color=color, label=f"{label} p99")
    left.axhline(floor, color="gray", linestyle=":", label="in-process floor")
    left.set(xscale="log", xticks=CONCURRENCY, xticklabels=CONCURRENCY, xlabel="concurrent clients", ylabel="QPS")
    right.set(xscale="log", xticks=CONCURRENCY, xticklabels=CONCURRENCY, xlabel="concurrent clients", ylabel="ms")
    left.set_title(f"retrieval QPS ({title})")
    right.set_title("latency")
    left.legend()
    right.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
