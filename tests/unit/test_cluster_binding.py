"""Cluster plumbing without a cluster: which address servers bind, collective devices, run_dir checks, checkpoint
retention, index sizing, and the config that places actors."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from cluster.config import ConfigError, load_config
from cluster.retrieval_replicas import IndexDoesNotFit, check_index_fits
from cluster.storage import MARKER, RunDirError, check_marker, check_run_dir_setting, write_marker
from learner.checkpoint import DRIVER_STATE, prune_checkpoints
from learner.distributed import collective_device, device_for_backend, interface_of
from learner.weight_sender import WeightSender
from weight_transfer.transport import serve_store

NODE_IP = "127.0.0.2"  # a loopback alias: on Linux the whole of 127/8 is local


def refused(host: str, port: int) -> bool:
    """Whether a TCP connect to host:port is refused."""
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) != 0


def test_collective_device_is_cuda_only_for_nccl() -> None:
    assert device_for_backend("nccl", cuda_index=0) == torch.device("cuda", 0)
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend(None) == torch.device("cpu")
    if dist.is_initialized():  # an earlier test in this process left its (gloo) default group up
        assert dist.get_backend() == "gloo" and collective_device() == torch.device("cpu")
        return
    store = serve_store("127.0.0.1", 1, 30)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        assert collective_device() == torch.device("cpu")  # a real gloo default group
    finally:
        dist.destroy_process_group()


def test_weight_group_store_listens_on_the_node_address_only() -> None:
    """Finding 2: torch's TCPStore master listens on every interface unless handed a bound socket."""
    sender = WeightSender(NODE_IP, world_size=1, timeout_s=10)
    try:
        port = sender.address[1]
        listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert [address.ip for address in listening] == [NODE_IP]
        assert refused("127.0.0.1", port)  # a client using the wrong address is refused, as between hosts
        client = dist.TCPStore(NODE_IP, port, 1, is_master=False, timeout=datetime.timedelta(seconds=10))
        client.set("k", "v")
        assert sender.store.get("k") == b"v"
    finally:
        sender.close()


def test_interface_of_a_node_address() -> None:
    assert interface_of("127.0.0.1") == interface_of(NODE_IP)  # loopback aliases live on the loopback interface
    with pytest.raises(ValueError, match="192.0.2.254"):
        interface_of("192.0.2.254")


def test_run_dir_marker(tmp_path: Path) -> None:
    token = write_marker(tmp_path)
    check_marker(tmp_path, token)
    with pytest.raises(RunDirError, match=str(tmp_path / "elsewhere")):
        check_marker(tmp_path / "elsewhere", token)
    (tmp_path / MARKER).write_text("another job")
    with pytest.raises(RunDirError, match="another job's marker"):
        check_marker(tmp_path, token)


def test_run_dir_must_be_absolute_on_a_multi_node_cluster() -> None:
    check_run_dir_setting(None, 1)
    check_run_dir_setting("runs/x", 1)
    check_run_dir_setting("/shared/runs/x", 3)
    for run_dir in (None, "runs/x"):
        with pytest.raises(RunDirError, match="3-node cluster"):
            check_run_dir_setting(run_dir, 3)
    assert load_config("test-tiny").resolved_run_dir().is_absolute()


def test_keep_checkpoints_prunes_the_oldest(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        (tmp_path / f"step{step}").mkdir()
        (tmp_path / f"step{step}" / DRIVER_STATE).write_text(json.dumps({"step": step}))
    (tmp_path / "step1").mkdir()  # an incomplete checkpoint older than every kept one
    (tmp_path / "step10").mkdir()  # a checkpoint being written: newer, incomplete, kept
    (tmp_path / "latest").write_text("step8")
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert sorted(d.name for d in deleted) == ["step1", "step2", "step4"]
    assert sorted(d.name for d in tmp_path.iterdir() if d.is_dir()) == ["step10", "step6", "step8"]


def test_an_index_larger_than_memory_fails_naming_both_sizes(tmp_path: Path) -> None:
    with open(tmp_path / "index.faiss", "wb") as handle:
        handle.truncate(64 * 2**30)  # sparse: 64 GiB as the index reports it, nothing on disk
    with pytest.raises(IndexDoesNotFit, match=r"needs 64\.0 GiB .* node n1 has 16\.0 GiB available"):
        check_index_fits(tmp_path, 16 * 2**30, "node n1")
    check_index_fits(tmp_path, 65 * 2**30, "node n1")


def test_gpu_retrieval_must_reserve_gpus() -> None:
    with pytest.raises(ConfigError, match="replica_gpus"):
        load_config("test-tiny", ["retrieval.server.faiss_gpu=true"])
    with pytest.raises(ConfigError, match="replica_gpus"):
        load_config("test-tiny", ["retrieval.encoder.device=cuda"])
    config = load_config("test-tiny", ["retrieval.server.faiss_gpu=true", "retrieval.replica_gpus=2"])
    assert config.retrieval.replica_gpus == 2


def test_placement_and_setup_waits_come_from_config() -> None:
    config = load_config("test-tiny", ["learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}",
                                       "retrieval.resources={retrieval_node: 1}", "learner.setup_timeout_s=60",
                                       "rollout.setup_timeout_s=70", "retrieval.setup_timeout_s=80",
                                       "trainer.wait_log_every_s=5"])
    assert config.learner.resources == {"learner_node": 1}
    assert config.rollout.resources == {"rollout_node": 1}
    assert config.retrieval.resources == {"retrieval_node": 1}
    assert (config.learner.setup_timeout_s, config.rollout.setup_timeout_s, config.retrieval.setup_timeout_s) == (
        60, 70, 80)
    assert config.trainer.wait_log_every_s == 5
