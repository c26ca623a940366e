"""Retrieval service replicas as Ray actors: each serves the FastAPI app on a fixed port and is restarted on death.

Each replica binds the IP of the node Ray placed it on (rollout actors on other nodes must reach it; a loopback
address would only work on one machine). The port is chosen by the driver, so a replica Ray restarts on the same
node comes back at the same URL while that port is free (else on another port, and on another node at another IP:
clients keep failing over to the other replicas, the driver does not learn the new URL). Set
`retrieval.server.auth_token` when the cluster network is shared: replicas are reachable from every node.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from retrieval_service.config import RetrievalConfig
from retrieval_service.process import free_port


class RetrievalReplica:
    """One service replica: the service app on a BackgroundServer (uvicorn on a thread of this actor's process)."""

    def __init__(self, config_json: str, host: str | None, port: int) -> None:
        from retrieval_service.app import BackgroundServer, create_app

        config = RetrievalConfig.model_validate_json(config_json)
        host = host or ray.util.get_node_ip_address()
        port = free_port(host, preferred=port)  # the driver picked it on its own node
        self._server = BackgroundServer(create_app(config), host=host, port=port).start()
        self.url = self._server.url

    def wait_ready(self, timeout: float = 300.0) -> str:
        """Block until /health answers 200; returns the replica's URL."""
        self._server.wait_ready(timeout)
        return self.url

    def pid(self) -> int:
        """This replica's process id (tests kill it by PID)."""
        return os.getpid()


def start_replicas(config: RetrievalConfig, count: int, cpus_per_replica: float = 0.5,
                   host: str | None = None) -> tuple[list[Any], list[str]]:
    """Start `count` replicas (restarted by Ray if they die) and wait until every one is healthy; their URLs use
    each one's node IP unless `host` is given."""
    remote = ray.remote(num_cpus=cpus_per_replica, max_restarts=-1, max_task_retries=-1)(RetrievalReplica)
    config_json = config.model_dump_json()
    handles = [remote.remote(config_json, host, free_port()) for _ in range(count)]
    urls = ray.get([h.wait_ready.remote() for h in handles])
    return handles, list(urls)
