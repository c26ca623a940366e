"""Learner side of the weight sync: rank 0 packs parameters into flat buckets and broadcasts them to the engines.

The wire format (standalone gloo group, manifest, buckets) is defined in actors/weight_sync.py; this module only
produces it. Under ZeRO-3 the parameters of one bucket are gathered together (a collective every learner rank joins),
copied into the flat bucket on rank 0 and released, so rank 0 never holds more than the bucket being packed and the
one still on the wire: never a second full copy of the model. The next bucket is packed while the previous one is
being broadcast.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from actors.weight_sync import WeightSender, make_manifest
from learner.engine import LearnerEngine


def parameter_specs(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, meta tensor of the full shape and dtype) of every parameter; ZeRO-3 placeholders report ds_shape."""
    specs = []
    for name, parameter in module.named_parameters():
        shape = getattr(parameter, "ds_shape", parameter.shape)
        specs.append((name, torch.empty(shape, dtype=parameter.dtype, device="meta")))
    return specs


class WeightBroadcaster:
    """Built on every learner rank; rank 0 serves the weight group (TCPStore) and sends, the others help gather."""

    def __init__(self, learner: LearnerEngine, bucket_mb: float, host: str = "127.0.0.1", timeout_s: float = 300.0):
        self.learner = learner
        self.bucket_mb = bucket_mb
        self.host = host
        self.timeout_s = timeout_s
        self.sender: WeightSender | None = None
        # Two reusable bucket buffers per dtype (one packing, one on the wire): no fresh allocation per sync.
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def open(self, world_size: int) -> tuple[str, int]:
        """Rank 0: start the TCPStore for `world_size` members (learner + every engine worker); returns its address."""
        self.sender = WeightSender(self.host, 0, world_size, self.bucket_mb, self.timeout_s)
        return self.host, self.sender.port

    def connect(self) -> None:
        """Rank 0: join the group; blocks until every engine worker has joined too."""
        if self.sender is None:
            raise RuntimeError("open() must run before connect()")
        self.sender.connect()

    def manifest(self, policy_version: int) -> dict[str, Any]:
        """The control message of one sync: names, dtypes, shapes and bucket boundaries of every parameter."""
        return make_manifest(parameter_specs(self.learner.module), policy_version, self.bucket_mb)

    def broadcast(self, manifest: dict[str, Any]) -> dict[str, float]:
        """Send every bucket of `manifest` (collective over learner ranks under ZeRO-3); returns rank 0's timing."""
        started = time.perf_counter()
        sender = self.sender if self.learner.rank == 0 else None
        if self.learner.rank == 0 and (sender is None or sender.group is None):
            raise RuntimeError("the weight group is not connected: open() and connect() first")
        parameters = [parameter for _, parameter in self.learner.module.named_parameters()]
        if len(parameters) != len(manifest["tensors"]):
            raise ValueError(f"{len(parameters)} parameters for a manifest of {len(manifest['tensors'])} tensors")
        zero3 = self.learner.config.zero_stage == 3
        if not zero3 and sender is None:
            return {"seconds": 0.0, "bytes": 0.0, "buckets": 0.0}
        in_flight = None
        sent = 0
        for index, (start, end, dtype, numel) in enumerate(manifest["buckets"]):
            with self._gathered(parameters[start:end], zero3):
                if sender is None:
                    continue
                flat = self._buffer(dtype, numel, manifest, index % 2)
                # Slot index % 2: bucket index - 2 used it and finished before bucket index - 1 was sent.
                offset = 0
                with torch.no_grad():
                    for parameter in parameters[start:end]:
                        count = parameter.data.numel()
                        flat[offset : offset + count].copy_(parameter.data.reshape(-1))
                        offset += count
            if offset != numel:
                raise ValueError(f"bucket {start}:{end} holds {offset} elements, manifest says {numel}")
            if in_flight is not None:
                in_flight.wait()
            in_flight = self._start_broadcast(sender, flat)
            sent += flat.numel() * flat.element_size()
        if in_flight is not None:
            in_flight.wait()
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": float(sent), "buckets": float(len(manifest["buckets"]))}

    def _buffer(self, dtype: str, numel: int, manifest: dict[str, Any], slot: int) -> torch.Tensor:
        """A view of `numel` elements of reusable buffer `slot` for `dtype`, sized to the manifest's largest bucket."""
        largest = max(b[3] for b in manifest["buckets"] if b[2] == dtype)
        buffers = self._buffers.get(dtype)
        if buffers is None or buffers[0].numel() < largest:
            buffers = [torch.empty(largest, dtype=getattr(torch, dtype)) for _ in range(2)]
            self._buffers[dtype] = buffers
        return buffers[slot][:numel]

    @staticmethod
    def _gathered(parameters: list[torch.nn.Parameter], zero3: bool) -> contextlib.AbstractContextManager:
        """The full parameters of one bucket under ZeRO-3 (released on exit); a no-op at other stages."""
        if not zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)

    @staticmethod
    def _start_broadcast(sender: WeightSender, flat: torch.Tensor) -> Any:
        """Launch the broadcast of one bucket from rank 0 of the weight group; returns the work handle."""
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        return sender.group.broadcast([flat], options)

    def close(self) -> None:
        """Leave the weight group."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None
