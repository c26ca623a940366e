"""The retrieval service for real: a synthetic world indexed by `research index`, served by uvicorn on 127.0.0.1.

One index and one server per module (the encoder loads once); every test talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


# Fairness, memory and HTTP limits: each test starts its own server on the module's loaded retriever.


@contextmanager
def server_with(service: BackgroundServer, **settings: object) -> Iterator[BackgroundServer]:
    """A second server on the already loaded index and encoder, with these ServerConfig settings."""
    app = create_app(RetrievalConfig(server=ServerConfig(**settings)), retriever=service.app.state.retriever)
    server = BackgroundServer(app).start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_big_request_does_not_hold_up_a_small_one(service: BackgroundServer) -> None:
    # A request at this server's limits: 32 queries of 400 characters, top-k 100. At most 800 characters per forward
    # splits it into 16 forwards; a one-query request sent meanwhile should ride in the next one.
    limits = {"max_queries_per_request": 32, "max_query_chars": 400, "max_topk": 100, "micro_batch_max_chars": 800}
    rng = np.random.default_rng(0)
    words = ["river", "city", "born", "capital", "lies", "mountain", "founded", "country", "lobbyist", "language"]
    big = [" ".join(rng.choice(words, 100))[:400] for _ in range(32)]

    async def run(url: str) -> tuple[float, float, float, float, str, str]:
        async with httpx.AsyncClient(timeout=120) as http:
            async def metrics() -> str:
                return (await http.get(url + "/metrics")).text

            async def timed(body: dict) -> tuple[httpx.Response, float]:
                response = await http.post(url + "/retrieve", json=body)
                return response, asyncio.get_running_loop().time()

            start = asyncio.get_running_loop().time()
            big_task = asyncio.create_task(timed({"queries": big, "topk": 100}))
            while metric(await metrics(), "retrieval_queries_total") < len(big):  # the big request is queued
                await asyncio.sleep(0.005)
            before_small = await metrics()
            sent = asyncio.get_running_loop().time()
            small, small_done = await timed({"queries": ["On which river does Sirzedane lie?"], "topk": 5})
            after_small = await metrics()
            big_response, big_done = await big_task
            assert small.status_code == big_response.status_code == 200
            assert len(big_response.json()["result"]) == 32 and len(small.json()["result"][0]) == 5
            return start, sent, small_done, big_done, before_small, after_small

    with server_with(service, **limits) as server:
        start, sent, small_done, big_done, before_small, after_small = asyncio.run(run(server.url))
        final = httpx.get(server.url + "/metrics").text
    assert small_done < big_done, "the small request waited for the whole big one"
    forwards = metric(final, "retrieval_batch_size_count")
    assert forwards >= 16 + 1, f"the big request was not split ({forwards:.0f} forwards)"
    # Forwards started while the small request waited: the next one, which carries it, and perhaps the one after it
    # (started before we read the metrics) and one that started before it was queued. First-come first-served: ~15.
    during = metric(after_small, "retrieval_batch_size_count") - metric(before_small, "retrieval_batch_size_count")
    assert during <= 3, f"{during:.0f} forwards ran while the small request waited"
    assert small_done - sent < (big_done - start) / 3


def test_cache_is_bounded_in_bytes_and_reports_its_size(service: BackgroundServer) -> None:
    with server_with(service, max_topk=100, cache_max_bytes=300_000) as server:
        sizes = []
        for i in range(8):  # each top-100 entry of this corpus is ~80 KB
            response = httpx.post(server.url + "/retrieve", json={"queries": [f"query number {i}"], "topk": 100})
            assert response.status_code == 200
            text = httpx.get(server.url + "/metrics").text
            sizes.append((metric(text, "retrieval_cache_bytes"), metric(text, "retrieval_cache_entries")))
    assert 0 < sizes[0][0] <= 300_000 and sizes[0][1] == 1
    assert all(size <= 300_000 for size, _ in sizes), sizes
    assert sizes[-1][1] < 8, "nothing was evicted"
    assert sizes[-1][0] >= sizes[-1][1] * 100 * 400  # at least each hit's fixed overhead is counted


def http_exchange(server: BackgroundServer, payload: bytes, timeout: float = 20.0) -> bytes:
    """Send raw bytes, then read until the server closes; whatever came back (b'' if it reset the connection)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything: what it answered is still readable
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too); times out otherwise."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def read_response(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection: its head, then Content-Length bytes of body."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, flags=re.I).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def request(path: str = "/health", headers: bytes = b"", body: bytes = b"", close: bool = True) -> bytes:
    """An HTTP/1.1 request as raw bytes."""
    head = f"{'POST' if body else 'GET'} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + headers + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


