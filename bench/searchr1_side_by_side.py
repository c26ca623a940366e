"""Our retrieval service side by side with Search-R1's (search_r1/search/retrieval_server.py), same index, same
encoder, same machine: QPS of single-query /retrieve requests at 1 and 32 concurrent clients.

    python -m bench.searchr1_side_by_side --server /path/to/Search-R1/search_r1/search/retrieval_server.py

Their file is run as it is, from a temporary directory outside this repository (we ship none of it), with four
stand-ins for what it assumes and this machine lacks: `Module.cuda()`, `Tensor.cuda()` and `torch.cuda.empty_cache()`
become no-ops (no GPU here), and `Module.half()` keeps fp32 (their fp16 is a GPU setting; CPU fp16 would only slow
them down). Both serve the same faiss Flat index and docs.jsonl (our index directory; their corpus loader reads it
as it reads wiki-18.jsonl) with all-MiniLM-L6-v2, mean pooling, 256 query tokens, top-5; our query cache is off.
Their server binds port 8000 (hard-coded), so that port must be free.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.query_encoder import prepare, questions_of
from bench.retrieval import load
from retrieval_service.encoder import resolve_encoder_path
from retrieval_service.index import DOCS_FILE, INDEX_FILE
from retrieval_service.process import ServiceProcess, free_port

SHIM = """
import runpy, sys, torch
torch.nn.Module.cuda = lambda self, *args, **kwargs: self
torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.cuda.empty_cache = lambda: None
torch.nn.Module.half = lambda self: self
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
THEIR_PORT = 8000


def start_theirs(server: Path, index_dir: Path, workdir: Path, threads: int = 0) -> subprocess.Popen[bytes]:
    """Their server file under the CPU stand-ins, on 0.0.0.0:8000 (their hard-coded address); `threads` > 0 sets
    OMP_NUM_THREADS, which torch reads at start (their file has no thread setting of its own)."""
    if free_port(preferred=THEIR_PORT) != THEIR_PORT:
        raise SystemExit(f"port {THEIR_PORT} is taken; Search-R1's server cannot choose another")
    argv = [str(server), "--index_path", str(index_dir / INDEX_FILE), "--corpus_path", str(index_dir / DOCS_FILE),
            "--topk", "5", "--retriever_name", "minilm",
            "--retriever_model", str(resolve_encoder_path("all-MiniLM-L6-v2"))]
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf-datasets"), "HF_HUB_OFFLINE": "1"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    log = (workdir / "searchr1.log").open("wb")
    return subprocess.Popen([sys.executable, "-c", SHIM, *argv], cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_answering(url: str, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll POST url/retrieve until it answers 200 (their server has no /health; without return_scores it fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if httpx.post(f"{url}/retrieve", json={"queries": ["warm up"], "topk": 5, "return_scores": True},
                          timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} did not answer (see searchr1.log in its work directory)")


def measure(url: str, questions: list[str], single: int, many: int) -> dict[int, dict[str, float]]:
    """QPS and latency at 1 and 32 clients, after a warm-up, on disjoint question slices."""
    asyncio.run(load(url, questions[-16:], 4, 16))
    return {1: asyncio.run(load(url, questions[:single], 1, single)),
            32: asyncio.run(load(url, questions[single : single + many], 32, many))}


def main(argv: list[str] | None = None) -> int:
    """Serve the same index with both servers in turn, load each, print the figures and the two ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="Search-R1's search_r1/search/retrieval_server.py")
    parser.add_argument("--index", default="", help="our index directory (default: the 2,000-passage world's)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "research-bench-encoder"))
    parser.add_argument("--single", type=int, default=100, help="requests at one client")
    parser.add_argument("--many", type=int, default=320, help="requests at 32 clients")
    parser.add_argument("--serve-args", default="", help="extra `research serve` flags for ours, one string")
    parser.add_argument("--their-threads", type=int, default=0,
                        help="OMP_NUM_THREADS for their server (0 = torch's default, all cores); the same as ours' "
                        "--cpu-threads for a like-for-like thread setting")
    args = parser.parse_args(argv)
    index_dir = Path(args.index) if args.index else prepare(Path(args.cache_dir), 2000)
    questions = questions_of(index_dir, 10_000)
    if len(questions) < args.single + args.many + 16:
        raise SystemExit(f"{len(questions)} questions; lower --single/--many")

    figures = {}
    with ServiceProcess(index_dir, extra_args=["--cache-size", "0", *shlex.split(args.serve_args)]) as ours:
        figures["ours"] = measure(f"{ours.url}/retrieve", questions, args.single, args.many)
    with tempfile.TemporaryDirectory(prefix="searchr1-") as workdir:
        theirs = start_theirs(Path(args.server).resolve(), index_dir, Path(workdir), args.their_threads)
        try:
            url = f"http://127.0.0.1:{THEIR_PORT}"
            wait_answering(url, 600, alive=lambda: theirs.poll() is None)
            figures["searchr1"] = measure(f"{url}/retrieve", questions, args.single, args.many)
        finally:
            theirs.terminate()
            theirs.wait(30)
    for name, by_clients in figures.items():
        for clients, f in by_clients.items():
            print(f"{name:<9} {clients:>2} clients  {f['qps']:7.1f} QPS  p50 {f['p50']:6.1f} ms  p99 {f['p99']:6.1f} ms")
    ratios = {c: figures["ours"][c]["qps"] / figures["searchr1"][c]["qps"] for c in (1, 32)}
    print(f"index={index_dir} ratio_1={ratios[1]:.2f} (goal >= 1.5) ratio_32={ratios[32]:.2f} (goal >= 5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
