"""Build an index directory from a corpus: encode in shards (resumable, optionally on Ray actors), then assemble.

Each shard of `shard_size` passages is written as build/shard_NNNNN.docs.jsonl and then build/shard_NNNNN.npy; the
.npy appears last (atomic rename), so its presence means the shard is complete. An interrupted build rerun with the
same corpus, encoder and shard size encodes only the missing shards. Assembly (train if needed, add, write) runs
once every shard exists; meta.json is written last and marks the index finished.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from retrieval_service.config import EncoderConfig
from retrieval_service.corpus import CorpusRecord, corpus_fingerprint, count_records, read_corpus
from retrieval_service.encoder import Encoder, read_pooling, resolve_encoder_path
from retrieval_service.index import (
    DOCS_FILE,
    INDEX_FILE,
    META_FILE,
    OFFSETS_FILE,
    IndexMeta,
    canonical_encoder_name,
    new_faiss_index,
)

BUILD_DIR = "build"
STATE_FILE = "state.json"
_PROGRESS_CHUNK = 512  # passages per progress-bar tick on the local path


def _shard_paths(build_dir: Path, shard: int) -> tuple[Path, Path]:
    return build_dir / f"shard_{shard:05d}.docs.jsonl", build_dir / f"shard_{shard:05d}.npy"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_shard(build_dir: Path, shard: int, records: list[CorpusRecord], vectors: np.ndarray) -> None:
    docs_path, vec_path = _shard_paths(build_dir, shard)
    lines = "".join(json.dumps({"id": r.id, "contents": r.contents}, ensure_ascii=False) + "\n" for r in records)
    _atomic_write_bytes(docs_path, lines.encode("utf-8"))
    tmp = vec_path.with_name(vec_path.name + ".tmp.npy")
    np.save(tmp, vectors.astype(np.float32, copy=False))
    os.replace(tmp, vec_path)


def _chunks(records: Iterator[CorpusRecord], size: int) -> Iterator[list[CorpusRecord]]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _check_state(build_dir: Path, state: dict[str, object]) -> None:
    path = build_dir / STATE_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != state:
            raise ValueError(
                f"{build_dir} holds shards of a different build ({previous}); this build is {state}. "
                f"Delete {build_dir} to start over."
            )
    else:
        build_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, json.dumps(state, indent=1).encode())


def _encode_locally(
    encoder: Encoder, pending: Iterator[tuple[int, list[CorpusRecord]]], build_dir: Path, bar: tqdm
) -> None:
    for shard, records in pending:
        parts = []
        for start in range(0, len(records), _PROGRESS_CHUNK):
            part = records[start : start + _PROGRESS_CHUNK]
            parts.append(encoder.encode_passages([r.contents for r in part]))
            bar.update(len(part))
        _write_shard(build_dir, shard, records, np.concatenate(parts))


def _encode_on_ray(
    encoder_config: EncoderConfig,
    pending: Iterator[tuple[int, list[CorpusRecord]]],
    build_dir: Path,
    bar: tqdm,
    actors: int,
    gpus_per_actor: float,
) -> None:
    import ray

    @ray.remote
    class ShardEncoder:
        """Holds one encoder replica; encodes the passages of one shard per call."""

        def __init__(self, config: EncoderConfig) -> None:
            self.encoder = Encoder(config)

        def encode(self, contents: list[str]) -> np.ndarray:
            return self.encoder.encode_passages(contents)

    pool = [ShardEncoder.options(num_gpus=gpus_per_actor).remote(encoder_config) for _ in range(actors)]
    idle = list(pool)
    in_flight: dict[ray.ObjectRef, tuple[object, int, list[CorpusRecord]]] = {}

    def finish_one() -> None:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        actor, shard, records = in_flight.pop(done[0])
        _write_shard(build_dir, shard, records, ray.get(done[0]))
        bar.update(len(records))
        idle.append(actor)

    # The driver streams the corpus; at most one shard per actor is in memory, so 21M passages never are.
    for shard, records in pending:
        if not idle:
            finish_one()
        actor = idle.pop()
        in_flight[actor.encode.remote([r.contents for r in records])] = (actor, shard, records)
    while in_flight:
        finish_one()
    for actor in pool:
        ray.kill(actor)


def _assemble(out_dir: Path, build_dir: Path, num_shards: int, factory: str, dim: int, train_size: int) -> int:
    vec_paths = [_shard_paths(build_dir, k)[1] for k in range(num_shards)]
    index = new_faiss_index(factory, dim)
    if not index.is_trained:
        sample, have = [], 0
        for path in vec_paths:
            if have >= train_size:
                break
            part = np.load(path, mmap_mode="r")[: train_size - have]
            sample.append(np.asarray(part))
            have += len(part)
        index.train(np.concatenate(sample))
    for path in vec_paths:
        index.add(np.ascontiguousarray(np.load(path, mmap_mode="r")))
    tmp_index = out_dir / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp_index))
    os.replace(tmp_index, out_dir / INDEX_FILE)

    offsets = [0]
    tmp_docs = out_dir / (DOCS_FILE + ".tmp")
    with tmp_docs.open("wb") as out:
        for k in range(num_shards):
            with _shard_paths(build_dir, k)[0].open("rb") as shard_docs:
                for line in shard_docs:
                    out.write(line)
                    offsets.append(offsets[-1] + len(line))
    os.replace(tmp_docs, out_dir / DOCS_FILE)
    np.save(out_dir / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    return int(index.ntotal)


def encoder_dim(model_dir: Path) -> int:
    """Output dimension of a transformers encoder folder (its config.json's hidden_size), without loading it."""
    raw = json.loads((model_dir / "config.json").read_text())
    try:
        return int(raw["hidden_size"])
    except KeyError:
        raise ValueError(f"{model_dir}/config.json has no hidden_size") from None


def check_factory(factory: str, dim: int) -> None:
    """A ValueError naming --factory when faiss' index_factory cannot build `factory` for `dim`-d vectors."""
    try:
        new_faiss_index(factory, dim)
    except RuntimeError as err:  # faiss' C++ message: several lines with the source location
        reason = next((line.strip() for line in str(err).splitlines() if "rror" in line), str(err).strip())
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", reason)  # drop the C++ function and source line
        raise ValueError(f"--factory {factory!r} is not a faiss index_factory string for {dim}-d vectors "
                         f"(e.g. Flat, HNSW32, IVF4096,PQ64): {reason}") from None


def build_index(
    corpus: str | Path,
    out_dir: str | Path,
    encoder_config: EncoderConfig | None = None,
    factory: str = "Flat",
    shard_size: int = 100_000,
    ray_actors: int = 0,
    ray_gpus_per_actor: float = 0.0,
    train_size: int = 1_000_000,
    max_new_shards: int | None = None,
    keep_shards: bool = False,
    progress: bool = True,
) -> IndexMeta | None:
    """Encode `corpus` into `out_dir`; returns its meta, or None when `max_new_shards` stopped it before assembly."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    encoder_config = encoder_config or EncoderConfig()
    # Before anything is encoded (21M passages take hours): a factory faiss cannot build fails now, not at assembly.
    model_dir = resolve_encoder_path(encoder_config.name_or_path)
    check_factory(factory, encoder_dim(model_dir))
    fingerprint = corpus_fingerprint(corpus)
    if (out_dir / META_FILE).is_file():
        done = IndexMeta.model_validate_json((out_dir / META_FILE).read_text())
        same = (done.corpus_fingerprint, canonical_encoder_name(done.encoder), done.factory) == (
            fingerprint,
            canonical_encoder_name(encoder_config.name_or_path),
            factory,
        )
        if same:
            return done
        raise ValueError(f"{out_dir} already holds a different finished index ({done.factory}, {done.encoder})")

    build_dir = out_dir / BUILD_DIR
    state = {
        "corpus_fingerprint": fingerprint,
        "encoder": canonical_encoder_name(encoder_config.name_or_path),
        "passage_max_length": encoder_config.passage_max_length,
        "shard_size": shard_size,
    }
    _check_state(build_dir, state)
    count = count_records(corpus)
    if count == 0:
        raise ValueError(f"{corpus} holds no passages")
    num_shards = (count + shard_size - 1) // shard_size
    complete = [_shard_paths(build_dir, k)[1].is_file() for k in range(num_shards)]
    first_missing = complete.index(False) if False in complete else num_shards
    todo = [k for k in range(num_shards) if not complete[k]]
    if max_new_shards is not None:
        todo = todo[:max_new_shards]
    allowed = set(todo)

    def pending() -> Iterator[tuple[int, list[CorpusRecord]]]:
        chunks = _chunks(read_corpus(corpus, skip=first_missing * shard_size), shard_size)
        for shard, records in enumerate(chunks, start=first_missing):
            if shard > max(allowed, default=-1):
                return
            if shard in allowed:
                yield shard, records

    done_passages = sum(min(shard_size, count - k * shard_size) for k in range(num_shards) if complete[k])
    bar = tqdm(total=count, initial=done_passages, unit="passage", desc="encode", disable=not progress)
    if todo and ray_actors > 0:
        _encode_on_ray(encoder_config, pending(), build_dir, bar, ray_actors, ray_gpus_per_actor)
    elif todo:
        _encode_locally(Encoder(encoder_config), pending(), build_dir, bar)
    bar.close()
    if not all(_shard_paths(build_dir, k)[1].is_file() for k in range(num_shards)):
        return None

    dim = int(np.load(_shard_paths(build_dir, 0)[1], mmap_mode="r").shape[1])
    total = _assemble(out_dir, build_dir, num_shards, factory, dim, train_size)
    name = encoder_config.name_or_path
    meta = IndexMeta(
        encoder=name,
        pooling=read_pooling(model_dir),
        e5_prefixes="e5" in name.lower(),
        dim=dim,
        factory=factory,
        corpus_path=str(corpus.resolve()),
        corpus_fingerprint=fingerprint,
        count=total,
    )
    _atomic_write_bytes(out_dir / META_FILE, meta.model_dump_json(indent=1).encode())
    if not keep_shards:
        shutil.rmtree(build_dir)
    return meta


ADOPT_SAMPLES = 8  # passages re-encoded to check an adopted index against our encoder
ADOPT_MIN_COSINE = 0.99  # fp16 encoders and other BLAS builds differ in the third decimal; another encoder does not


def describe_factory(index: faiss.Index) -> str:
    """The index_factory string of a faiss index's type where it is one we plan for (Flat, HNSWm), else its class."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlat):
        return "Flat"
    if isinstance(index, faiss.IndexHNSWFlat):
        return f"HNSW{index.hnsw.nb_neighbors(1)}"
    return type(index).__name__


def adopt_index(corpus: str | Path, out_dir: str | Path, encoder_config: EncoderConfig, faiss_file: str | Path,
                progress: bool = True) -> IndexMeta:
    """Make an index directory of a faiss index built elsewhere over `corpus` (row i = the corpus' passage i) with
    the same encoder, instead of encoding 21M passages again. Checked before anything is written: the dimension,
    the inner-product metric, the passage count, and ADOPT_SAMPLES passages re-encoded here against the vectors the
    index stores (or, when it cannot reconstruct them, finding themselves in its top 10)."""
    corpus, out_dir, faiss_file = Path(corpus), Path(out_dir), Path(faiss_file)
    model_dir = resolve_encoder_path(encoder_config.name_or_path)
    dim = encoder_dim(model_dir)
    index = faiss.read_index(str(faiss_file), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if index.d != dim:
        raise ValueError(f"--faiss-index {faiss_file} holds {index.d}-d vectors; {encoder_config.name_or_path} "
                         f"makes {dim}-d ones")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"--faiss-index {faiss_file} does not rank by inner product (faiss metric "
                         f"{index.metric_type}); the service searches by inner product")
    count = count_records(corpus)
    if count != index.ntotal:
        raise ValueError(f"--faiss-index {faiss_file} holds {index.ntotal} vectors but {corpus} {count} passages: "
                         "not the same corpus")
    rows = sorted({int(k * (count - 1) / max(1, ADOPT_SAMPLES - 1)) for k in range(ADOPT_SAMPLES)})
    wanted = set(rows)
    texts = {i: record.contents for i, record in enumerate(read_corpus(corpus)) if i in wanted}
    ours = Encoder(encoder_config).encode_passages([texts[row] for row in rows])
    normalized = True
    try:
        theirs = np.stack([index.reconstruct(row) for row in rows])
    except RuntimeError:  # no direct map (IVF without one, PQ): each passage must find itself instead
        _, found = index.search(np.ascontiguousarray(ours, dtype=np.float32), 10)
        lost = [row for row, hits in zip(rows, found, strict=True) if row not in hits]
        if lost:
            raise ValueError(f"--faiss-index {faiss_file}: passages {lost} re-encoded with "
                             f"{encoder_config.name_or_path} do not find themselves in its top 10: another encoder, "
                             "prefix or passage order") from None
    else:
        norms = np.linalg.norm(theirs, axis=1)
        cosine = (ours * theirs).sum(axis=1) / np.maximum(norms * np.linalg.norm(ours, axis=1), 1e-12)
        if cosine.min() < ADOPT_MIN_COSINE:
            raise ValueError(f"--faiss-index {faiss_file}: row {rows[int(cosine.argmin())]} re-encoded with "
                             f"{encoder_config.name_or_path} has cosine {cosine.min():.3f} to the stored vector: "
                             "another encoder, prefix, pooling or passage order")
        normalized = bool(np.allclose(norms, 1.0, atol=1e-2))
    del index
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / INDEX_FILE
    if not target.exists():
        try:
            os.link(faiss_file, target)  # same filesystem: no second copy of a 64 GB file
        except OSError:
            shutil.copyfile(faiss_file, target)
    offsets = [0]
    tmp_docs = out_dir / (DOCS_FILE + ".tmp")
    with tmp_docs.open("wb") as out, tqdm(total=count, unit="passage", desc="passages", disable=not progress) as bar:
        for record in read_corpus(corpus):
            line = (json.dumps({"id": record.id, "contents": record.contents}, ensure_ascii=False) + "\n").encode()
            out.write(line)
            offsets.append(offsets[-1] + len(line))
            bar.update(1)
    os.replace(tmp_docs, out_dir / DOCS_FILE)
    np.save(out_dir / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    name = encoder_config.name_or_path
    meta = IndexMeta(encoder=name, pooling=read_pooling(model_dir), e5_prefixes="e5" in name.lower(), dim=dim,
                     normalized=normalized, factory=describe_factory(faiss.read_index(str(target), faiss.IO_FLAG_MMAP
                                                                                      | faiss.IO_FLAG_READ_ONLY)),
                     corpus_path=str(corpus.resolve()), corpus_fingerprint=corpus_fingerprint(corpus), count=count)
    _atomic_write_bytes(out_dir / META_FILE, meta.model_dump_json(indent=1).encode())
    return meta
