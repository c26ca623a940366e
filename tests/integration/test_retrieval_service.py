"""The retrieval service for real: a synthetic world indexed by `research index`, served by uvicorn on 127.0.0.1.

One index and one server per module (the encoder loads once); every test talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qa.world import generate_world
from retrieval_service.app import BackgroundServer, create_app
from retrieval_service.cli import index_main, serve_main
from retrieval_service.client import RetrievalClient
from retrieval_service.config import EncoderConfig, RetrievalConfig, ServerConfig

pytestmark = pytest.mark.slow

NUM_PASSAGES = 500
LIMITS = ServerConfig(max_queries_per_request=16, max_query_chars=500, max_topk=20, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, num_passages=NUM_PASSAGES, num_dev=150)
    return out


@pytest.fixture(scope="module")
def index_dir(world: Path) -> Path:
    out = world / "index"
    argv = ["--corpus", str(world / "corpus.jsonl"), "--out", str(out), "--shard-size", "200", "--no-progress"]
    assert index_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def service(index_dir: Path) -> Iterator[BackgroundServer]:
    app = create_app(RetrievalConfig(index_dir=str(index_dir), server=LIMITS))
    server = BackgroundServer(app).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def dev_questions(world: Path, hops: int) -> list[dict]:
    with (world / "dev.jsonl").open() as handle:
        return [q for q in map(json.loads, handle) if q["metadata"]["hops"] == hops]


def test_health_and_both_apis_answer_the_same(service: BackgroundServer) -> None:
    health = httpx.get(service.url + "/health").json()
    assert health["status"] == "ready" and health["count"] == NUM_PASSAGES and health["dim"] == 384
    queries = ["On which river does Sirzedane lie?", ""]
    searchr1 = httpx.post(service.url + "/retrieve", json={"queries": queries, "topk": 3, "return_scores": True})
    assert searchr1.status_code == 200
    result = searchr1.json()["result"]
    assert len(result) == 2 and all(len(hits) == 3 for hits in result)  # the empty query gets passages too
    assert set(result[0][0]) == {"document", "score"} and set(result[0][0]["document"]) == {"id", "contents"}
    plain = httpx.post(service.url + "/retrieve", json={"queries": queries, "topk": 3}).json()["result"]
    assert plain == [[hit["document"] for hit in hits] for hits in result]

    research = httpx.post(service.url + "/batch_search", json={"query": queries, "top_n": 3, "return_score": True})
    documents, scores = research.json()
    assert documents == plain
    np.testing.assert_allclose(scores, [[hit["score"] for hit in hits] for hits in result], atol=1e-5)
    assert httpx.post(service.url + "/batch_search", json={"query": queries, "top_n": 3}).json() == plain
    single = httpx.post(service.url + "/search", json={"query": queries[0], "top_n": 3, "return_score": True}).json()
    assert single[0] == plain[0]
    np.testing.assert_allclose(single[1], scores[0], atol=1e-5)
    assert httpx.post(service.url + "/search", json={"query": queries[0], "top_n": 3}).json() == plain[0]
    # Neither project's client has to send top-k: the service default (5) applies.
    assert len(httpx.post(service.url + "/retrieve", json={"queries": ["x"]}).json()["result"][0]) == 5


def test_one_hop_recall_at_5(service: BackgroundServer, world: Path) -> None:
    questions = dev_questions(world, hops=1)
    assert len(questions) >= 40

    async def run() -> list[list[str]]:
        async with RetrievalClient([service.url], timeout=60) as client:
            # One request per question, all at once: what many rollout trajectories do.
            found = await asyncio.gather(*(client.search([q["question"]], 5) for q in questions))
        return [[p.id for p in hits[0]] for hits in found]

    top5 = asyncio.run(run())
    recall = sum(q["metadata"]["supporting_ids"][0] in ids for q, ids in zip(questions, top5, strict=True))
    assert recall / len(questions) >= 0.9, f"recall@5 {recall}/{len(questions)}"


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/retrieve", {"queries": ["q"] * 17}, 413, "at most 16"),
        ("/retrieve", {"queries": ["x" * 501]}, 422, "at most 500"),
        ("/retrieve", {"queries": ["q"], "topk": 21}, 422, "between 1 and 20"),
        ("/retrieve", {"queries": ["q"], "topk": -1}, 422, "between 1 and 20"),
        ("/retrieve", {"queries": "not a list"}, 422, "list"),
        ("/retrieve", {"topk": 3}, 422, "queries"),
        ("/batch_search", {"query": ["q"], "top_n": 10**30}, 422, ""),
        ("/search", {"query": ["a list"]}, 422, "string"),
        ("/retrieve", {"queries": ["y" * 400] * 60}, 413, "larger than the limit"),
    ],
)
def test_limits_answer_4xx_with_a_reason(service: BackgroundServer, path: str, body: dict, status: int, reason: str) -> None:
    response = httpx.post(service.url + path, json=body)
    assert response.status_code == status, response.text
    assert reason in response.text


def test_odd_but_valid_input_gets_results(service: BackgroundServer) -> None:
    for body in ({"queries": ["\ud800 lone surrogate", "\x00", "   "], "topk": 0}, {"queries": []}):
        response = httpx.post(service.url + "/retrieve", content=json.dumps(body), headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert len(response.json()["result"]) == len(body["queries"])
    malformed = httpx.post(service.url + "/retrieve", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 422


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
query_text = st.text(max_size=60) | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=3)
near_valid = st.fixed_dictionaries(
    {},
    optional={
        "queries": st.lists(query_text, max_size=20) | json_values,
        "query": query_text | st.lists(query_text, max_size=20) | json_values,
        "topk": st.integers(-(10**20), 10**20) | json_values,
        "top_n": st.integers(-5, 30) | json_values,
        "return_scores": json_values,
        "return_score": json_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(["/retrieve", "/batch_search", "/search", "/health", "/metrics", "/nope"]),
    body=near_valid | json_values | st.binary(max_size=200),
)
def test_fuzzed_requests_never_get_5xx(service: BackgroundServer, path: str, body: object) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(service.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code < 500, response.text


def test_service_still_healthy_after_fuzzing(service: BackgroundServer) -> None:
    assert httpx.get(service.url + "/health").status_code == 200


def metric(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M))


def test_concurrent_load_batches_and_caches(service: BackgroundServer, world: Path) -> None:
    before = httpx.get(service.url + "/metrics").text
    questions = [q["question"] for q in dev_questions(world, hops=2)][:60]

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as http:
            async def one(q: str) -> int:
                return (await http.post(service.url + "/retrieve", json={"queries": [q], "topk": 5})).status_code

            first = await asyncio.gather(*(one(q) for q in questions))
            again = await asyncio.gather(*(one(q) for q in questions))  # the cache answers these
            return [*first, *again]

    assert set(asyncio.run(run())) == {200}
    after = httpx.get(service.url + "/metrics").text
    forwards = metric(after, "retrieval_batch_size_count") - metric(before, "retrieval_batch_size_count")
    searched = metric(after, "retrieval_batch_size_sum") - metric(before, "retrieval_batch_size_sum")
    assert metric(after, "retrieval_cache_hits_total") - metric(before, "retrieval_cache_hits_total") >= 1
    assert forwards < searched, "concurrent queries should share encoder forwards"
    assert metric(after, 'retrieval_requests_total') > metric(before, 'retrieval_requests_total')


def test_bearer_token(service: BackgroundServer) -> None:
    retriever = service.app.state.retriever  # reuse the loaded index and encoder
    config = RetrievalConfig(server=ServerConfig(auth_token="s3cret"))
    guarded = BackgroundServer(create_app(config, retriever=retriever)).start()
    try:
        guarded.wait_ready()
        body = {"queries": ["q"]}
        assert httpx.post(guarded.url + "/retrieve", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(guarded.url + "/retrieve", json=body, headers=wrong).status_code == 401
        right = {"Authorization": "Bearer s3cret"}
        assert httpx.post(guarded.url + "/retrieve", json=body, headers=right).status_code == 200
        assert httpx.get(guarded.url + "/health").status_code == 200
    finally:
        guarded.stop()


def test_serving_with_another_encoder_is_a_clear_error(index_dir: Path, tmp_path: Path) -> None:
    assert serve_main(["--index", str(index_dir), "--encoder", "intfloat/e5-base-v2"]) == 2
    config = RetrievalConfig(index_dir=str(index_dir), encoder=EncoderConfig(name_or_path="intfloat/e5-base-v2"))
    server = BackgroundServer(create_app(config)).start()
    try:
        with pytest.raises(RuntimeError, match="built with encoder 'all-MiniLM-L6-v2'"):
            server.wait_ready(timeout=30)
        assert httpx.post(server.url + "/retrieve", json={"queries": ["q"]}).status_code == 503
    finally:
        server.stop()
