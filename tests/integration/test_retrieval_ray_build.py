"""Shards encoded on Ray actors give the same index as a local build (a one-CPU local Ray cluster on loopback)."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from qa.world import generate_world
from retrieval_service.build import build_index
from retrieval_service.index import DOCS_FILE, INDEX_FILE

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A short private temp dir: Ray's socket paths must stay under the unix limit, and its logs must not linger.
    temp_dir = tempfile.mkdtemp(prefix="ray-rs-")
    ray.init(
        num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=False
    )
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_actor_build_matches_local_build(local_ray: None, tmp_path: Path) -> None:
    generate_world(tmp_path / "world", seed=7, num_passages=60)
    corpus = tmp_path / "small.jsonl"
    with (tmp_path / "world" / "corpus.jsonl").open() as lines:
        corpus.write_text("".join(itertools.islice(lines, 40)))
    on_ray = build_index(corpus, tmp_path / "ray", shard_size=15, ray_actors=1, progress=False)
    local = build_index(corpus, tmp_path / "local", shard_size=15, progress=False)
    assert on_ray is not None and on_ray == local

    def vectors(index_dir: Path) -> np.ndarray:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
        return index.reconstruct_n(0, index.ntotal)

    # Ray gives its worker one thread, so float sums may differ in the last bits: not bitwise, but close.
    np.testing.assert_allclose(vectors(tmp_path / "ray"), vectors(tmp_path / "local"), atol=1e-5)
    assert (tmp_path / "ray" / DOCS_FILE).read_bytes() == (tmp_path / "local" / DOCS_FILE).read_bytes()
