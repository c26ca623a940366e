"""Retrieval service replicas as Ray actors: each serves the FastAPI app on a fixed port and is restarted on death.

Placement and resources come from the config: each replica reserves `retrieval.replica_cpus` CPUs (torch and faiss
search with that many threads), `retrieval.replica_gpus` GPUs (faiss-gpu and the encoder use only those; with none,
the replica hides every GPU from itself, since Ray 2.60 leaves them visible to actors that reserve none), the host
memory its index needs (so Ray only places it on a node that has it), and `retrieval.resources`; on a multi-node
cluster replicas stay off the head node unless `retrieval.allow_head_node`.

Each replica binds the IP of the node Ray placed it on: 127.0.0.1 for a local run (cluster.train.connect_ray keeps a
local cluster on loopback), the node's address on a cluster. The port is chosen by the driver, so a replica Ray
restarts on the same node comes back at the same URL while that port is free. The bearer token is
`retrieval.server.auth_token`, else $RESEARCH_RETRIEVAL_TOKEN (the driver forwards its own to the replicas).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray

from retrieval_service.config import TOKEN_ENV, RetrievalConfig
from retrieval_service.index import INDEX_FILE
from retrieval_service.process import free_port

log = logging.getLogger(__name__)
HEAD_RESOURCE = "node:__internal_head__"
"""The resource Ray gives the head node only (ray.nodes()[i]["Resources"])."""


class IndexDoesNotFit(MemoryError):
    """The index needs more host memory than the node has."""


def index_memory_bytes(index_dir: str | Path) -> int:
    """Host memory a replica needs to load the index: faiss.read_index reads index.faiss whole into memory (Flat,
    HNSW and IVF-PQ alike; a GPU index is read on the host first). Passages stay on disk (pread)."""
    return (Path(index_dir) / INDEX_FILE).stat().st_size


def check_index_fits(index_dir: str | Path, available: int, where: str) -> None:
    """Raise IndexDoesNotFit naming both sizes when the index is larger than `available` bytes."""
    needed = index_memory_bytes(index_dir)
    if needed > available:
        raise IndexDoesNotFit(
            f"retrieval index {Path(index_dir) / INDEX_FILE} needs {needed / 2**30:.1f} GiB of host memory to load; "
            f"{where} has {available / 2**30:.1f} GiB available. Use a node with more memory (retrieval.resources), "
            "a smaller index (HNSW with fp16 storage, IVF-PQ), or faiss-gpu with fp16 (README, sizing table)"
        )


class RetrievalReplica:
    """One service replica: the service app on a BackgroundServer (uvicorn on a thread of this actor's process)."""

    def __init__(self, config_json: str, host: str | None, port: int) -> None:
        import psutil

        config = RetrievalConfig.model_validate_json(config_json)
        self.gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()]
        if not self.gpu_ids:
            # Before anything initialises CUDA: torch and faiss then see no GPU, whatever the node has.
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, int(cpus))
        encoder, server = config.encoder, config.server
        device = encoder.device
        if device == "auto":
            device = "cuda" if self.gpu_ids else "cpu"
        config = config.model_copy(update={
            "encoder": encoder.model_copy(update={"device": device, "cpu_threads": encoder.cpu_threads or self.threads}),
            "server": server.model_copy(update={"faiss_threads": server.faiss_threads or self.threads,
                                                "auth_token": server.auth_token or os.environ.get(TOKEN_ENV) or None}),
        })
        host = host or ray.util.get_node_ip_address()
        check_index_fits(config.index_dir, psutil.virtual_memory().available, f"node {host}")
        from retrieval_service.app import BackgroundServer, create_app

        self.config = config
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

    def placement(self) -> dict[str, Any]:
        """Where this replica runs and with what: node IP, Ray's GPU ids, CUDA_VISIBLE_DEVICES, thread counts."""
        import faiss
        import torch

        retriever = getattr(self._server.app.state, "retriever", None)
        return {
            "node_ip": ray.util.get_node_ip_address(), "url": self.url, "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "encoder_device": self.config.encoder.device,
            "encoder_loaded_on": str(retriever.encoder.device) if retriever is not None else None,
            "auth": self.config.server.auth_token is not None,
        }


def replica_options(config: RetrievalConfig, index_bytes: int, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The Ray options of a replica: CPUs, GPUs, memory for the index, extra resources, off the head node."""
    options: dict[str, Any] = {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus,
                               "memory": index_bytes, "max_restarts": -1, "max_task_retries": -1}
    if config.resources:
        options["resources"] = dict(config.resources)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    head = [node["NodeID"] for node in nodes if HEAD_RESOURCE in node["Resources"]]
    if len(nodes) > 1 and head and not config.allow_head_node:
        options["label_selector"] = {"ray.io/node-id": f"!{head[0]}"}  # any node but the head, restarts included
    fitting = [node for node in nodes if node["Resources"].get("memory", 0) >= index_bytes
               and not (head and node["NodeID"] == head[0] and "label_selector" in options)]
    if not fitting:
        largest = max((node["Resources"].get("memory", 0) for node in nodes), default=0)
        raise IndexDoesNotFit(
            f"retrieval index {config.index_dir} needs {index_bytes / 2**30:.1f} GiB of host memory; the largest "
            f"eligible node offers Ray {largest / 2**30:.1f} GiB (README, sizing table)")
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    return options


def start_replicas(config: RetrievalConfig, count: int, host: str | None = None, env_vars: dict[str, str] | None = None,
                   log_every_s: float = 30.0) -> tuple[list[Any], list[str]]:
    """Start `count` replicas (restarted by Ray if they die) and wait until every one is healthy; their URLs use
    each one's node IP unless `host` is given. `env_vars` go to the replicas' environment (the token)."""
    from cluster.waiting import wait_logged

    remote = ray.remote(**replica_options(config, index_memory_bytes(config.index_dir), env_vars))(RetrievalReplica)
    config_json = config.model_dump_json()
    handles = [remote.remote(config_json, host, free_port()) for _ in range(count)]
    try:
        urls = wait_logged([h.wait_ready.remote(config.setup_timeout_s) for h in handles],
                           f"retrieval replicas to load {config.index_dir}", config.setup_timeout_s, log_every_s,
                           "retrieval.setup_timeout_s")
    except BaseException:
        for handle in handles:
            ray.kill(handle, no_restart=True)
        raise
    return handles, list(urls)
