"""Retrieval replicas as Ray actors: a replica killed by PID is skipped by the client and restarted by Ray."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import ray

from cluster.retrieval_replicas import start_replicas
from retrieval_service.client import RetrievalClient
from retrieval_service.config import RetrievalConfig

pytestmark = pytest.mark.slow  # starts vLLM engines, servers or a Ray cluster


def test_dead_replica_is_skipped_then_restarted(rollout_world: Path, ray_cluster: None) -> None:
    config = RetrievalConfig(index_dir=str(rollout_world / "index"))
    handles, urls = start_replicas(config.model_copy(update={"replica_cpus": 0.5}), 2)
    try:
        # Each replica serves on its node's IP, which this loopback test cluster sets to 127.0.0.1.
        assert all(url.startswith(f"http://{ray.util.get_node_ip_address()}:") for url in urls)
        assert len(set(urls)) == 2
        victim_pid = ray.get(handles[0].pid.remote())
        os.kill(victim_pid, signal.SIGKILL)
        time.sleep(0.5)
        client = RetrievalClient(urls, timeout=5.0, retries=4, backoff=0.05)

        async def ask() -> list:
            try:
                return await client.search(["who founded the city"] * 4, topk=3)
            finally:
                await client.aclose()

        results = asyncio.run(ask())  # every query answered while replica 0 is down
        assert len(results) == 4 and all(len(passages) == 3 for passages in results)

        # Ray restarts the actor; it serves again at the same URL
        assert ray.get(handles[0].wait_ready.remote(), timeout=300) == urls[0]
        assert ray.get(handles[0].pid.remote()) != victim_pid
        assert httpx.get(f"{urls[0]}/health", timeout=5).status_code == 200
    finally:
        for handle in handles:
            ray.kill(handle, no_restart=True)
