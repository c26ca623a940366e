"""A multi-node Ray cluster on one machine: a head plus worker nodes on 127.0.0.2, 127.0.0.3 ... (docs/cpu-stack.md #6).

Each worker node advertises one custom resource, so config placement (`learner.resources`, `rollout.resources`,
`retrieval.resources`) decides which node an actor lands on, and each node has its own IP: a server that listens on
another node's address, or on a hard-coded loopback address, is refused just as between real hosts. Ray maps a head
asked for on 127.0.0.1 to the machine's routable address (ray._private.services.resolve_ip_for_localhost, because
multi-node clusters need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1); nothing of the job runs there but the driver.
Every process is started with `--block` in a session of its own and stopped by its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from retrieval_service.process import free_port
from tests.e2e.conftest import BIN

CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass
class LocalCluster:
    """The running cluster: its GCS address and the worker nodes' IPs by resource name."""

    gcs: str
    temp_dir: Path
    nodes: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every `ray start --block` process group we created, SIGKILL them after `grace_s` (a node would
        otherwise drain for 30 s), then any process of this cluster's session left (they name its temp dir)."""
        import psutil

        for process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
        for leftover in psutil.process_iter(["pid", "cmdline"]):
            if any(str(self.temp_dir) in part for part in leftover.info["cmdline"] or []):
                leftover.kill()
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _ray_start(args: list[str], env: dict[str, str], log: Path, timeout: float) -> subprocess.Popen:
    """One `ray start --block`, returned once its node is up (it prints that it blocks); one node at a time, since
    raylets that start together on two busy cores time out registering with the GCS."""
    with open(log, "ab") as out:
        process = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while "block forever" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            _signal_group(process, signal.SIGKILL)
            raise RuntimeError(f"`ray start {' '.join(args)}` did not come up; see {log}")
        time.sleep(0.5)
    return process


def start_cluster(workers: dict[str, tuple[str, float]], head_cpus: float = 1, env: dict[str, str] | None = None,
                  timeout: float = 180) -> LocalCluster:
    """Head on 127.0.0.1 plus one worker node per entry {resource: (ip, cpus)}; returns once all are up."""
    temp_dir = Path("/tmp") / f"ray-mn-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), **CLUSTER_ENV}
    port = free_port()
    cluster = LocalCluster(gcs=f"127.0.0.1:{port}", temp_dir=temp_dir)
    try:
        cluster.processes.append(_ray_start(
            ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(head_cpus),
             "--num-gpus", "0", "--include-dashboard", "false", "--temp-dir", str(temp_dir)], env,
            temp_dir / "head.log", timeout))
        for resource, (ip, cpus) in workers.items():
            cluster.processes.append(_ray_start(
                ["--address", cluster.gcs, "--node-ip-address", ip, "--num-cpus", str(cpus), "--num-gpus", "0",
                 "--resources", json.dumps({resource: 100})], env, temp_dir / f"{ip}.log", timeout))
            cluster.nodes[resource] = ip
    except BaseException:
        cluster.stop()
        raise
    return cluster
