"""The pure arithmetic of `bench.retrieval_scale`: recall, the choice of the best index, and the model that carries
figures measured at a million passages on this machine to wiki-18 (21M x 768) on a preset's retrieval group.

The model, per index type, in core-seconds per query (measured here x cores used here):
  * Flat: cost grows with passages x dims (one BLAS product over every vector);
  * IVF (nlist from `ivf_nlist`, the same rule at both sizes, nprobe fixed): cost grows with the vectors scanned,
    nprobe x N / nlist, plus the nlist centroids compared;
  * HNSW (efSearch fixed): cost grows with log N (graph depth), recall at fixed efSearch falls a little (not modelled);
  * the query encoder: cost grows with its FLOPs per token (E5-base is `encoder_flop_ratio` x MiniLM-L6).
Memory grows with passages at the bytes per passage measured. Cores are taken as additive (a batched BLAS scan and
independent HNSW searches scale near linearly; hyper-threads make 32 vCPUs worth less than 32 cores, so the 32-vCPU
figures are upper bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

WIKI18_PASSAGES = 21_015_324
WIKI18_DIM = 768


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k & true top-k| / k (ids; -1 = no result never matches)."""
    if len(found) != len(truth):
        raise ValueError(f"{len(found)} result rows for {len(truth)} ground-truth rows")
    hits = 0
    for row, true_row in zip(found[:, :k], truth[:, :k], strict=True):
        hits += len(set(int(i) for i in row if i >= 0) & set(int(i) for i in true_row))
    return hits / (k * len(truth))


def ivf_nlist(passages: int) -> int:
    """IVF lists a user would pick: the power of two nearest to 4 x sqrt(N) (faiss' guideline is 4-16 x sqrt(N))."""
    return 2 ** max(1, round(math.log2(4 * math.sqrt(max(passages, 1)))))


def bert_flops_per_token(layers: int, hidden: int, intermediate: int) -> float:
    """Matrix-product FLOPs per token of a BERT encoder (attention projections + MLP; embeddings are lookups)."""
    return 2.0 * layers * (4 * hidden * hidden + 2 * hidden * intermediate)


MINILM_FLOPS = bert_flops_per_token(6, 384, 1536)
E5_BASE_FLOPS = bert_flops_per_token(12, 768, 3072)
ENCODER_FLOP_RATIO = E5_BASE_FLOPS / MINILM_FLOPS
"""E5-base-v2 (12 x 768, the presets' encoder) over all-MiniLM-L6-v2 (6 x 384, measured here): 8.0."""


@dataclass(frozen=True)
class IndexFigures:
    """What the bench measured for one index at `passages` x `dim`."""

    name: str
    factory: str
    passages: int
    dim: int
    recall5: float
    latency_ms: float
    """One query, search only, median."""
    batch_qps: float
    """Search only, batches of 64 queries, all cores of this machine."""
    service_qps32: float
    """Through the real service, 32 concurrent one-query clients (encoder included)."""
    service_p50_ms1: float
    """Through the real service, one client, median latency."""
    build_s: float
    index_bytes: int
    nlist: int = 0
    nprobe: int = 0


def pick_best(figures: list[IndexFigures], min_recall: float = 0.95) -> IndexFigures:
    """The index with the highest service QPS at 32 clients among those with recall@5 >= min_recall (Flat is 1.0)."""
    good = [f for f in figures if f.recall5 >= min_recall]
    if not good:
        raise ValueError("no index reaches the recall floor; Flat is always 1.0, so Flat was not measured")
    return max(good, key=lambda f: f.service_qps32)


def last_line(figures: list[IndexFigures], min_recall: float = 0.95) -> str:
    """The bench's closing line: passages=<n> best=<index> recall5=<x> speedup_vs_flat=<y>."""
    best = pick_best(figures, min_recall)
    flat = next(f for f in figures if f.factory == "Flat")
    return (f"passages={best.passages} best={best.name} recall5={best.recall5:.3f} "
            f"speedup_vs_flat={best.service_qps32 / flat.service_qps32:.2f}")


def search_core_s(f: IndexFigures, cores_here: int, passages: int = WIKI18_PASSAGES, dim: int = WIKI18_DIM) -> float:
    """Core-seconds of search per query (batched) of the same index type at `passages` x `dim`."""
    here = cores_here / f.batch_qps
    if f.factory == "Flat":
        return here * (passages * dim) / (f.passages * f.dim)
    if f.factory.startswith("IVF"):
        nlist_target = ivf_nlist(passages)
        scanned_here = f.nprobe * f.passages / f.nlist + f.nlist
        scanned_target = f.nprobe * passages / nlist_target + nlist_target
        return here * scanned_target / scanned_here * dim / f.dim
    if f.factory.startswith("HNSW"):
        return here * math.log(passages) / math.log(f.passages) * dim / f.dim
    raise ValueError(f"no scaling rule for {f.factory}")


@dataclass(frozen=True)
class Projection:
    """One index type at wiki-18 scale on a retrieval group of `cores` CPUs."""

    name: str
    memory_gb: float
    search_ms_per_query: float
    """Core-milliseconds of search per query."""
    qps: float
    """Queries/s of the group: encoder + search, batched, all cores."""


def project(f: IndexFigures, cores_here: int, encoder_core_s: float, cores: int,
            passages: int = WIKI18_PASSAGES, dim: int = WIKI18_DIM) -> Projection:
    """Carry one index's figures to `passages` x `dim` on `cores` CPUs; encoder_core_s is the target encoder's
    core-seconds per query (batched)."""
    search = search_core_s(f, cores_here, passages, dim)
    bytes_per_passage = f.index_bytes / f.passages
    if "PQ" not in f.factory:  # float vectors grow with the dimension; PQ codes of a fixed M do not
        bytes_per_passage *= dim / f.dim
    return Projection(f.name, bytes_per_passage * passages / 1e9, search * 1e3, cores / (search + encoder_core_s))


def searches_per_step(prompts: int, group_size: int, searches_per_trajectory: float) -> float:
    """Search calls of one rollout step: every trajectory of every prompt's group searches this many times."""
    return prompts * group_size * searches_per_trajectory


def step_retrieval_s(searches: float, qps: float) -> float:
    """Seconds the retrieval group needs for one step's searches at its full rate."""
    return searches / qps
