"""How long a one-query request waits while a request at the service's limits is being served.

The big request is 256 queries of 2,048 characters at top-k 100 (the default ServerConfig limits); the small one is
sent once the big one's queries are all queued. Prints both latencies and the number of encoder forwards. Runs the
service of this checkout in-process on 127.0.0.1 over a small synthetic world (built once under --cache-dir).

    python -m bench.retrieval_fairness [--cache-dir DIR] [--cpu-threads 1] [--max-batch-chars 16384]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import tempfile
import time
from pathlib import Path

import httpx

from qa.world import generate_world
from retrieval_service.app import BackgroundServer, create_app
from retrieval_service.cli import index_main
from retrieval_service.config import EncoderConfig, RetrievalConfig, ServerConfig


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus series over its labels."""
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M))


def build(root: Path) -> Path:
    """A 500-passage world and its index under root, built once."""
    if not (root / "index" / "meta.json").exists():
        generate_world(root, seed=0, num_passages=500, num_dev=10)
        argv = ["--corpus", str(root / "corpus.jsonl"), "--out", str(root / "index"), "--shard-size", "200"]
        assert index_main([*argv, "--no-progress"]) == 0
    return root / "index"


async def measure(url: str, big: list[str]) -> str:
    """Send the big request, then the small one once the big one is queued; a line of figures."""
    async with httpx.AsyncClient(timeout=600) as http:
        await http.post(url + "/retrieve", json={"queries": ["warm up"], "topk": 5})
        queued = metric((await http.get(url + "/metrics")).text, "retrieval_queries_total") + len(big)
        start = time.perf_counter()
        big_task = asyncio.create_task(http.post(url + "/retrieve", json={"queries": big, "topk": 100}))
        while metric((await http.get(url + "/metrics")).text, "retrieval_queries_total") < queued:
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        small = await http.post(url + "/retrieve", json={"queries": ["Where does Sirzedane lie?"], "topk": 5})
        small_done = time.perf_counter()
        big_response = await big_task
        big_done = time.perf_counter()
        assert small.status_code == big_response.status_code == 200
        forwards = metric((await http.get(url + "/metrics")).text, "retrieval_batch_size_count")
    return (
        f"big request {big_done - start:.2f} s ({len(big_response.content) / 1e6:.1f} MB out); small request sent "
        f"{sent - start:.2f} s in, answered in {small_done - sent:.3f} s; {forwards:.0f} forwards in all"
    )


def main() -> None:
    """Parse arguments, run the measurement, print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "research-fairness"))
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--max-batch-chars", type=int, default=ServerConfig().micro_batch_max_chars)
    args = parser.parse_args()
    index = build(Path(args.cache_dir))
    config = RetrievalConfig(
        index_dir=str(index),
        encoder=EncoderConfig(cpu_threads=args.cpu_threads),
        server=ServerConfig(micro_batch_max_chars=args.max_batch_chars),
    )
    limits = config.server
    rng = random.Random(0)
    words = (index.parent / "corpus.jsonl").read_text().split()
    big = [
        " ".join(rng.choice(words) for _ in range(limits.max_query_chars // 4))[: limits.max_query_chars]
        for _ in range(limits.max_queries_per_request)
    ]
    server = BackgroundServer(create_app(config)).start()
    try:
        server.wait_ready()
        print(asyncio.run(measure(server.url, big)))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
