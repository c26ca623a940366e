"""The scale protocol between `research scale RUN_DIR N` and a running job: one small JSON file in run_dir.

The command writes `{"num_actors": N}` atomically; the driver reads it at every step boundary and grows or shrinks
its rollout actors to N. Both sides live here, so the file's name and shape have one definition.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)
CONTROL_FILE = "control.json"


def request_actors(run_dir: Path, num_actors: int) -> Path:
    """Ask the job in `run_dir` for `num_actors` rollout actors (atomic: the driver never reads half a file)."""
    target = run_dir / CONTROL_FILE
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps({"num_actors": num_actors}))
    partial.replace(target)
    return target


def requested_actors(run_dir: Path) -> int | None:
    """The rollout actors last asked for in `run_dir` (None when none were, or the file is malformed)."""
    path = run_dir / CONTROL_FILE
    if not path.is_file():
        return None
    try:
        target = int(json.loads(path.read_text())["num_actors"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        log.warning("ignoring malformed %s: %s", path, error)
        return None
    return target if target >= 1 else None
