"""Run-directory checks for multi-node jobs: run_dir must be one directory that every node sees.

Learner ranks write checkpoints into run_dir from their own nodes and the driver reads them back on resume; a path
that is node-local (a relative path resolves inside Ray's per-node working-directory cache) would scatter them over
disks nobody keeps. The driver writes a marker with a random token at start; every learner rank and rollout actor
reads it back before the job proceeds.
"""

from __future__ import annotations

import secrets
from pathlib import Path

MARKER = ".research-run-marker"


class RunDirError(RuntimeError):
    """run_dir is not usable for this job (not shared by every node, or not absolute on a multi-node cluster)."""


def write_marker(run_dir: Path) -> str:
    """Write a fresh marker into run_dir; returns its token."""
    token = secrets.token_hex(16)
    partial = run_dir / (MARKER + ".tmp")
    partial.write_text(token)
    partial.replace(run_dir / MARKER)
    return token


def check_marker(run_dir: str | Path, token: str) -> None:
    """Raise RunDirError naming run_dir unless this process reads the driver's marker with `token`."""
    import socket

    path = Path(run_dir) / MARKER
    try:
        found = path.read_text().strip()
    except OSError as error:
        raise RunDirError(
            f"run_dir {run_dir} is not visible from node {socket.gethostname()} ({error.strerror}: {path}); on a "
            "multi-node cluster set run_dir to a directory on storage every node mounts (NFS, Lustre, a shared PVC)"
        ) from None
    if found != token:
        raise RunDirError(
            f"run_dir {run_dir} on node {socket.gethostname()} holds another job's marker: it is a node-local "
            "directory of the same name, not the driver's; set run_dir to storage every node mounts"
        )


def check_marker_on_nodes(run_dir: str | Path, token: str, node_ids: list[str]) -> list[str]:
    """The driver checks its marker on each Ray node given (a zero-CPU task pinned there; RunDirError unless every
    node reads it); returns the nodes' IPs in the order given."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def check_here() -> str:
        check_marker(run_dir, token)
        return ray.util.get_node_ip_address()

    task = ray.remote(num_cpus=0)(check_here)
    unique = list(dict.fromkeys(node_ids))
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in unique]
    try:
        ips = dict(zip(unique, ray.get(refs), strict=True))
    except ray.exceptions.RayTaskError as error:
        raise error.cause if isinstance(error.cause, RunDirError) else error from None
    return [ips[node] for node in node_ids]


def check_run_dir_setting(run_dir: str | None, nodes: int) -> None:
    """On a cluster of more than one node, refuse an unset or relative run_dir before anything starts."""
    if nodes > 1 and (not run_dir or not Path(run_dir).expanduser().is_absolute()):
        raise RunDirError(
            f"run_dir={run_dir or '(unset)'}: on a {nodes}-node cluster run_dir must be an absolute path on storage "
            "every node mounts (learner ranks write checkpoints there)"
        )
