"""A real local Ray head on 127.0.0.1 for the whole-job tests, started once and stopped by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from retrieval_service.process import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# A loopback-only test cluster: Ray 2.60's token authentication is turned off so that `ray job submit` and the
# drivers need no token file (a real cluster keeps it on and users pass their token).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`ray start --head --block` on loopback with a dashboard (for `ray job submit`); yields the addresses."""
    temp_dir = Path("/tmp") / f"ray-e2e-{os.getpid()}"  # short: Ray's socket paths must stay under 108 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    env = {**os.environ, **RAY_ENV}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "6",
         "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{dashboard}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
        pytest.fail("local Ray head did not come up")
    yield {"gcs": f"127.0.0.1:{gcs_port}", "dashboard": dashboard}
    # SIGTERM to the group we created: `ray start --block` stops the processes it started; then make sure.
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def job_env(ray_head: dict[str, str]) -> dict[str, str]:
    """Environment for a driver process attached to the test head."""
    return {**os.environ, **RAY_ENV, "RAY_ADDRESS": ray_head["gcs"], "PYTHONPATH": str(REPO)}
