"""Retrieval at a million passages: Flat vs IVF (Flat and PQ) vs HNSW, recall@5 against Flat, latency, QPS at 32
clients through the real service, build time and memory; then the model of bench/scale_model.py carried to wiki-18.

    python -m bench.retrieval_scale [--passages 1000000] [--real 10000] [--cache-dir DIR] [--skip hnsw]

What is real and what is synthetic. Encoding a million passages with the real encoder takes ~9 h on 2 cores, so:
  * `--real` passages of the synthetic world are encoded with the real encoder (all-MiniLM-L6-v2, 384-d, fp32,
    through `research index`), and its questions are encoded as the queries (real queries, real encoder);
  * the 384-d vectors are carried to 768-d (wiki-18's E5 dimension, so memory and scan cost are those of the
    presets) by a fixed random map with orthonormal columns, which keeps every inner product;
  * the other passages are synthetic: row i > --real is parent p = i mod --real moved towards one of p's 10 real
    nearest neighbours by a uniform fraction (points along the real data's own neighbourhoods, as SMOTE does), plus
    isotropic noise of norm --noise in all 768 dimensions (so the set is full-rank), re-normalised.
What transfers: cost per query (scan bytes, BLAS FLOPs, graph hops, list sizes) depends on N, d and the index
parameters, not on where the vectors came from, so latency, QPS, build time and memory are those of a real 1M x 768
index. Recall of the approximate indexes depends on the data's neighbourhood structure, which here is the real
encoder's locally, densified 100-fold; the noise level is the one hand-set property (more noise = more isotropic =
harder for IVF/PQ). Real E5 vectors of wiki-18 will give somewhat different recall; treat it as indicative.
The service's passage texts are the real passages' texts repeated (row i shows parent p's text).
Everything is cached under --cache-dir: a rerun reuses the encoded sample, the vectors and every built index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from bench.scale_model import (
    ENCODER_FLOP_RATIO,
    IndexFigures,
    ivf_nlist,
    last_line,
    project,
    recall_at_k,
    searches_per_step,
    step_retrieval_s,
)
from qa.world import generate_world
from retrieval_service.build import build_index
from retrieval_service.config import EncoderConfig, RetrievalConfig, ServerConfig
from retrieval_service.encoder import Encoder
from retrieval_service.index import (
    DOCS_FILE,
    INDEX_FILE,
    META_FILE,
    OFFSETS_FILE,
    IndexMeta,
    PassageIndex,
    blas_threshold,
)
from retrieval_service.retriever import Retriever

DIM = 768
NPROBE = 64
EF_SEARCH = 128
"""The service's search parameters (PassageIndex's defaults); the in-process sweep also tries others."""


def index_specs(passages: int) -> dict[str, str]:
    """Name -> faiss factory of the indexes compared, at the parameters a user would pick for `passages`."""
    nlist = ivf_nlist(passages)
    return {"Flat": "Flat", "IVF-Flat": f"IVF{nlist},Flat", "IVF-PQ": f"IVF{nlist},PQ64", "HNSW": "HNSW32"}


def real_sample(cache: Path, real: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The encoded real passages (n, 384), their texts, and the encoded questions (q, 384); built once."""
    world, index_dir = cache / f"world_{real}", cache / f"real_index_{real}"
    if not (world / "dev.jsonl").is_file():
        generate_world(world, seed=0, num_passages=real)
    build_index(world / "corpus.jsonl", index_dir, EncoderConfig(), shard_size=2000)
    flat = faiss.read_index(str(index_dir / INDEX_FILE))
    vectors = flat.reconstruct_n(0, flat.ntotal)
    with (index_dir / DOCS_FILE).open() as handle:
        texts = [json.loads(line)["contents"] for line in handle]
    queries_file = cache / f"queries_{real}.npy"
    if not queries_file.is_file():
        questions = []
        for name in ("dev.jsonl", "train.jsonl"):
            with (world / name).open() as handle:
                questions += [json.loads(line)["question"] for line in handle]
        questions = list(dict.fromkeys(questions))[:2000]
        np.save(queries_file, Encoder(EncoderConfig()).encode_queries(questions))
    return vectors, texts, np.load(queries_file)


def orthonormal_map(source_dim: int, dim: int, seed: int = 0) -> np.ndarray:
    """A fixed (dim, source_dim) matrix with orthonormal columns: x -> map @ x keeps every inner product."""
    gaussian = np.random.default_rng(seed).standard_normal((dim, source_dim))
    q, _ = np.linalg.qr(gaussian)
    return np.ascontiguousarray(q[:, :source_dim], dtype=np.float32)


