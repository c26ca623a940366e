"""Shared pytest fixtures: the location of ../shared/data and a skip when it is absent."""

from __future__ import annotations

import contextlib
import os
import re
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
    """Shared-memory segments and IPC sockets that vLLM, DeepSpeed and loky leave when their processes are killed."""
    found = {p for p in Path("/dev/shm").glob("*") if p.name.startswith(("psm_", "sem.", "loky-", "deepspeed"))}
    uuid_like = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    found |= {p for p in Path(tempfile.gettempdir()).iterdir() if uuid_like.match(p.name) and p.is_socket()}
    return found


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_memory_and_sockets() -> Iterator[None]:
    """Tests kill engines and actors on purpose; remove the segments and sockets created during this session."""
    before = _leftovers()
    yield
    for path in _leftovers() - before:
        with contextlib.suppress(OSError):
            path.unlink()