HEAD_LIMITS = {"max_header_bytes": 8192, "max_headers": 50}


@pytest.mark.parametrize(
    "headers",
    [b"X-Big: " + b"a" * 1_000_000 + b"\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))],
    ids=["1MB-header", "10000-headers"],
)
def test_oversized_heads_get_431_and_the_connection_closes(service: BackgroundServer, headers: bytes) -> None:
    with server_with(service, **HEAD_LIMITS) as server:
        answer = http_exchange(server, request(headers=headers))
        # The 431 may be lost to the reset that closing with unread input sends; a 200 would mean no limit at all.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert httpx.get(server.url + "/health").status_code == 200


def test_heads_and_bodies_within_the_limits_are_served(service: BackgroundServer) -> None:
    with server_with(service, **HEAD_LIMITS, max_body_bytes=100_000) as server:
        near_limit = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(45))  # ~5 KB in 45 + 3 fields
        assert http_exchange(server, request(headers=near_limit)).startswith(b"HTTP/1.1 200 ")
        # A body larger than the head limit, arriving with the head in one write, is not counted as head.
        body = json.dumps({"queries": ["q " * 1000] * 6, "topk": 1}).encode()
        assert len(body) > 8192
        assert http_exchange(server, request("/retrieve", body=body)).startswith(b"HTTP/1.1 200 ")
        # Two pipelined requests on one keep-alive connection, then a third: each gets its answer.
        answers = http_exchange(server, request(close=False) + request(close=False) + request())
        assert answers.count(b"HTTP/1.1 200 ") == 3


def trickle(server: BackgroundServer, head: bytes, payload: bytes, interval: float = 0.2) -> tuple[bytes, int]:
    """Send `head`, then `payload` one byte per `interval` until the server answers or closes: (answer, bytes sent)."""
    with socket.create_connection((server.host, server.port), timeout=interval) as sock:
        sock.sendall(head)
        for sent in range(len(payload)):
            try:
                sock.sendall(payload[sent : sent + 1])
                return sock.recv(65536), sent + 1  # an answer, or b"" once the server has closed
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return b"", sent
    raise AssertionError("the server waited for the whole trickled request")


def test_slow_loris_is_disconnected_after_the_read_timeout(service: BackgroundServer) -> None:
    with server_with(service, read_timeout_s=1.0) as server:
        # One header byte every 0.2 s: a timer reset by each byte would never fire; a deadline on the request does.
        answer, sent = trickle(server, b"", request(headers=b"X-Slow: " + b"z" * 200 + b"\r\n"))
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
        assert sent >= 4
        # A body that trickles in is cut off the same way.
        body = json.dumps({"queries": ["q" * 500]}).encode()
        answer, sent = trickle(server, request("/retrieve", body=body)[: -len(body)], body)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
        # A client that connects and sends nothing is closed the same way.
        with socket.create_connection((server.host, server.port), timeout=20) as sock:
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        assert httpx.get(server.url + "/health").status_code == 200


def test_connections_beyond_the_limit_get_503(service: BackgroundServer) -> None:
    with server_with(service, max_connections=3) as server:
        held = [socket.create_connection((server.host, server.port), timeout=20) for _ in range(3)]
        try:
            for sock in held:  # one answered request each: the server has accepted them all
                sock.sendall(request(close=False))
                assert read_response(sock).startswith(b"HTTP/1.1 200 ")
            with socket.create_connection((server.host, server.port), timeout=20) as extra:
                assert read_until_closed(extra).startswith(b"HTTP/1.1 503 ")
            held[0].sendall(request(close=False))  # the held connections are still served
            assert read_response(held[0]).startswith(b"HTTP/1.1 200 ")
        finally:
            for sock in held:
                sock.close()
        for _ in range(50):  # once the server has noticed the closes, new connections are served again
            if http_exchange(server, request()).startswith(b"HTTP/1.1 200 "):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("connections were refused after the others closed")
