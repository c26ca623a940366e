"""Chaos: a test-tiny epoch during which a rollout actor, an engine process, the retrieval replica and a learner rank
are each killed once, then the driver gets SIGTERM and a `--resume` finishes the epoch. Every prompt of the epoch is
trained exactly once, and nothing of the run is left running or in /dev/shm.

`make chaos` runs this file (not part of `make test`: ~10 minutes on 2 cores); its figures (kills, prompts trained, duplicates, seconds lost per kill) are printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from actors.engine import descendant_pids, orphaned_shm
from tests.e2e.test_train_job import driver, trained, wait, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

PROMPTS = 32  # 8 steps of 4 groups


def pids(run_dir: Path, role: str, steps: int = 0) -> list[int]:
    """Live PIDs of one role from the driver's run_dir/actors.json (written at every step boundary, after the step is
    in trained.jsonl), once the file is from step `steps` or later: an older file can list a killed actor's engines."""
    path = run_dir / "actors.json"
    if not path.is_file():
        return []
    state = json.loads(path.read_text())
    return [pid for pid in state.get(role, []) if alive(pid)] if state.get("step", 0) >= steps else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_at_step(run_dir: Path, role: str, steps: int, rng: random.Random) -> dict:
    """Once `steps` steps are trained, wait a random moment of the next step and SIGKILL one process of `role`."""
    wait_for(lambda: len(trained(run_dir)) >= steps and pids(run_dir, role, steps), timeout=600)
    time.sleep(rng.uniform(0.0, 2.0))
    victim = rng.choice(pids(run_dir, role, steps))
    os.kill(victim, signal.SIGKILL)
    return {"role": role, "pid": victim, "after_step": len(trained(run_dir)), "at": time.time()}


