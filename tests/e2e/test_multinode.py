"""The training job on a multi-node Ray cluster on one machine (tests/e2e/multinode.py): learner ranks, rollout
actors and the retrieval replica on three different worker nodes, each node on its own IP, authentication on.

The policy is the tiny test policy scripted to think, search and answer (tests/scripted_policy.py), so every
trajectory calls the retrieval service through its bearer token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.metrics import read_metrics
from tests.e2e.conftest import REPO
from tests.e2e.multinode import CLUSTER_ENV, LocalCluster, start_cluster
from tests.e2e.test_train_job import trained, wait, wait_for

pytestmark = pytest.mark.slow
TOKEN = "multinode-test-token"
WORKERS = {"learner_node": ("127.0.0.2", 2), "rollout_node": ("127.0.0.3", 2), "retrieval_node": ("127.0.0.4", 1)}
PLACEMENT = ("learner.world_size=2", "learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}",
             "retrieval.resources={retrieval_node: 1}", "retrieval.replica_cpus=1", "learner.grpo.kl_coef=0.001")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Head + learner, rollout and retrieval worker nodes (127.0.0.2-4); the token is NOT in their environment."""
    env = {key: value for key, value in os.environ.items() if key != "RESEARCH_RETRIEVAL_TOKEN"}
    started = start_cluster(WORKERS, env={**env, "PYTHONPATH": str(REPO)})
    yield started
    started.stop()


