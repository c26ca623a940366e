"""Shared pytest fixtures: the location of ../shared/data and a skip when it is absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing downloads at test time, and caches stay inside the checkout (docs/cpu-stack.md #1 and #7).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RESEARCH_CACHE": str(REPO_ROOT / ".cache" / "research"),
    "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".cache" / "torch_extensions"),
    "VLLM_CACHE_ROOT": str(REPO_ROOT / ".cache" / "vllm"),
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}.items():
    os.environ.setdefault(_key, _value)

# vLLM's ZMQ sockets (engine <-> front-end) go to a directory of this test session, not /tmp itself: a concurrent test
# session on the same machine that cleans up /tmp would otherwise unlink them mid-handshake and hang an engine start.
# Ray workers, engines and drivers inherit it from this process's environment.
RPC_DIR = tempfile.mkdtemp(prefix="vllm-rpc-", dir="/tmp")  # short: socket paths stay under 108 bytes
os.environ["VLLM_RPC_BASE_PATH"] = RPC_DIR


def shared_data_dir() -> Path:
    """Where the public benchmark files live: $RESEARCH_SHARED_DATA or ../shared/data beside the checkout."""
    return Path(os.environ.get("RESEARCH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ../shared/data directory; skips the test cleanly on machines that do not have it."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared benchmark data not found at {path}")
    return path


def _leftovers() -> set[Path]:
    """Shared-memory segments that vLLM, DeepSpeed and loky leave when their processes are killed."""
    return {p for p in Path("/dev/shm").glob("*") if p.name.startswith(("psm_", "sem.", "loky-", "deepspeed"))}


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_memory_and_sockets() -> Iterator[None]:
    """Tests kill engines and actors on purpose; remove the segments created during this session and the session's
    vLLM socket directory."""
    before = _leftovers()
    yield
    for path in _leftovers() - before:
        with contextlib.suppress(OSError):
            path.unlink()
    shutil.rmtree(RPC_DIR, ignore_errors=True)
