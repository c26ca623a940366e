"""The weight group's deadline: a broadcast whose peer never comes fails in bounded time on both transports' path,
closes the group, and a new group on a fresh store works (what the driver's rebuild does)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from learner.weight_sender import WeightSender
from weight_transfer.transport import WeightGroup, WeightSyncTimeout, wait_or_abort
from weight_transfer.wire import bucket_tensors, make_manifest


def join(port: int, world_size: int, rank: int, timeout_s: float) -> WeightGroup:
    """A receiver member of the weight group served on 127.0.0.1:port."""
    store = torch.distributed.TCPStore("127.0.0.1", port, world_size, is_master=False)
    return WeightGroup(store, rank, world_size, "127.0.0.1", "gloo", torch.device("cpu"), timeout_s)


def test_gloo_broadcast_whose_sender_stalls_times_out_and_closes_the_group() -> None:
    sender = WeightSender("127.0.0.1", world_size=2, timeout_s=2)
    groups: list[WeightGroup] = []
    joiner = threading.Thread(target=lambda: groups.append(join(sender.port, 2, 1, 2)))
    joiner.start()
    sender.connect()
    joiner.join(30)
    receiver = groups[0]
    started = time.monotonic()
    with pytest.raises(WeightSyncTimeout):  # the learner died mid-sync: nothing ever arrives
        receiver.wait(receiver.broadcast(torch.empty(16)))
    assert time.monotonic() - started < 30
    with pytest.raises(WeightSyncTimeout, match="rebuilt"):  # a closed group refuses work instead of hanging
        receiver.broadcast(torch.empty(16))
    sender.close()


def test_a_rebuilt_group_moves_weights_after_a_failed_one() -> None:
    named = [("w", torch.arange(12, dtype=torch.float32).reshape(3, 4))]
    manifest = make_manifest(named, 1, bucket_mb=1, backend="gloo")
    for attempt in range(2):
        sender = WeightSender("127.0.0.1", world_size=2, timeout_s=2)
        groups: list[WeightGroup] = []
        joiner = threading.Thread(target=lambda s=sender, g=groups: g.append(join(s.port, 2, 1, 2)))
        joiner.start()
        sender.connect()
        joiner.join(30)
        if attempt == 0:  # the receiver dies before the sync: the sender's broadcast fails within its deadline
            groups[0].close()
            with pytest.raises(WeightSyncTimeout):
                sender.send(manifest, bucket_tensors(manifest, [t for _, t in named]))
            sender.close()
            continue
        flat = torch.empty(12)
        received = threading.Thread(target=lambda g=groups[0], f=flat: g.wait(g.broadcast(f)))
        received.start()
        sender.send(manifest, bucket_tensors(manifest, [t for _, t in named]))
        received.join(30)
        sender.close()
        assert torch.equal(flat, named[0][1].reshape(-1))


def test_wait_or_abort_aborts_a_broadcast_that_never_completes() -> None:
    """The NCCL path's rule (its broadcast never gives up by itself): poll, and past the deadline abort and raise."""
    aborted = []
    with pytest.raises(WeightSyncTimeout, match="weight_sync_timeout_s"):
        wait_or_abort(lambda: False, 0.05, lambda: aborted.append(True))
    assert aborted == [True]
    calls = iter([False, False, True])
    wait_or_abort(lambda: next(calls), 5.0, lambda: aborted.append("no"))
    assert aborted == [True]
