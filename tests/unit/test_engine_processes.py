"""What a rollout actor does when its engine dies: find the engine's processes, free the shared memory it left."""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

from actors.engine import descendant_pids, free_orphaned_shm


def test_descendant_pids_finds_grandchildren() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                              "print(p.pid, flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert {child.pid, grandchild} <= set(descendant_pids(os.getpid()))
    finally:
        child.kill()
        child.wait()
        os.kill(grandchild, 9)


def test_only_segments_no_process_maps_are_freed() -> None:
    # An orphan: a segment whose creator died without unlinking it (what a SIGKILLed engine leaves of its queues).
    orphan = Path("/dev/shm/psm_research_orphan_test")
    orphan.write_bytes(b"\0" * 4096)
    live = shared_memory.SharedMemory(create=True, size=4096, name="psm_research_live_test")  # mapped here
    try:
        assert free_orphaned_shm("psm_research_", min_age_s=60.0) == []  # too young: an engine may be starting
        assert free_orphaned_shm("psm_research_", min_age_s=0.0) == [orphan.name]
        assert not orphan.exists() and Path(f"/dev/shm/{live.name}").exists()
    finally:
        orphan.unlink(missing_ok=True)
        live.close()
        live.unlink()