def synthesize(real: np.ndarray, n: int, mapping: np.ndarray, noise: float, seed: int = 0,
               chunk: int = 50_000) -> np.ndarray:
    """n unit vectors at mapping's dimension: the real ones first (mapped exactly), then SMOTE-style synthetic ones."""
    dim = mapping.shape[0]
    out = np.empty((n, dim), dtype=np.float32)
    head = min(n, len(real))
    out[:head] = real[:head] @ mapping.T
    if n <= len(real):
        return out
    knn = faiss.IndexFlatIP(real.shape[1])
    knn.add(real)
    neighbours = knn.search(real, min(11, len(real)))[1][:, 1:]  # column 0 is the passage itself
    rng = np.random.default_rng(seed)
    for start in range(head, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        parents = rows % len(real)
        partner = neighbours[parents, rng.integers(0, neighbours.shape[1], len(rows))]
        alpha = rng.random((len(rows), 1), dtype=np.float32)
        mixed = (1 - alpha) * real[parents] + alpha * real[partner]
        block = mixed @ mapping.T + noise / np.sqrt(dim) * rng.standard_normal((len(rows), dim), dtype=np.float32)
        out[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def write_docs(out_dir: Path, texts: list[str], n: int) -> None:
    """docs.jsonl + offsets for n rows, row i showing texts[i mod len(texts)] (the service needs a passage per row)."""
    if (out_dir / OFFSETS_FILE).is_file():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    lines = [json.dumps({"id": "", "contents": t}, ensure_ascii=False) for t in texts]
    with (out_dir / DOCS_FILE).open("wb") as handle:
        for i in range(n):
            line = (lines[i % len(texts)].replace('"id": ""', f'"id": "{i}"', 1) + "\n").encode()
            handle.write(line)
            offsets[i + 1] = offsets[i] + len(line)
    np.save(out_dir / OFFSETS_FILE, offsets)


def build(factory: str, vectors: np.ndarray, centroids: np.ndarray | None = None) -> tuple[faiss.Index, float, float]:
    """Train (on up to 32 x nlist vectors) and fill one index; (index, train seconds, add seconds). An IVF index may
    start from trained coarse centroids (as a user building two IVF indexes would), then only its codes are trained."""
    started = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        ivf = faiss.extract_index_ivf(index)
        if centroids is not None:
            ivf.quantizer.add(centroids)
        step = max(1, len(vectors) // (32 * ivf.nlist))
        index.train(np.ascontiguousarray(vectors[::step][: 32 * ivf.nlist]))
    trained = time.perf_counter()
    for start in range(0, len(vectors), 100_000):
        index.add(np.ascontiguousarray(vectors[start : start + 100_000]))
    return index, trained - started, time.perf_counter() - trained


def set_search_parameters(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """nprobe on IVF indexes, efSearch on HNSW ones (the other is ignored)."""
    if hasattr(faiss, "extract_index_ivf") and "IVF" in type(index).__name__:
        faiss.extract_index_ivf(index).nprobe = nprobe
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search


def measure_search(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """recall@5 against Flat, one-query latency (median of 50) and batched QPS (batches of 64), search only."""
    found = index.search(queries, 5)[1]
    latencies = []
    for q in queries[:50]:
        started = time.perf_counter()
        index.search(q[None, :], 5)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    for start in range(0, len(queries), 64):
        index.search(queries[start : start + 64], 5)
    qps = len(queries) / (time.perf_counter() - started)
    return {"recall5": recall_at_k(found, truth, 5), "latency_ms": float(np.median(latencies)) * 1e3, "qps": qps}


class ProjectedEncoder:
    """The real query encoder followed by the bench's fixed 384 -> 768 map, so the service searches 768-d vectors."""

    def __init__(self, mapping: np.ndarray) -> None:
        self.inner = Encoder(EncoderConfig())
        self.mapping = mapping
        self.dim = mapping.shape[0]

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """Real encoder vectors, carried to 768-d."""
        return self.inner.encode_queries(queries) @ self.mapping.T


class ProjectedRetriever(Retriever):
    """A Retriever over a bench index: its encoder is ProjectedEncoder (the index records a 768-d MiniLM)."""

    def __init__(self, index_dir: Path, mapping: np.ndarray) -> None:
        self.index = PassageIndex(index_dir, nprobe=NPROBE, ef_search=EF_SEARCH)
        self.encoder = ProjectedEncoder(mapping)  # type: ignore[assignment]


def serve(index_dir: str, mapping_file: str, port: int) -> None:
    """Child process: the real service app over a bench index, on 127.0.0.1:port, until terminated."""
    import uvicorn

    from retrieval_service.app import create_app, uvicorn_config

    retriever = ProjectedRetriever(Path(index_dir), np.load(mapping_file))
    config = RetrievalConfig(index_dir=index_dir, server=ServerConfig(cache_size=0, port=port))
    uvicorn.Server(uvicorn_config(create_app(config, retriever), "127.0.0.1", port)).run()


def measure_service(index_dir: Path, mapping_file: Path, questions: list[str]) -> dict[str, float]:
    """QPS at 32 concurrent one-query clients and median latency at one, through the real service in a child."""
    from bench.retrieval import load
    from retrieval_service.process import free_port, wait_healthy

    port = free_port()
    child = multiprocessing.get_context("spawn").Process(target=serve, args=(str(index_dir), str(mapping_file), port))
    child.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 600, alive=child.is_alive)
        asyncio.run(load(url + "/retrieve", questions[-16:], 4, 16))
        one = asyncio.run(load(url + "/retrieve", questions[:30], 1, 30))
        many = asyncio.run(load(url + "/retrieve", questions[30:350], 32, 320))
    finally:
        child.terminate()
        child.join(30)
    return {"qps32": many["qps"], "p50_ms1": one["p50"]}


def write_index_dir(out: Path, index: faiss.Index, factory: str, docs_dir: Path) -> None:
    """An index directory the service loads: index.faiss, meta.json, docs linked from docs_dir."""
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / INDEX_FILE))
    for name in (DOCS_FILE, OFFSETS_FILE):
        if not (out / name).exists():
            (out / name).symlink_to(docs_dir / name)
    meta = IndexMeta(encoder="bench-projected-minilm", pooling="mean", e5_prefixes=False, dim=index.d,
                     factory=factory, corpus_path="bench", corpus_fingerprint="bench", count=index.ntotal)
    (out / META_FILE).write_text(meta.model_dump_json(indent=1))


def main(argv: list[str] | None = None) -> int:
    """Prepare vectors, build and measure every index, print the table, the wiki-18 model and the closing line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--real", type=int, default=10_000, help="passages encoded with the real encoder")
    parser.add_argument("--queries", type=int, default=1000, help="real queries for recall and search timing")
    parser.add_argument("--noise", type=float, default=0.1, help="norm of the isotropic noise of synthetic rows")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "research-bench-scale"))
    parser.add_argument("--skip", nargs="*", default=[], help="index names to leave out (Flat is always measured)")
    parser.add_argument("--no-service", action="store_true", help="search-only figures (service QPS = batched QPS)")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument("--prepare-only", action="store_true", help="stop once the vectors and passages are cached")
    parser.add_argument("--from-json", default="", help="print the model and closing line of a saved --json run")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = [IndexFigures(**f) for f in json.loads(Path(args.from_json).read_text())["figures"]]
        world = Path(args.cache_dir) / f"world_{args.real}"
        report(saved, [json.loads(line)["question"] for line in (world / "dev.jsonl").read_text().splitlines()])
        return 0
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    real, texts, real_queries = real_sample(cache, min(args.real, args.passages))
    mapping_file = cache / "map_384_768.npy"
    if not mapping_file.is_file():
        np.save(mapping_file, orthonormal_map(real.shape[1], DIM))
    mapping = np.load(mapping_file)
    vectors_file = cache / f"vectors_{args.passages}_{len(real)}_{args.noise}.npy"
    if not vectors_file.is_file():
        np.save(vectors_file, synthesize(real, args.passages, mapping, args.noise))
    vectors = np.load(vectors_file, mmap_mode="r")
    queries = np.ascontiguousarray(real_queries[: args.queries] @ mapping.T, dtype=np.float32)
    docs_dir = cache / f"docs_{args.passages}_{len(real)}"
    write_docs(docs_dir, texts, args.passages)
    world = cache / f"world_{len(real)}"
    questions = [json.loads(line)["question"] for name in ("dev.jsonl", "train.jsonl")
                 for line in (world / name).read_text().splitlines()]
    questions = list(dict.fromkeys(questions))
    print(f"vectors ready: {args.passages} x {DIM} ({len(real)} real) in {time.perf_counter() - started:.0f} s")
    if args.prepare_only:
        return 0

    faiss.cvar.distance_compute_blas_threshold = blas_threshold(DIM)
    figures: list[IndexFigures] = []
    truth = None
    centroids, quantizer_s = None, 0.0
    for name, factory in index_specs(args.passages).items():
        if name in args.skip and name != "Flat":
            continue
        out = cache / f"index_{args.passages}_{len(real)}_{args.noise}_{factory.replace(',', '_')}"
        build_file = out / "build.json"
        if build_file.is_file():
            index, times = faiss.read_index(str(out / INDEX_FILE)), json.loads(build_file.read_text())
        else:
            reuse = centroids if name == "IVF-PQ" else None
            index, train_s, add_s = build(factory, vectors, reuse)
            # IVF-PQ reuses IVF-Flat's coarse centroids: their training is charged to both.
            times = {"train_s": train_s, "add_s": add_s, "shared_quantizer_s": quantizer_s if reuse is not None else 0}
            write_index_dir(out, index, factory, docs_dir)
            build_file.write_text(json.dumps(times))
        build_s = times["train_s"] + times["add_s"] + times["shared_quantizer_s"]
        if name == "IVF-Flat":
            ivf = faiss.extract_index_ivf(index)
            centroids, quantizer_s = ivf.quantizer.reconstruct_n(0, ivf.nlist), times["train_s"]
        set_search_parameters(index, NPROBE, EF_SEARCH)
        if truth is None:
            truth = index.search(queries, 5)[1]
        search = measure_search(index, queries, truth)
        sweep = []
        for value in (16, 64, 256) if "IVF" in factory or "HNSW" in factory else ():
            set_search_parameters(index, value, value)
            s = measure_search(index, queries[:300], truth[:300])
            sweep.append(f"{'nprobe' if 'IVF' in factory else 'efSearch'} {value}: recall@5 {s['recall5']:.3f}, "
                         f"{s['qps']:.0f} QPS")
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
        del index  # the service child loads its own copy
        service = ({"qps32": search["qps"], "p50_ms1": search["latency_ms"]} if args.no_service
                   else measure_service(out, mapping_file, questions))
        figures.append(IndexFigures(
            name=name, factory=factory, passages=args.passages, dim=DIM, recall5=search["recall5"],
            latency_ms=search["latency_ms"], batch_qps=search["qps"], service_qps32=service["qps32"],
            service_p50_ms1=service["p50_ms1"], build_s=build_s, index_bytes=(out / INDEX_FILE).stat().st_size,
            nlist=nlist, nprobe=NPROBE if nlist else 0,
        ))
        f = figures[-1]
        print(f"{name:<9} {factory:<16} recall@5 {f.recall5:.3f}  1-query {f.latency_ms:7.2f} ms  batched "
              f"{f.batch_qps:8.0f} QPS  service@32 {f.service_qps32:6.1f} QPS  service@1 p50 {f.service_p50_ms1:6.1f}"
              f" ms  build {f.build_s:6.0f} s  {f.index_bytes / 1e9:.2f} GB", flush=True)
        if sweep:
            print("          " + "; ".join(sweep), flush=True)
        if args.json:  # after every index, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps({"figures": [asdict(f) for f in figures]}, indent=1))

    print(f"whole run {time.perf_counter() - started:.0f} s")
    report(figures, questions)
    return 0


def report(figures: list[IndexFigures], questions: list[str]) -> None:
    """The wiki-18 model of these figures, then the closing line."""
    cores = os.cpu_count() or 1
    encoder_core_s = measure_encoder_core_s(questions[:256], cores) * ENCODER_FLOP_RATIO
    print(f"\nwiki-18 model (21M x 768, E5-base on CPU: {encoder_core_s * 1e3:.1f} core-ms per query, {cores} cores "
          "measured here):")
    print(model_table(figures, cores, encoder_core_s))
    print(last_line(figures))


def measure_encoder_core_s(questions: list[str], cores: int) -> float:
    """Core-seconds per query of the real MiniLM encoder, batched by 64 as the service's batcher does under load."""
    encoder = Encoder(EncoderConfig())
    encoder.encode_queries(questions[:16])
    started = time.perf_counter()
    for start in range(0, len(questions), 64):
        encoder.encode_queries(questions[start : start + 64])
    return (time.perf_counter() - started) * cores / len(questions)


PRESET_STEPS = {"qwen2.5-7b-instruct / 7b-base / 32b-instruct": (256, 5)}
"""prompts x group size of one step of the GPU presets (all three use 256 x 5)."""


def model_table(figures: list[IndexFigures], cores_here: int, encoder_core_s: float, group_cores: int = 32) -> str:
    """Markdown rows: each index type at wiki-18 on the presets' retrieval group, with a step's searches beside it."""
    rows = ["| index | memory GB | search core-ms/query | group QPS (32 vCPU) | step retrieval s at 2 / 4 searches "
            "per trajectory |", "|---|---|---|---|---|"]
    (prompts, group), = PRESET_STEPS.values()
    for f in figures:
        p = project(f, cores_here, encoder_core_s, group_cores)
        low, high = (step_retrieval_s(searches_per_step(prompts, group, s), p.qps) for s in (2, 4))
        rows.append(f"| {f.factory} -> wiki-18 | {p.memory_gb:.1f} | {p.search_ms_per_query:.1f} | {p.qps:.0f} | "
                    f"{low:.0f} / {high:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
