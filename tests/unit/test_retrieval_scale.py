"""The pure logic of bench.retrieval_scale: recall, the closing line, the wiki-18 model, the synthetic vectors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bench.retrieval_scale import index_specs, orthonormal_map, synthesize, write_docs
from bench.scale_model import (
    ENCODER_FLOP_RATIO,
    IndexFigures,
    ivf_nlist,
    last_line,
    pick_best,
    project,
    recall_at_k,
    search_core_s,
    searches_per_step,
)


def figures(name: str, factory: str, recall: float, qps32: float, **extra: float) -> IndexFigures:
    base = dict(passages=1_000_000, dim=768, latency_ms=1.0, batch_qps=100.0, service_p50_ms1=10.0, build_s=1.0,
                index_bytes=3_072_000_000, nlist=0, nprobe=0)
    base.update(extra)
    return IndexFigures(name=name, factory=factory, recall5=recall, service_qps32=qps32, **base)


def test_recall_at_k_counts_overlap_per_query() -> None:
    truth = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    found = np.array([[5, 4, 3, 2, 1], [6, 7, -1, 99, 98]])  # order does not matter, -1 never matches
    assert recall_at_k(found, truth, 5) == pytest.approx((5 + 2) / 10)
    assert recall_at_k(found, truth, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        recall_at_k(found[:1], truth, 5)


def test_last_line_picks_the_fastest_index_above_the_recall_floor() -> None:
    rows = [figures("Flat", "Flat", 1.0, 20.0), figures("IVF-PQ", "IVF4096,PQ64", 0.40, 200.0),
            figures("HNSW", "HNSW32", 0.97, 150.0), figures("IVF-Flat", "IVF4096,Flat", 0.96, 120.0)]
    assert pick_best(rows).name == "HNSW"
    line = last_line(rows)
    assert line == "passages=1000000 best=HNSW recall5=0.970 speedup_vs_flat=7.50"
    assert re.fullmatch(r"passages=\d+ best=\S+ recall5=[0-9.]+ speedup_vs_flat=[0-9.]+", line)
    assert pick_best(rows, min_recall=0.99).name == "Flat"


def test_ivf_nlist_follows_four_sqrt_n() -> None:
    assert ivf_nlist(1_000_000) == 4096
    assert ivf_nlist(21_015_324) == 16384
    assert index_specs(1_000_000)["IVF-PQ"] == "IVF4096,PQ64"


def test_model_scales_each_index_type_by_its_own_rule() -> None:
    flat = figures("Flat", "Flat", 1.0, 20.0, batch_qps=100.0)
    # 2 cores at 100 QPS = 20 core-ms per query at 1M x 768; wiki-18 has 21.0x the passages.
    assert search_core_s(flat, 2) == pytest.approx(0.02 * 21_015_324 / 1_000_000)
    hnsw = figures("HNSW", "HNSW32", 0.97, 150.0, batch_qps=1000.0)
    assert search_core_s(hnsw, 2) == pytest.approx(0.002 * np.log(21_015_324) / np.log(1_000_000))
    ivf = figures("IVF-Flat", "IVF4096,Flat", 0.96, 120.0, batch_qps=1000.0, nlist=4096, nprobe=64)
    scanned_here, scanned_there = 64 * 1_000_000 / 4096 + 4096, 64 * 21_015_324 / 16384 + 16384
    assert search_core_s(ivf, 2) == pytest.approx(0.002 * scanned_there / scanned_here)
    projected = project(flat, 2, encoder_core_s=0.01, cores=32)
    assert projected.qps == pytest.approx(32 / (search_core_s(flat, 2) + 0.01))
    assert projected.memory_gb == pytest.approx(3.072 * 21.015324)
    pq = figures("IVF-PQ", "IVF4096,PQ64", 0.4, 200.0, index_bytes=72_000_000, nlist=4096, nprobe=64)
    assert project(pq, 2, 0.01, 32).memory_gb == pytest.approx(72 * 21_015_324 / 1e9)
    assert ENCODER_FLOP_RATIO == pytest.approx(8.0)
    assert searches_per_step(256, 5, 3) == 3840


def test_synthetic_vectors_keep_the_real_ones_and_are_unit_norm(tmp_path) -> None:
    rng = np.random.default_rng(1)
    real = rng.standard_normal((50, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    mapping = orthonormal_map(16, 32)
    assert np.allclose(mapping.T @ mapping, np.eye(16), atol=1e-5)
    vectors = synthesize(real, 400, mapping, noise=0.1, chunk=64)
    assert vectors.shape == (400, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[:50] @ vectors[:50].T, real @ real.T, atol=1e-5)  # inner products kept
    # A synthetic row stays near its parent (same neighbourhood), closer than a random real vector is.
    parent_cos = np.sum(vectors[50:] * vectors[np.arange(50, 400) % 50], axis=1)
    assert np.median(parent_cos) > np.median(real @ real.T)
    write_docs(tmp_path, ["a", "b\nc"], 5)
    lines = (tmp_path / "docs.jsonl").read_text().splitlines()
    assert [line.split('"contents": ')[1] for line in lines] == ['"a"}', '"b\\nc"}', '"a"}', '"b\\nc"}', '"a"}']
    offsets = np.load(tmp_path / "docs.offsets.npy")
    assert len(offsets) == 6 and offsets[-1] == (tmp_path / "docs.jsonl").stat().st_size