@pytest.fixture(scope="module")
def searching_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy scripted to think, search once and answer, saved with its tokenizer."""
    from transformers import AutoTokenizer

    from cluster.models import tiny_policy_dir
    from tests.integration.test_rollout_search import search_then_answer
    from tests.scripted_policy import scripted_policy

    base = tiny_policy_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    out = tmp_path_factory.mktemp("searching-policy")
    scripted_policy(base, search_then_answer(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def driver(cluster: LocalCluster, run_dir: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    """`python -m cluster.train test-tiny` attached to the cluster, with the token in its environment only."""
    command = [sys.executable, "-m", "cluster.train", "configs/test-tiny.yaml", f"run_dir={run_dir}", *overrides]
    if resume:
        command.append("--resume")
    env = {**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": cluster.gcs, "PYTHONPATH": str(REPO),
           "RESEARCH_RETRIEVAL_TOKEN": TOKEN}
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def checkpoint_step(run_dir: Path) -> int:
    """The driver step of the newest complete checkpoint (0 when there is none)."""
    root = run_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        return 0
    state = root / latest.read_text().strip() / "driver_state.json"
    return int(json.loads(state.read_text())["data_position"]["step"]) if state.is_file() else 0


def check_run(run_dir: Path, prompts: int, steps: list[dict], epochs: int = 1) -> None:
    """Every prompt of every epoch trained exactly once, each epoch ending with its partial batch of prompts % 4,
    every trajectory searched with no retrieval error."""
    trained_prompts = sorted(tuple(p) for s in steps for p in s["prompts"])
    assert trained_prompts == [(e, i) for e in range(epochs) for i in range(prompts)]
    for epoch in range(epochs):
        batches = [s["prompts"] for s in steps if s["prompts"][0][0] == epoch]
        assert all(p[0] == epoch for batch in batches for p in batch)  # a batch never straddles two epochs
        assert [len(b) for b in batches] == [4] * (prompts // 4) + [prompts % 4]  # the partial batch is trained
    records = [r for r in read_metrics(run_dir) if "rollout/retrieval_errors" in r]
    assert records and all(r["rollout/retrieval_errors"] == 0 for r in records)
    assert all(r["rollout/searches"] >= 1 for r in records)  # every trajectory called the service


def listener_names(ip: str) -> set[str]:
    """Names of the processes with a TCP socket listening on `ip` (the test runs as the owner of every process)."""
    import psutil

    names = set()
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.ip == ip and connection.pid:
            try:
                names.add(psutil.Process(connection.pid).name())
            except psutil.NoSuchProcess:
                continue
    return names


def service_url(run_dir: Path) -> str:
    """The replica URL the driver logged."""
    log = (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
    return log.split("retrieval service at ", 1)[1].split()[0].rstrip(",")


def test_zero3_scale_actor_death_kill_and_resume_lose_nothing(cluster: LocalCluster, searching_policy: Path,
                                                              tmp_path: Path) -> None:
    """2 ZeRO-3 ranks on the learner node, rollout actors on the rollout node, the replica on the retrieval node, auth
    on throughout: 2 epochs of 11 prompts in batches of 4 (each epoch's last batch is 3 prompts = 9 rows, padded for
    2 ranks x 2 mini-batches). Mid-run the actors are scaled 1 -> 2, the new one is killed by PID (replaced, its
    prompts requeued) and they are scaled back to 1; then the driver is killed after a checkpoint and resumed. Every
    prompt of every epoch is trained exactly once and one checkpoint is kept. (One run for all of it: each driver
    start builds learner ranks, engines and the replica, the bulk of the test's time.)"""
    run_dir = tmp_path / "zero3"
    run_dir.mkdir()
    common = (*PLACEMENT, f"policy.name_or_path={searching_policy}", "learner.zero_stage=3", "rollout.num_actors=1",
              "rollout.group_size=3", "learner.mini_batches=2", "data.max_train_questions=11",
              "trainer.batch_size=4", "trainer.drop_last=false", "trainer.max_steps=null", "trainer.epochs=2",
              "trainer.save_every=1", "trainer.keep_checkpoints=1", "trainer.val_every=0", "data.val_size=0",
              "trainer.wait_log_every_s=5")
    process = driver(cluster, run_dir, *common)
    try:
        wait_for(lambda: len(trained(run_dir)) >= 1 and process.poll() is None, timeout=600)
        url = service_url(run_dir)
        # The replica answers only with the token, which reached it although its node's environment lacks it.
        assert httpx.post(f"{url}/retrieve", json={"queries": ["x"], "topk": 1}, timeout=10).status_code == 401
        authorized = httpx.post(f"{url}/retrieve", json={"queries": ["x"], "topk": 1}, timeout=10,
                                headers={"Authorization": f"Bearer {TOKEN}"})
        assert authorized.status_code == 200
        # The engines' gloo devices of the weight group listen on the rollout node's address, the learner's store
        # and devices on the learner node's.
        assert any(name.startswith("VLLM") for name in listener_names(WORKERS["rollout_node"][0])), listener_names(
            WORKERS["rollout_node"][0])
        learner_node = listener_names(WORKERS["learner_node"][0])
        assert any(name.startswith("ray::Learner") for name in learner_node), learner_node  # ray::Learner.<method>

        subprocess.run([sys.executable, "-m", "cluster.cli", "scale", str(run_dir), "2"], check=True)
        wait_for(lambda: (run_dir / "actors.json").is_file()
                 and len(json.loads((run_dir / "actors.json").read_text())["rollout_pids"]) == 2, timeout=400)
        pids = json.loads((run_dir / "actors.json").read_text())["rollout_pids"]
        os.kill(pids[-1], signal.SIGKILL)  # an actor dies mid-run; it is replaced and its prompts requeued
        wait_for(lambda: len(trained(run_dir)) >= 3, timeout=400)
        subprocess.run([sys.executable, "-m", "cluster.cli", "scale", str(run_dir), "1"], check=True)
        wait_for(lambda: checkpoint_step(run_dir) >= 4 and process.poll() is None, timeout=400, every=0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    log = (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
    assert url.startswith(f"http://{WORKERS['retrieval_node'][0]}:"), url
    assert "waiting for learner ranks" in log  # setup waits say what they wait for
    assert "learner ranks on 127.0.0.2, 127.0.0.2 read run_dir" in log
    assert "died with" in log and "starting a replacement" in log
    assert 2.0 in [r["rollout/actors"] for r in read_metrics(run_dir) if "rollout/actors" in r]
    first = trained(run_dir)
    resumed_from = checkpoint_step(run_dir)
    (run_dir / "trained.jsonl").rename(run_dir / "trained-first.jsonl")
    wait(driver(cluster, run_dir, *common, resume=True), run_dir, timeout=900)
    second = trained(run_dir)
    assert second[0]["step"] == resumed_from + 1
    check_run(run_dir, 11, [s for s in first if s["step"] <= resumed_from] + second, epochs=2)
    kept = [d.name for d in (run_dir / "checkpoints").iterdir() if d.is_dir()]
    assert len(kept) == 1, kept  # trainer.keep_checkpoints


def test_run_dir_and_replica_placement_defaults(cluster: LocalCluster) -> None:
    """On a multi-node cluster an unset run_dir is one line and exit 2 before anything starts; a replica without
    placement resources runs anywhere but the head node."""
    env = {**os.environ, **CLUSTER_ENV, "RAY_ADDRESS": cluster.gcs, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "cluster.train", "test-tiny"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["research train: error: run_dir=(unset): on a 4-node cluster run_dir must be an absolute path "
                      "on storage every node mounts (learner ranks write checkpoints there)"], result.stderr[-2000:]

    import ray

    from cluster.config import load_config
    from cluster.job_setup import ensure_index
    from cluster.retrieval_replicas import HEAD_RESOURCE, start_replicas

    config = load_config("test-tiny").retrieval
    index = ensure_index(load_config("test-tiny"))
    ray.init(address=cluster.gcs, log_to_driver=False)
    try:
        head = next(n["NodeManagerAddress"] for n in ray.nodes() if HEAD_RESOURCE in n["Resources"])
        handles, urls = start_replicas(config.model_copy(update={"index_dir": str(index), "replica_cpus": 1}), 1)
        placement = ray.get(handles[0].placement.remote())
        ray.kill(handles[0], no_restart=True)
    finally:
        ray.shutdown()
    assert placement["node_ip"] != head and placement["node_ip"] in WORKERS_IPS, placement
    assert urls[0].startswith(f"http://{placement['node_ip']}:")


WORKERS_IPS = [ip for ip, _ in WORKERS.values()]
