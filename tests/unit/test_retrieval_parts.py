"""Unit tests of the retrieval service's pieces that need no model: corpus reading, config, cache, formatting."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from retrieval_service.batcher import MicroBatcher, QueryCache, SearchMetrics
from retrieval_service.config import EncoderConfig, RetrievalConfig, ServerConfig
from retrieval_service.corpus import (
    corpus_fingerprint,
    count_records,
    join_contents,
    read_corpus,
    split_contents,
)
from retrieval_service.encoder import read_pooling, resolve_encoder_path
from retrieval_service.index import IndexMeta, canonical_encoder_name, check_encoder
from retrieval_service.retriever import Hit

ROWS = [
    {"id": "0", "contents": '"Evan Morris"\nEvan L. Morris was a lobbyist.'},
    {"id": "1", "contents": '"Teboara"\nTeboara is a city.\nSecond line.'},
    {"id": "2", "contents": '"Vruaria"\nVruaria is a country.'},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # trailing blank line is tolerated
    return path


def test_split_and_join_contents_round_trip() -> None:
    assert split_contents(ROWS[1]["contents"]) == ("Teboara", "Teboara is a city.\nSecond line.")
    assert split_contents("no title line") == ("no title line", "")
    assert join_contents(*split_contents(ROWS[0]["contents"])) == ROWS[0]["contents"]


def test_jsonl_and_parquet_read_the_same_records(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "c.jsonl", ROWS)
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    from_jsonl = list(read_corpus(jsonl))
    assert [r.contents for r in from_jsonl] == [r["contents"] for r in ROWS]
    assert list(read_corpus(parquet)) == from_jsonl
    assert list(read_corpus(jsonl, skip=2)) == from_jsonl[2:]
    assert list(read_corpus(parquet, skip=1)) == from_jsonl[1:]
    assert count_records(jsonl) == count_records(parquet) == 3


def test_title_text_records_become_wiki18_contents(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"title": "Paris", "text": "Capital."}, {"title": "X", "text": "Y"}])
    records = list(read_corpus(path))
    assert records[0].id == "0" and records[0].contents == '"Paris"\nCapital.'
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "1", "body": "nothing usable"}])
    with pytest.raises(ValueError, match="neither 'contents' nor 'text'"):
        list(read_corpus(bad))


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[:2])
    assert corpus_fingerprint(a) == corpus_fingerprint(a)
    assert corpus_fingerprint(a) != corpus_fingerprint(b)


def test_configs_forbid_unknown_keys_and_document_every_field() -> None:
    with pytest.raises(ValidationError, match="no_such_key"):
        RetrievalConfig.model_validate({"no_such_key": 1})
    with pytest.raises(ValidationError):
        RetrievalConfig.model_validate({"server": {"port": 70000}})
    config = RetrievalConfig.model_validate({"topk": 3, "urls": ["http://127.0.0.1:1"], "result_format": "searchr1"})
    assert config.server.host == "127.0.0.1" and config.encoder.name_or_path == "all-MiniLM-L6-v2"
    for model in (EncoderConfig, ServerConfig, RetrievalConfig):
        undocumented = [name for name, field in model.model_fields.items() if not field.description]
        assert not undocumented, f"{model.__name__}: {undocumented}"


def test_query_cache_evicts_least_recently_used() -> None:
    cache = QueryCache(2)
    cache.put(("a", 5), [])
    cache.put(("b", 5), [])
    assert cache.get(("a", 5)) == []  # refreshes a
    cache.put(("c", 5), [])
    assert cache.get(("b", 5)) is None and cache.get(("a", 5)) == [] and cache.get(("c", 5)) == []
    disabled = QueryCache(0)
    disabled.put(("a", 5), [])
    assert disabled.get(("a", 5)) is None


def test_query_cache_is_bounded_in_bytes() -> None:
    from retrieval_service.batcher import entry_bytes
    from retrieval_service.retriever import Hit

    def hits(text: str, n: int) -> list[Hit]:
        return [Hit({"id": str(i), "contents": text}, 0.5) for i in range(n)]

    long, short = hits("x" * 2_000, 10), hits("y", 1)
    size = entry_bytes(("a", 10), long)
    assert size >= 10 * 2_000 + 10 * 400  # the text and each hit's objects
    assert entry_bytes(("b", 10), long) == size and entry_bytes(("a" * 100, 10), long) == size + 99
    cache = QueryCache(100, max_bytes=2 * size + 1)
    cache.put(("a", 10), long)
    cache.put(("b", 10), long)
    assert cache.bytes == 2 * size and len(cache) == 2
    cache.put(("b", 10), long)  # storing a key again does not count it twice
    assert cache.bytes == 2 * size
    assert cache.get(("a", 10)) is long  # refreshes a: b is now the least recently used
    cache.put(("c", 1), short)
    assert cache.get(("b", 10)) is None and cache.get(("a", 10)) is long and cache.get(("c", 1)) is short
    assert cache.bytes == size + entry_bytes(("c", 1), short) and len(cache) == 2
    cache.put(("huge", 10), hits("z" * 10 * size, 1))  # larger than the whole bound: not stored, evicts nothing
    assert len(cache) == 2 and cache.get(("huge", 10)) is None
    nothing = QueryCache(100, max_bytes=0)
    nothing.put(("a", 5), short)
    assert nothing.get(("a", 5)) is None and nothing.bytes == 0


def test_encoder_resolution_and_pooling_config(tmp_path: Path) -> None:
    packaged = resolve_encoder_path("all-MiniLM-L6-v2")
    assert (packaged / "model.safetensors").is_file()
    assert resolve_encoder_path("sentence-transformers/all-MiniLM-L6-v2") == packaged
    assert read_pooling(packaged) == "mean"
    assert read_pooling(tmp_path) == "mean"  # no sentence-transformers config: E5's mean pooling
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pooling(tmp_path) == "cls"
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_encoder_path(str(tmp_path))


def test_index_refuses_another_encoder() -> None:
    meta = IndexMeta(
        encoder="sentence-transformers/all-MiniLM-L6-v2", pooling="mean", e5_prefixes=False, dim=384,
        factory="Flat", corpus_path="c.jsonl", corpus_fingerprint="x", count=3,
    )
    assert canonical_encoder_name(meta.encoder) == canonical_encoder_name("all-MiniLM-L6-v2")
    check_encoder(meta, "all-MiniLM-L6-v2", 384)
    with pytest.raises(ValueError, match="intfloat/e5-base-v2"):
        check_encoder(meta, "intfloat/e5-base-v2", 768)


def test_blas_threshold_means_three_queries_in_both_faiss_conventions() -> None:
    from retrieval_service.index import BLAS_MIN_QUERIES, blas_threshold

    assert blas_threshold(384, "1.15.1") == BLAS_MIN_QUERIES * 384  # compared with queries x dimension
    assert blas_threshold(768, "1.14.1.post1") == BLAS_MIN_QUERIES  # compared with the query count


def test_scores_that_are_not_finite_become_null_in_strict_json() -> None:
    from retrieval_service.app import _json, _score
    from retrieval_service.retriever import Hit

    hits = [Hit({"id": "1", "contents": "x"}, 0.5), Hit({"id": "2", "contents": "y"}, float("nan"))]
    body = _json([[_score(h) for h in hits], "\ud800 lone surrogate"]).body
    assert json.loads(body) == [[0.5, None], "? lone surrogate"]


@pytest.mark.parametrize(
    ("behaviour", "label"), [("answer", "200"), ("disconnect", "499"), ("raise", "500")]
)
def test_request_counter_labels_each_outcome(behaviour: str, label: str) -> None:
    import asyncio

    from retrieval_service.app import RequestCounter
    from retrieval_service.batcher import SearchMetrics

    async def inner(scope: dict, receive, send) -> None:  # noqa: ANN001 - a minimal ASGI app
        if behaviour == "raise":
            raise RuntimeError("boom")
        if behaviour == "answer":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        return None

    metrics = SearchMetrics()
    counter = RequestCounter(inner, metrics)
    try:
        asyncio.run(counter({"type": "http", "path": "/retrieve"}, receive, send))
    except RuntimeError:
        assert behaviour == "raise"
    value = metrics.registry.get_sample_value("retrieval_requests_total", {"endpoint": "/retrieve", "status": label})
    assert value == 1.0


class RecordingRetriever:
    """Answers at once and records each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        self.batches.append(list(queries))
        time.sleep(0.05)
        return [[Hit({"id": q, "contents": q}, 1.0)] for q in queries]


def test_a_lone_request_skips_the_batching_wait_and_concurrent_ones_still_coalesce() -> None:
    async def scenario() -> tuple[float, list[list[str]]]:
        retriever = RecordingRetriever()
        batcher = MicroBatcher(retriever, SearchMetrics(), max_wait_ms=400.0, cache_size=0)  # type: ignore[arg-type]
        batcher.start()
        started = time.perf_counter()
        await batcher.search(["alone"], 1)
        alone_s = time.perf_counter() - started
        # Busy: a first request is being searched while three more arrive; those three ride in one batch.
        await asyncio.gather(*(batcher.search([f"q{i}"], 1) for i in range(4)))
        await batcher.stop()
        return alone_s, retriever.batches

    alone_s, batches = asyncio.run(scenario())
    assert alone_s < 0.3  # 0.05 s of search, not the 0.4 s wait
    assert batches[0] == ["alone"] and sorted(q for batch in batches[1:] for q in batch) == ["q0", "q1", "q2", "q3"]
    assert len(batches) <= 3