def seconds_lost(run_dir: Path, kills: list[dict]) -> list[float]:
    """For each kill, how much longer than the median step the step it landed in took (metrics.jsonl times)."""
    from cluster.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "time/step" in r]
    typical = sorted(r["time/step"] for r in rows)[len(rows) // 2]
    lost = []
    for kill in kills:
        hit = next((r for r in rows if r["time"] >= kill["at"]), None)
        lost.append(round(hit["time/step"] - typical, 1) if hit else float("nan"))
    return lost


def test_every_prompt_is_trained_once_through_kills_sigterm_and_resume(ray_head: dict, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
    run_dir = tmp_path / "chaos"
    run_dir.mkdir()
    orphans_before = {p.name for p in orphaned_shm(min_age_s=0)}
    common = (f"data.max_train_questions={PROMPTS}", "trainer.max_steps=null", "trainer.epochs=1",
              "trainer.save_every=2", "trainer.val_every=0", "data.val_size=0", "rollout.num_actors=2",
              "trainer.max_learner_restarts=1", "retrieval.outage_wait_s=120")
    process = driver(run_dir, ray_head, *common)
    kills = []
    try:
        kills.append(kill_at_step(run_dir, "rollout_pids", 1, rng))
        kills.append(kill_at_step(run_dir, "engine_pids", kills[-1]["after_step"] + 1, rng))
        kills.append(kill_at_step(run_dir, "retrieval_pids", kills[-1]["after_step"] + 1, rng))
        kills.append(kill_at_step(run_dir, "learner_pids", max(kills[-1]["after_step"] + 1, 2), rng))
        # After the learner's restart from its checkpoint, a SIGTERM: checkpoint at the next boundary, exit 0.
        wait_for(lambda: (run_dir / "trained-rolled-back.jsonl").exists() or len(trained(run_dir)) >= 5, timeout=600)
        wait_for(lambda: len(trained(run_dir)) >= 3, timeout=600)
        children = descendant_pids(process.pid)
        process.send_signal(signal.SIGTERM)
        wait(process, run_dir, timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    lost = seconds_lost(run_dir, kills)
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["stopped"] == "SIGTERM" and first["checkpoint"], first
    assert first["learner_restarts"] == 1, first
    time.sleep(2)
    assert [pid for pid in children if alive(pid)] == []  # the local processes the driver started are gone

    wait(driver(run_dir, ray_head, *common, resume=True), run_dir, timeout=900)
    steps = trained(run_dir)
    prompts = [tuple(p) for step in steps for p in step["prompts"]]
    duplicates = len(prompts) - len(set(prompts))
    assert sorted(prompts) == [(0, i) for i in range(PROMPTS)], f"{duplicates} duplicates"
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    # Segments other programs on this machine use are mapped; ours must not be left behind unmapped.
    assert {p.name for p in orphaned_shm(min_age_s=0)} - orphans_before == set()
    print(f"\nchaos: {len(kills)} kills ({', '.join(k['role'] for k in kills)}), {len(set(prompts))} prompts trained "
          f"once, {duplicates} duplicates, {len(steps)} steps; seconds lost per kill vs the median step: {lost}; "
          f"rollout actors replaced in the resumed run: {summary.get('rollout_actors_replaced')}")


def test_async_run_survives_rollout_deaths_during_updates(ray_head: dict, tmp_path: Path) -> None:
    """max_staleness 1 (generation runs ahead while the learner updates): a rollout actor, then an engine process,
    killed while an update is in progress. The replacement's sync and the update's sync never run at once, every
    prompt is trained exactly once, and nothing is left in /dev/shm."""
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
    run_dir = tmp_path / "async"
    run_dir.mkdir()
    orphans_before = {p.name for p in orphaned_shm(min_age_s=0)}
    process = driver(run_dir, ray_head, f"data.max_train_questions={PROMPTS}", "trainer.max_steps=null",
                     "trainer.epochs=1", "trainer.save_every=0", "trainer.val_every=0", "data.val_size=0",
                     "rollout.num_actors=2", "trainer.max_staleness=1", "retrieval.outage_wait_s=120")
    kills = []
    try:
        for role, after in (("rollout_pids", 1), ("engine_pids", 3)):
            # a new step was just logged: the next update starts at once (the buffer runs one batch ahead)
            wait_for(lambda a=after, r=role: len(trained(run_dir)) >= a and pids(run_dir, r, a), timeout=600,
                     every=0.05)
            time.sleep(rng.uniform(0.05, 0.5))
            victim = rng.choice(pids(run_dir, role, after))
            os.kill(victim, signal.SIGKILL)
            kills.append({"role": role, "pid": victim, "after_step": len(trained(run_dir))})
        wait(process, run_dir, timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    steps = trained(run_dir)
    prompts = [tuple(p) for step in steps for p in step["prompts"]]
    assert sorted(prompts) == [(0, i) for i in range(PROMPTS)], f"{len(prompts) - len(set(prompts))} duplicates"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollout_actors_replaced"] >= 1, summary
    assert summary["weight_syncs_overlapping"] == 0, summary
    assert {p.name for p in orphaned_shm(min_age_s=0)} - orphans_before == set()
    print(f"\nchaos (max_staleness 1): {len(kills)} kills ({', '.join(k['role'] for k in kills)}) during updates, "
          f"{len(set(prompts))} prompts trained once, {len(steps)} steps, {summary['weight_syncs']} weight syncs "
          f"({summary['weight_syncs_waited']} waited for another, {summary['weight_syncs_overlapping']} overlapped), "
          f"rollout actors replaced: {summary['rollout_actors_replaced']}")


def test_sigterm_to_a_driver_with_its_own_ray_stops_everything_it_started(tmp_path: Path) -> None:
    """A driver that started its own local Ray cluster: SIGTERM checkpoints, exits 0, and leaves none of that
    cluster's processes (dashboard and runtime-env agents included) running; --resume would continue from there."""
    import subprocess
    import sys

    from tests.e2e.conftest import REPO

    run_dir = tmp_path / "local"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    command = [sys.executable, "-m", "cluster.train", "configs/test-tiny.yaml", f"run_dir={run_dir}",
               "trainer.max_steps=null", "trainer.val_every=0", "data.val_size=0", "trainer.save_every=0"]
    with open(tmp_path / "local.log", "ab") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(trained(run_dir)) >= 1, timeout=600)
        sessions = {line.split("session_", 1)[1].split("/")[0] for pid in descendant_pids(process.pid)
                    for line in [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
                    if "/session_" in line}
        assert sessions, "the driver started no local Ray cluster"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0, (tmp_path / "local.log").read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "SIGTERM" and summary["checkpoint"]
    # the stop's checkpoint comes with a loadable export and the curves (as every checkpoint does)
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "curves.png").is_file()
    time.sleep(2)
    left = [cmd.parent.name for cmd in Path("/proc").glob("[0-9]*/cmdline")
            if any(f"session_{s}".encode() in cmd.read_bytes() for s in sessions)]
    assert left == []
