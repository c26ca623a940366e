"""Checkpoints: DeepSpeed state plus what the driver needs to resume exactly, and a Hugging Face export.

Layout of `save_checkpoint(engine, root, ...)`:
    root/<tag>/...                 DeepSpeed model, optimizer and LR-scheduler state (every rank writes its shard)
    root/<tag>/rng_rank<r>.pt      Python, NumPy and torch RNG states of rank r
    root/<tag>/driver_state.json   step, policy version and the data position the driver handed in
    root/latest                    the tag of the newest complete checkpoint (written by DeepSpeed)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from learner.engine import LearnerEngine

DRIVER_STATE = "driver_state.json"


def _rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, in this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what _rng_state captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    learner: LearnerEngine,
    root: str | Path,
    policy_version: int,
    data_position: dict[str, Any] | None = None,
    tag: str | None = None,
) -> Path:
    """Write a resumable checkpoint on every rank (collective); returns the tag directory."""
    root = Path(root)
    tag = tag or f"step{learner.step}"
    driver_state = {"step": learner.step, "policy_version": policy_version, "data_position": data_position or {}}
    learner.engine.save_checkpoint(str(root), tag=tag, client_state={"driver_state": driver_state})
    directory = root / tag
    torch.save(_rng_state(), directory / f"rng_rank{learner.rank}.pt")
    if learner.rank == 0:
        # Written last and atomically: a checkpoint without it is incomplete and load refuses it.
        partial = directory / (DRIVER_STATE + ".tmp")
        partial.write_text(json.dumps(driver_state, indent=2, sort_keys=True) + "\n")
        partial.replace(directory / DRIVER_STATE)
    dist.barrier()
    return directory


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints under root (by step; the `latest` one always stays),
    and incomplete ones older than the newest kept; returns what was deleted."""
    import shutil

    root = Path(root)
    latest = latest_tag(root)
    tags = _step_directories(root)
    complete = sorted((step, d) for step, ok, d in tags if ok)
    kept = {d for _, d in complete[-keep:]} | ({root / latest} if latest else set())
    oldest_kept = min((step for step, d in complete if d in kept), default=None)
    doomed = [d for step, ok, d in tags if d not in kept and (ok or (oldest_kept is not None and step < oldest_kept))]
    for directory in doomed:
        shutil.rmtree(directory, ignore_errors=True)
    return doomed


def latest_tag(root: str | Path) -> str | None:
    """The newest checkpoint tag under root, or None when there is none."""
    latest = Path(root) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def newest_complete_tag(root: str | Path) -> str | None:
    """The newest checkpoint whose driver state was written (a save killed half-way has none), or None."""
    root = Path(root)
    latest = latest_tag(root)
    if latest and (root / latest / DRIVER_STATE).is_file():
        return latest
    steps = [step for step, complete, _ in _step_directories(root) if complete]
    return f"step{max(steps)}" if steps else None


def _step_directories(root: Path) -> list[tuple[int, bool, Path]]:
    """(step, complete: its driver state was written, directory) of every step<N> checkpoint directory under root."""
    return [(int(d.name[4:]), (d / DRIVER_STATE).is_file(), d) for d in (root.iterdir() if root.is_dir() else [])
            if d.is_dir() and d.name.startswith("step") and d.name[4:].isdigit()]


def load_checkpoint(learner: LearnerEngine, root: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG and step on every rank; returns the driver state."""
    root = Path(root)
    tag = tag or latest_tag(root)
    if tag is None or not (root / tag / DRIVER_STATE).exists():
        raise FileNotFoundError(f"no complete checkpoint under {root} (tag {tag!r})")
    path, _ = learner.engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {root / tag}")
    driver_state = json.loads((root / tag / DRIVER_STATE).read_text())
    rng_file = root / tag / f"rng_rank{learner.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    learner.step = int(driver_state["step"])
    return driver_state


def export_hf(learner: LearnerEngine, directory: str | Path, tokenizer_path: str | Path | None = None) -> Path | None:
    """Save the current weights as a Hugging Face directory (safetensors + config + tokenizer) on rank 0.

    Collective: every rank must call it. Parameters are gathered one at a time, so rank 0 holds one full copy
    on the CPU and never a second one on the device. Returns the directory on rank 0, None elsewhere.
    """
    directory = Path(directory)
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in learner.full_parameters():
        if learner.rank == 0:
            state_dict[name] = tensor.detach().to("cpu", dtype=learner.dtype, copy=True)
    if learner.rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        learner.module.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        if tokenizer_path is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(directory)
    dist.barrier()
    return directory if learner.rank == 0 else None
