"""The on-disk index: faiss vectors, the passage store beside them, and meta.json describing both.

Layout of an index directory:
    meta.json          encoder, dimension, normalisation, factory, corpus fingerprint, count
    index.faiss        the faiss index (inner product over L2-normalised vectors = cosine)
    docs.jsonl         {"id", "contents"} per passage, row i = faiss id i
    docs.offsets.npy   int64 byte offsets of each docs.jsonl line (N + 1 entries), memory-mapped
Passages are read with pread on demand, so serving wiki-18 keeps its 13 GB of text on disk, not in Python objects.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from retrieval_service.config import DEFAULT_ENCODER

META_FILE = "meta.json"
INDEX_FILE = "index.faiss"
DOCS_FILE = "docs.jsonl"
OFFSETS_FILE = "docs.offsets.npy"
FORMAT_VERSION = 1
BLAS_MIN_QUERIES = 3
"""Exact (Flat) search of this many queries or more runs as one BLAS matrix product instead of one memory scan per
query. faiss 1.15 compares `distance_compute_blas_threshold` (default 128000) with queries x dimension, so at 384-d a
micro-batch of 64 scanned every vector 64 times: 5.9 ms per query at 50k vectors on one core, against 0.7 ms as one
product. One or two queries are faster scanned (5 ms against 7-14 ms). Earlier faiss compares it with the query
count (default 20)."""


def blas_threshold(dim: int, version: str = faiss.__version__) -> int:
    """The faiss `distance_compute_blas_threshold` that means BLAS_MIN_QUERIES queries for this faiss version."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return BLAS_MIN_QUERIES * dim if (major, minor) >= (1, 15) else BLAS_MIN_QUERIES


class IndexMeta(BaseModel):
    """What an index directory holds and how it was built."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(FORMAT_VERSION, description="Layout version of the index directory.")
    encoder: str = Field(description="Encoder name_or_path the passages were encoded with.")
    pooling: str = Field(description="Pooling of the encoder (mean, cls, ...).")
    e5_prefixes: bool = Field(description="Whether 'query: '/'passage: ' prefixes were used.")
    dim: int = Field(description="Vector dimension.")
    normalized: bool = Field(True, description="Vectors are L2-normalised, so inner product is cosine.")
    metric: str = Field("inner_product", description="faiss metric of the index.")
    factory: str = Field(description="faiss index_factory string (Flat, HNSW32, IVF4096,PQ64, ...).")
    corpus_path: str = Field(description="Corpus file the index was built from (informational).")
    corpus_fingerprint: str = Field(description="Fingerprint of that corpus file (see corpus.corpus_fingerprint).")
    count: int = Field(description="Number of passages = faiss ntotal.")


def canonical_encoder_name(name: str) -> str:
    """One spelling per encoder, so 'sentence-transformers/all-MiniLM-L6-v2' matches the packaged default."""
    lowered = name.strip().rstrip("/").lower()
    if lowered in {DEFAULT_ENCODER.lower(), f"sentence-transformers/{DEFAULT_ENCODER}".lower()}:
        return DEFAULT_ENCODER.lower()
    return lowered


def read_meta(index_dir: str | Path) -> IndexMeta:
    """The meta.json of a finished index; a clear error when the directory is not one."""
    path = Path(index_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{index_dir} is not a finished index (no {META_FILE}); build it with `research index`")
    return IndexMeta.model_validate_json(path.read_text())


def check_encoder(meta: IndexMeta, encoder_name: str, dim: int | None = None) -> None:
    """Refuse to search an index with an encoder other than the one that built it."""
    same_name = canonical_encoder_name(meta.encoder) == canonical_encoder_name(encoder_name)
    if not same_name or (dim is not None and meta.dim != dim):
        raise ValueError(
            f"index was built with encoder {meta.encoder!r} (dim {meta.dim}) but the service encoder is "
            f"{encoder_name!r} (dim {dim or '?'}); serve it with --encoder {meta.encoder!r} or rebuild the index"
        )


def new_faiss_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product faiss index from an index_factory string."""
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


class DocStore:
    """Random access to docs.jsonl through its offsets array; safe to share between threads."""

    def __init__(self, index_dir: str | Path) -> None:
        index_dir = Path(index_dir)
        self.offsets = np.load(index_dir / OFFSETS_FILE, mmap_mode="r")
        self._fd = os.open(index_dir / DOCS_FILE, os.O_RDONLY)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> dict[str, str]:
        """The {"id", "contents"} record of faiss row `row`."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return json.loads(os.pread(self._fd, end - start, start))

    def close(self) -> None:
        """Release the file descriptor."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class PassageIndex:
    """A loaded index: vector search plus passage lookup."""

    def __init__(self, index_dir: str | Path, use_gpu: bool = False, nprobe: int = 64, ef_search: int = 128) -> None:
        self.index_dir = Path(index_dir)
        self.meta = read_meta(self.index_dir)
        index = faiss.read_index(str(self.index_dir / INDEX_FILE))
        faiss.cvar.distance_compute_blas_threshold = blas_threshold(self.meta.dim)
        if index.ntotal != self.meta.count:
            raise ValueError(f"{self.index_dir}: faiss holds {index.ntotal} vectors, meta.json says {self.meta.count}")
        # Search-time knobs of approximate indexes; harmless names for Flat are simply not set.
        parameters = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            try:
                parameters.set_index_parameter(index, name, value)
            except RuntimeError:
                pass
        if use_gpu:
            index = self._to_all_gpus(index)
        self.index = index
        self.docs = DocStore(self.index_dir)
        if len(self.docs) != self.meta.count:
            raise ValueError(f"{self.index_dir}: {len(self.docs)} passages on disk, meta.json says {self.meta.count}")

    @staticmethod
    def _to_all_gpus(index: faiss.Index) -> faiss.Index:
        if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
            raise RuntimeError("faiss_gpu is set but this faiss has no GPU support or sees no GPU (install faiss-gpu)")
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # each GPU holds 1/n of the vectors, so wiki-18 Flat fits on 8 x 16 GB
        options.useFloat16 = True
        return faiss.index_cpu_to_all_gpus(index, co=options)

    def search(self, vectors: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and faiss rows, both (n, k'); k' = min(topk, count); rows may hold -1 for approximate indexes."""
        k = max(1, min(topk, self.meta.count))
        if len(vectors) == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)

    def passages(self, rows: np.ndarray) -> list[dict[str, str]]:
        """Corpus records of the given faiss rows, skipping -1 (no result)."""
        return [self.docs.get(int(r)) for r in rows if r >= 0]

    def close(self) -> None:
        """Release the passage store."""
        self.docs.close()
