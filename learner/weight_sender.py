"""Learner rank 0's side of the weight sync: serves the group's store, packs buckets and broadcasts them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from weight_transfer.transport import WeightGroup, backend_for, serve_store
from weight_transfer.wire import dtype_of, pack_bucket


class WeightSender:
    """Rank 0 of the weight group: serves the TCPStore on `host` (its node's address) only, packs and broadcasts."""

    def __init__(self, host: str, world_size: int, device: torch.device | str = "cpu", timeout_s: float = 300.0):
        self.host, self.world_size, self.timeout_s = host, world_size, timeout_s
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        self.store = serve_store(host, world_size, timeout_s)
        self.port = self.store.port
        self.group: WeightGroup | None = None
        self._buffers: dict[str, list[torch.Tensor]] = {}  # two per dtype, reused across syncs

    @property
    def address(self) -> tuple[str, int, str]:
        """(host, port, backend): what every receiver needs to join."""
        return self.host, self.port, self.backend

    def connect(self) -> None:
        """Join the group; blocks until every receiver joins (run it while the engines' join call is in flight)."""
        if self.group is not None:
            self.group.close()
        self.group = WeightGroup(self.store, 0, self.world_size, self.host, self.backend, self.device, self.timeout_s)

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
                self.group.wait(in_flight)
            in_flight = self.group.broadcast(flat)
            sent += flat.numel() * flat.element_size()
        if in_flight is not None:
            self.group.wait(in_flight)
        return {"seconds": time.perf_counter() - started, "bytes": float(sent),
                "buckets": float(len(manifest["buckets"]))}

    def _buffer(self, manifest: dict[str, Any], dtype: str, slot: int) -> torch.Tensor:
        largest = max(b[3] for b in manifest["buckets"] if b[2] == dtype)
        buffers = self._buffers.get(dtype)
        if buffers is None or buffers[0].numel() < largest:
            buffers = [torch.empty(largest, dtype=dtype_of(dtype), device=self.device) for _ in range(2)]
            self._buffers[dtype] = buffers
        return buffers[slot]

    def close(self) -> None:
        """Leave the group (an NCCL communicator is aborted, not just dropped) and stop serving the store."""
        if self.group is not None:
            self.group.close()
        self.group = None
        self.store = None
        self._buffers.clear()

