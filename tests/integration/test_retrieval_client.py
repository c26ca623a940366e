"""The async client against real servers on 127.0.0.1: one good replica, and replicas that are down, slow or broken."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from actors.prompts import format_passages
from qa.world import generate_world
from retrieval_service.app import BackgroundServer, create_app
from retrieval_service.build import build_index
from retrieval_service.client import RetrievalClient, RetrievalError
from retrieval_service.config import TOKEN_ENV, RetrievalConfig, ServerConfig
from retrieval_service.process import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = tmp_path_factory.mktemp("client_world")
    generate_world(world, seed=3, num_passages=60)
    corpus = world / "small.jsonl"
    with (world / "corpus.jsonl").open() as lines:
        corpus.write_text("".join(itertools.islice(lines, 30)))
    build_index(corpus, world / "index", progress=False)
    return world / "index"


@pytest.fixture(scope="module")
def good(index_dir: Path) -> Iterator[str]:
    server = BackgroundServer(create_app(RetrievalConfig(index_dir=str(index_dir)))).start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


class FaultyReplica:
    """A stand-in for a sick replica (the real service cannot be made to fail on demand): 500s or hangs."""

    def __init__(self, mode: str) -> None:
        self.hits = 0
        app = FastAPI()

        @app.post("/retrieve")
        async def retrieve() -> JSONResponse:
            self.hits += 1
            if mode == "slow":
                await asyncio.sleep(2)
            return JSONResponse(status_code=500, content={"detail": "index shard lost"})

        self.server = BackgroundServer(app).start()
        self.url = self.server.url


@pytest.fixture
def broken() -> Iterator[FaultyReplica]:
    replica = FaultyReplica("500")
    yield replica
    replica.server.stop()


@pytest.fixture
def slow() -> Iterator[FaultyReplica]:
    replica = FaultyReplica("slow")
    yield replica
    replica.server.stop()


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_search_and_result_block(good: str) -> None:
    async def run() -> list:
        async with RetrievalClient([good]) as client:
            return await client.search(["Who is the mayor?", ""], topk=3)

    found = asyncio.run(run())
    assert [len(hits) for hits in found] == [3, 3]
    passage = found[0][0]
    assert passage.title and passage.text and -1.0 <= passage.score <= 1.0
    block = format_passages(found[0])
    assert block.count("\n\n") == 2 and block.startswith(f'"{passage.title}"\n')


def test_failover_from_dead_and_broken_replicas_to_a_good_one(good: str, broken: FaultyReplica) -> None:
    async def run() -> list:
        async with RetrievalClient([down_url(), broken.url, good], retries=2, backoff=0.01, timeout=5) as client:
            return await client.search(["q"], topk=2)

    assert len(asyncio.run(run())[0]) == 2
    assert broken.hits == 1


def test_clear_error_after_retries(broken: FaultyReplica, slow: FaultyReplica) -> None:
    dead = down_url()

    async def run() -> None:
        async with RetrievalClient([dead, broken.url, slow.url], retries=5, backoff=0.01, timeout=0.5) as client:
            await client.search(["q"], topk=2)

    with pytest.raises(RetrievalError) as raised:
        asyncio.run(run())
    message = str(raised.value)
    assert "after 6 attempts" in message
    assert all(url in message for url in (dead, broken.url, slow.url))
    assert "Timeout" in message  # the last attempt went to the slow replica
    assert broken.hits == 2 and slow.hits == 2


def test_a_refused_request_is_not_retried(good: str, broken: FaultyReplica) -> None:
    async def run() -> None:
        async with RetrievalClient([good, broken.url], retries=3, backoff=0.01) as client:
            await client.search(["q"], topk=10_000)

    with pytest.raises(RetrievalError, match="refused the request \\(422\\)"):
        asyncio.run(run())
    assert broken.hits == 0


def test_client_needs_a_url() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RetrievalClient([])


def test_index_dir_missing_is_reported_by_health(tmp_path: Path) -> None:
    server = BackgroundServer(create_app(RetrievalConfig(index_dir=str(tmp_path)))).start()
    try:
        with pytest.raises(RuntimeError, match="not a finished index"):
            server.wait_ready(timeout=20)
    finally:
        server.stop()


def test_client_from_config_carries_the_token_from_the_environment(
    index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollout actors and the eval build their client from the job's retrieval config; the token must reach it."""
    server = BackgroundServer(create_app(RetrievalConfig(index_dir=str(index_dir),
                                                         server=ServerConfig(auth_token="s3cret")))).start()
    try:
        server.wait_ready()
        config = RetrievalConfig(urls=[server.url], retries=0)

        async def search() -> list:
            client = RetrievalClient.from_config(config)
            try:
                return await client.search(["Who is the mayor?"], topk=2)
            finally:
                await client.aclose()

        monkeypatch.delenv(TOKEN_ENV, raising=False)
        with pytest.raises(RetrievalError, match="401"):
            asyncio.run(search())
        monkeypatch.setenv(TOKEN_ENV, "s3cret")
        assert [len(hits) for hits in asyncio.run(search())] == [2]
    finally:
        server.stop()
