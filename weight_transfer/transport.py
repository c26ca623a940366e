"""The weight group's transport: a TCPStore on the learner's node, a gloo or NCCL broadcast group over it, and a
deadline on every broadcast, so a member that dies mid-sync makes the others fail in bounded time instead of hang.

gloo (CPU) gives up by itself after its timeout; NCCL never does, so a broadcast's completion is polled on a CUDA
event until the deadline and the communicator is then aborted (vLLM's PyNcclCommunicator.destroy, ncclCommAbort),
which releases the kernel waiting on the dead peer. Either way the member raises WeightSyncTimeout and stays usable:
the driver rebuilds the group (every rebuild closes the old one) and syncs again.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

GROUP_PREFIX = "research/weights"


class WeightSyncTimeout(RuntimeError):
    """A broadcast of the weight group did not complete before its deadline (a member died or hangs)."""


def backend_for(device: torch.device) -> str:
    """The transport of a group whose sender holds its weights on `device`."""
    return "nccl" if device.type == "cuda" else "gloo"


class WeightGroup:
    """Broadcasts from rank 0 over gloo (host memory) or NCCL (device memory), each one bounded by `timeout_s`."""

    def __init__(self, store: Any, rank: int, world_size: int, host: str, backend: str, device: torch.device,
                 timeout_s: float) -> None:
        self.backend, self.device, self.timeout_s = backend, device, timeout_s
        self._gloo: Any = None
        self._nccl: Any = None
        prefixed = dist.PrefixStore(GROUP_PREFIX, store)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = datetime.timedelta(seconds=timeout_s)  # gloo's own deadline on every collective
            options._devices = [gloo_device(host)]
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
        """Start broadcasting `flat` from rank 0 (into `flat` on the other ranks); pass the result to `wait`."""
        if self._gloo is not None:
            options = dist.BroadcastOptions()
            options.rootRank = 0
            return self._gloo.broadcast([flat], options)
        if self._nccl is None:
            raise WeightSyncTimeout("the weight group was closed after a failed broadcast; it must be rebuilt")
        stream = torch.cuda.current_stream(self.device)
        self._nccl.broadcast(flat, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def wait(self, handle: Any) -> None:
        """Block until the broadcast `handle` completed; after `timeout_s` the group is closed and WeightSyncTimeout
        raised (the caller's peers see the same within their own deadline)."""
        if self._gloo is not None:
            try:
                handle.wait()
            except RuntimeError as error:  # gloo's timeout, or a peer's connection closed by its death
                self.close()
                raise WeightSyncTimeout(f"gloo broadcast failed: {error}") from error
            return
        wait_or_abort(handle.query, self.timeout_s, self.close)

    def close(self) -> None:
        """Leave the group: an NCCL communicator is aborted (freeing its device memory and any kernel still waiting
        on a peer); gloo's pairs close with the object."""
        if self._nccl is not None:
            self._nccl.destroy()
        self._nccl = self._gloo = None


def wait_or_abort(completed: Callable[[], bool], timeout_s: float, abort: Callable[[], None],
                  poll_s: float = 0.001) -> None:
    """Poll `completed` until it is true; past `timeout_s`, call `abort` and raise WeightSyncTimeout (the NCCL path,
    whose broadcast never gives up on a dead peer by itself)."""
    deadline = time.monotonic() + timeout_s
    while not completed():
        if time.monotonic() > deadline:
            abort()
            raise WeightSyncTimeout(f"a weight broadcast did not complete within {timeout_s:.0f} s "
                                    "(rollout.weight_sync_timeout_s); the communicator was aborted")
        time.sleep(poll_s)


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


def gloo_device(host: str) -> Any:
    """The gloo device: $GLOO_SOCKET_IFNAME's interface if set, else bound to `host`, the member's own node address
    (ProcessGroupGloo.create_device(hostname=...) binds that address), so gloo never listens on another network."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"])
    return dist.ProcessGroupGloo.create_device(hostname=host)

