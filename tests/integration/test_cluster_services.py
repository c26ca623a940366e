"""What the job's services reserve and where they listen, on a real local Ray cluster: a local run stays on
loopback, a retrieval replica uses the CPUs and GPUs Ray gave it and no others, setup waits log and time out."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from cluster.retrieval_replicas import IndexDoesNotFit, start_replicas
from cluster.waiting import SetupTimeout, wait_logged
from retrieval_service.config import RetrievalConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

LOCAL_RUN = """
import json, ray
from cluster.train import connect_ray
from cluster.retrieval_replicas import start_replicas
from retrieval_service.config import RetrievalConfig
connect_ray(None, quiet=True)
handles, urls = start_replicas(RetrievalConfig(index_dir=INDEX, replica_cpus=0.5), 1)
print(json.dumps({"node": ray.util.get_node_ip_address(), "urls": urls}))
ray.shutdown()
"""


def test_a_local_run_listens_on_loopback_only(rollout_world: Path) -> None:
    """Finding 6: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset (as `make demo` runs), Ray would map 127.0.0.1 to the
    machine's routable address and the replica would bind it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=temp_dir)
    code = LOCAL_RUN.replace("INDEX", repr(str(rollout_world / "index")))
    try:
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = result.stdout.strip().splitlines()[-1]
    assert '"node": "127.0.0.1"' in answer and '"urls": ["http://127.0.0.1:' in answer, answer


def test_replica_takes_its_threads_and_no_gpu(rollout_world: Path, ray_cluster: None) -> None:
    """Finding 4: a replica reserving 2 CPUs searches with 2 torch and 2 faiss threads (Ray would set
    OMP_NUM_THREADS=1 for a fractional CPU), and one reserving no GPU hides every GPU from itself."""
    config = RetrievalConfig(index_dir=str(rollout_world / "index"), replica_cpus=2)
    handles, urls = start_replicas(config, 1)
    try:
        placement = ray.get(handles[0].placement.remote())
    finally:
        ray.kill(handles[0], no_restart=True)
    assert placement["torch_threads"] == 2 and placement["faiss_threads"] == 2, placement
    assert placement["gpu_ids"] == [] and placement["cuda_visible_devices"] == "", placement
    assert placement["encoder_device"] == "cpu" and placement["encoder_loaded_on"] == "cpu", placement
    assert urls[0].startswith("http://127.0.0.1:")


def test_an_index_no_node_can_hold_is_refused_before_scheduling(rollout_world: Path, tmp_path: Path,
                                                                 ray_cluster: None) -> None:
    """Finding 4: the replica reserves the memory its index needs; no node has 4 TiB, so the driver says so."""
    index = tmp_path / "huge"
    index.mkdir()
    for name in ("meta.json", "docs.jsonl", "docs.offsets.npy"):
        (index / name).symlink_to(rollout_world / "index" / name)
    with open(index / "index.faiss", "wb") as handle:
        handle.truncate(4 * 2**40)  # sparse: no disk used
    with pytest.raises(IndexDoesNotFit, match=r"needs 4096\.0 GiB .* largest eligible node offers Ray"):
        start_replicas(RetrievalConfig(index_dir=str(index)), 1)


@ray.remote(num_cpus=0)
def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_setup_waits_log_what_they_wait_for_and_time_out(ray_cluster: None,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Finding 7: the wait logs every log_every_s what is pending, and its timeout names the config key."""
    with caplog.at_level(logging.INFO, logger="research.setup"):
        assert wait_logged([_sleep.remote(1.5)], "the sleeper", 30, log_every_s=0.4) == [1.5]
    assert "waiting for the sleeper: 0 of 1 ready" in caplog.text
    with pytest.raises(SetupTimeout, match=r"1 of 1 the sleepers not ready after 1 s \(raise learner.setup_timeout_s"):
        wait_logged([_sleep.remote(30)], "the sleepers", 1, log_every_s=0.3, config_key="learner.setup_timeout_s")
