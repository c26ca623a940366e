"""Retrieval service replicas as Ray actors: each serves the FastAPI app on a fixed port and is restarted on death.

The port is chosen by the driver and fixed for the replica's lifetime, so a replica Ray restarts after a crash comes
back at the same URL; in the meantime the rollout client fails over to the other replicas.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import ray

from retrieval_service.config import RetrievalConfig
from retrieval_service.process import free_port


class RetrievalReplica:
    """One service replica: uvicorn in a background thread of this actor's process."""

    def __init__(self, config_json: str, host: str, port: int) -> None:
        import uvicorn

        from retrieval_service.app import create_app

        config = RetrievalConfig.model_validate_json(config_json)
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="retrieval-uvicorn", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 300.0) -> str:
        """Block until /health answers 200; returns the replica's URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"retrieval replica {self.url} not healthy after {timeout:.0f} s")

    def pid(self) -> int:
        """This replica's process id (tests kill it by PID)."""
        import os

        return os.getpid()


def start_replicas(config: RetrievalConfig, count: int, cpus_per_replica: float = 0.5,
                   host: str = "127.0.0.1") -> tuple[list[Any], list[str]]:
    """Start `count` replicas (restarted by Ray if they die) and wait until every one is healthy."""
    remote = ray.remote(num_cpus=cpus_per_replica, max_restarts=-1, max_task_retries=-1)(RetrievalReplica)
    config_json = config.model_dump_json()
    handles = [remote.remote(config_json, host, free_port(host)) for _ in range(count)]
    urls = ray.get([h.wait_ready.remote() for h in handles])
    return handles, list(urls)
