"""Run the retrieval service as a child process on 127.0.0.1 and stop it again (demo, tests, local jobs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1", preferred: int = 0) -> int:
    """A TCP port that is free on host right now: `preferred` when it is, else any."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError(f"no free TCP port on {host}")


def wait_healthy(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll url/health until it answers 200; raise RuntimeError with the last answer if the server reports an error,
    stops running (`alive` turns false) or the timeout passes."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if not alive():
            last = "the server stopped"
            break
        try:
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
            if response.json().get("status") == "error":
                break
        except httpx.HTTPError as error:
            last = str(error)
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready: {last}")


class ServiceProcess:
    """`research serve` in a child process; a context manager that waits for /health and stops the child by PID."""

    def __init__(
        self,
        index_dir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the service."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        """Start the child and block until /health answers 200 (or raise with the child's log)."""
        command = [sys.executable, "-m", "cluster.cli", "serve", "--index", str(self.index_dir),
                   "--host", self.host, "--port", str(self.port), *self.extra_args]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_healthy(self.url, self.startup_timeout, alive=lambda: self.process.poll() is None)
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"retrieval service (exit code {self.process.returncode}, log {self.log_path}): "
                               f"{error}") from None
        return self

    def stop(self) -> None:
        """Stop the child we started (SIGTERM, then SIGKILL), by its PID only."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
