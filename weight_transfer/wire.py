"""The weight-transfer wire format shared by the learner (sender) and the rollout engines (receivers).


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

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

WIRE_FORMAT = 2
NamedTensors = Iterable[tuple[str, torch.Tensor]]


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


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight manifest")
    return dtype

