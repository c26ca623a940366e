"""The query encoder at one client: latency of one-query forwards on this CPU for each way of running it, and top-1
agreement of the retrieval it gives with the fp32 encoder (all cores) over a real index.

    python -m bench.query_encoder [--index DIR] [--queries 300] [--variants fp32 bf16 ...]

Each variant is the service's own Encoder under an EncoderConfig (cpu_runtime, cpu_threads, cpu_query_dtype,
cpu_compile), so what is measured is what `research serve` runs; the `onnx` variants (encoder.cpu_runtime
onnxruntime, the default where it is installed) are skipped with a line saying so without ONNX Runtime. Agreement:
the share of queries whose top-1 passage (faiss Flat over the index's fp32 passage vectors) is the same as with the fp32 encoder; also the lowest cosine between the two
query vectors. The index defaults to a 2,000-passage synthetic world built once under --cache-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from qa.world import generate_world
from retrieval_service.build import build_index
from retrieval_service.config import EncoderConfig
from retrieval_service.encoder import Encoder
from retrieval_service.index import INDEX_FILE
from retrieval_service.onnx_forward import onnxruntime_available

CORES = os.cpu_count() or 1
TORCH = {"cpu_runtime": "torch"}
VARIANTS: dict[str, dict[str, object]] = {
    "fp32": {**TORCH, "cpu_threads": CORES, "cpu_query_dtype": "float32"},
    "fp32-1thread": {**TORCH, "cpu_threads": 1, "cpu_query_dtype": "float32"},
    "bf16": {**TORCH, "cpu_threads": CORES, "cpu_query_dtype": "bfloat16"},
    "bf16-1thread": {**TORCH, "cpu_threads": 1, "cpu_query_dtype": "bfloat16"},
    "fp32-compile": {**TORCH, "cpu_threads": CORES, "cpu_query_dtype": "float32", "cpu_compile": True},
    "bf16-compile": {**TORCH, "cpu_threads": CORES, "cpu_query_dtype": "bfloat16", "cpu_compile": True},
    "onnx": {"cpu_runtime": "onnxruntime", "cpu_threads": CORES},
    "onnx-1thread": {"cpu_runtime": "onnxruntime", "cpu_threads": 1},
}


def prepare(cache: Path, passages: int) -> Path:
    """A synthetic world and its fp32 Flat index under cache, built once."""
    world = cache / f"world_{passages}"
    if not (world / "dev.jsonl").is_file():
        generate_world(world, seed=0, num_passages=passages)
    build_index(world / "corpus.jsonl", cache / f"index_{passages}", EncoderConfig(), shard_size=2000)
    return cache / f"index_{passages}"


def questions_of(index_dir: Path, limit: int) -> list[str]:
    """The questions of the world the index was built from (dev first)."""
    world = Path(json.loads((index_dir / "meta.json").read_text())["corpus_path"]).parent
    found = [json.loads(line)["question"] for name in ("dev.jsonl", "train.jsonl")
             for line in (world / name).read_text().splitlines()]
    return list(dict.fromkeys(found))[:limit]


def one_query_ms(encoder: Encoder, questions: list[str]) -> float:
    """Median milliseconds of a one-query encode, after a warm-up of 20."""
    for q in questions[:20]:
        encoder.encode_queries([q])
    times = []
    for q in questions:
        started = time.perf_counter()
        encoder.encode_queries([q])
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def agreement(index: faiss.Index, reference: np.ndarray, vectors: np.ndarray) -> tuple[float, float]:
    """(share of queries with the same top-1 passage, lowest cosine between the two query vectors)."""
    same = index.search(reference, 1)[1][:, 0] == index.search(vectors, 1)[1][:, 0]
    return float(same.mean()), float(np.min(np.sum(reference * vectors, axis=1)))


def main(argv: list[str] | None = None) -> int:
    """Measure every variant, print a table and the fastest variant that keeps >= 99 % top-1 agreement."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="", help="index directory (default: a 2,000-passage world's)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "research-bench-encoder"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    index_dir = Path(args.index) if args.index else prepare(Path(args.cache_dir), 2000)
    questions = questions_of(index_dir, args.queries)
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    reference = Encoder(EncoderConfig(**VARIANTS["fp32"])).encode_queries(questions)  # type: ignore[arg-type]
    rows = []
    for name in args.variants:
        started = time.perf_counter()
        if VARIANTS[name].get("cpu_runtime") == "onnxruntime" and not onnxruntime_available():
            print(f"{name:<14} skipped: onnxruntime is not installed (pip install onnxruntime onnx)", flush=True)
            continue
        encoder = Encoder(EncoderConfig(**VARIANTS[name]))  # type: ignore[arg-type]
        vectors = encoder.encode_queries(questions)
        setup_s = time.perf_counter() - started
        same, cosine = agreement(index, reference, vectors)
        ms = one_query_ms(encoder, questions)
        rows.append((name, ms, same, cosine, setup_s))
        print(f"{name:<14} one query {ms:6.2f} ms  top-1 agreement {same * 100:6.2f} %  min cosine {cosine:.5f}  "
              f"(setup + first pass {setup_s:.0f} s, torch threads {torch.get_num_threads()})", flush=True)
    baseline = next((r for r in rows if r[0] == "fp32"), rows[0])
    faithful = [r for r in rows if r[2] >= 0.99]
    best = min(faithful, key=lambda r: r[1])
    print(f"queries={len(questions)} passages={index.ntotal} best={best[0]} one_query_ms={best[1]:.2f} "
          f"speedup_vs_fp32={baseline[1] / best[1]:.2f} top1_agreement={best[2]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
