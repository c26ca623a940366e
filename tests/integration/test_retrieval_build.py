"""Index builds: an interrupted build resumes to the same index; parquet and approximate factories work."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qa.world import generate_world
from retrieval_service.build import BUILD_DIR, build_index
from retrieval_service.index import DOCS_FILE, INDEX_FILE, PassageIndex, read_meta

pytestmark = pytest.mark.slow

SHARD = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = tmp_path_factory.mktemp("build_world")
    generate_world(world, seed=5, num_passages=80)
    path = world / "small.jsonl"
    with (world / "corpus.jsonl").open() as lines:
        path.write_text("".join(itertools.islice(lines, 60)))
    return path


def vectors(index_dir: Path) -> np.ndarray:
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    return index.reconstruct_n(0, index.ntotal)


def test_interrupted_build_resumes_to_the_same_index(corpus: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    assert build_index(corpus, resumed, shard_size=SHARD, max_new_shards=1, progress=False) is None
    shards = sorted(p.name for p in (resumed / BUILD_DIR).glob("shard_*.npy"))
    assert shards == ["shard_00000.npy"] and not (resumed / "meta.json").exists()
    # A crash in the middle of writing shard 1 leaves a temporary file; it must not count as done.
    (resumed / BUILD_DIR / "shard_00001.npy.tmp.npy").write_bytes(b"partial")
    meta = build_index(corpus, resumed, shard_size=SHARD, progress=False)
    assert meta is not None and meta.count == 60 and not (resumed / BUILD_DIR).exists()

    clean = tmp_path / "clean"
    build_index(corpus, clean, shard_size=SHARD, progress=False)
    assert np.array_equal(vectors(resumed), vectors(clean))
    assert (resumed / DOCS_FILE).read_bytes() == (clean / DOCS_FILE).read_bytes()
    assert read_meta(resumed) == read_meta(clean)
    assert build_index(corpus, clean, shard_size=SHARD, progress=False) == meta  # finished: nothing to redo


def test_resume_refuses_shards_of_another_corpus(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    build_index(corpus, out, shard_size=SHARD, max_new_shards=1, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(corpus.read_text().replace("born", "borne"))
    with pytest.raises(ValueError, match="different build"):
        build_index(other, out, shard_size=SHARD, progress=False)


def test_parquet_corpus_and_hnsw_factory(corpus: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    meta = build_index(parquet, tmp_path / "hnsw", factory="HNSW32", shard_size=SHARD, progress=False)
    assert meta is not None and meta.factory == "HNSW32" and meta.count == 60
    index = PassageIndex(tmp_path / "hnsw")
    stored = vectors(tmp_path / "hnsw")
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    scores, found = index.search(stored[:10], topk=1)
    assert found[:, 0].tolist() == list(range(10))  # each passage is its own nearest neighbour
    assert [d["id"] for d in index.passages(found[:, 0])] == [r["id"] for r in rows[:10]]
    index.close()


def test_flat_search_gives_the_same_hits_batched_and_one_by_one(corpus: Path, tmp_path: Path) -> None:
    build_index(corpus, tmp_path / "flat", shard_size=SHARD, progress=False)
    index = PassageIndex(tmp_path / "flat")
    # A batch takes faiss' BLAS path (the threshold PassageIndex sets), a single query the scanning one.
    assert faiss.cvar.distance_compute_blas_threshold <= 8 * index.meta.dim
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((8, index.meta.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, rows = index.search(queries, topk=5)
    for i in range(len(queries)):
        alone_scores, alone_rows = index.search(queries[i : i + 1], topk=5)
        assert alone_rows[0].tolist() == rows[i].tolist()
        np.testing.assert_allclose(alone_scores[0], scores[i], atol=1e-5)
    index.close()
