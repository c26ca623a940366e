"""Training throughput: test-tiny with max_staleness 0 (synchronous) against 1 (generation runs one version ahead).

Both runs use the same config, seed, steps and local Ray cluster; only max_staleness differs. Reports steps/hour,
generated tokens/s, the ratio (goal >= 1.3x), and where the time of a synchronous step goes (waiting for rollouts
= generation + retrieval, learner, weight sync). A tiny policy makes the learner cheap relative to generation, which
is the regime where overlap pays least; the figure is a floor for GPU clusters where both sides are busy.
Usage: python -m bench.train [--steps 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster.config import load_config
from cluster.metrics import read_metrics
from cluster.train import Trainer, connect_ray


def run(staleness: int, steps: int, root: Path) -> dict[str, float]:
    """One training run; returns its throughput and mean step-time breakdown."""
    overrides = [f"trainer.max_staleness={staleness}", f"trainer.max_steps={steps}", "trainer.val_every=0",
                 "trainer.save_every=0", "data.val_size=0", f"run_dir={root / f'staleness{staleness}'}",
                 "rollout.sampling.max_response_tokens=128", "trainer.batch_size=4"]
    config = load_config("test-tiny", overrides)
    trainer = Trainer(config, config.resolved_run_dir(), resume=False)
    try:
        started = time.perf_counter()
        asyncio.run(trainer.run())
        seconds = time.perf_counter() - started
    finally:
        trainer.shutdown()
    records = [r for r in read_metrics(config.resolved_run_dir()) if "reward/mean" in r]
    tokens = sum(r["rollout/generated_tokens"] for r in records)
    mean = {k: sum(r[k] for r in records) / len(records)
            for k in ("time/wait_for_rollouts", "time/learner", "time/weight_sync", "time/step")}
    return {"steps_per_hour": len(records) / seconds * 3600, "tokens_per_s": tokens / seconds, **mean,
            "staleness_max": max(r["staleness/max"] for r in records)}


def main() -> None:
    """Run both modes and print the table and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("RESEARCH_CACHE", str(Path(".cache/research").resolve()))
    connect_ray(None, quiet=True)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        results = {s: run(s, args.steps, root) for s in (0, 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"test-tiny, {args.steps} steps, 4 prompts x 4 samples, 128 response tokens")
    for column in ("max_staleness", "steps/hour", "gen tokens/s", "wait rollouts s", "learner s", "sync s",
                   "step s", "max staleness seen"):
        table.add_column(column, justify="right")
    for staleness, r in results.items():
        table.add_row(str(staleness), f"{r['steps_per_hour']:.0f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['time/wait_for_rollouts']:.2f}", f"{r['time/learner']:.2f}", f"{r['time/weight_sync']:.2f}",
                      f"{r['time/step']:.2f}", f"{r['staleness_max']:.0f}")
    console = Console()
    console.print(table)
    ratio = results[1]["steps_per_hour"] / results[0]["steps_per_hour"]
    console.print(f"steps/hour, max_staleness 1 vs 0: {ratio:.2f}x (goal >= 1.3x)")
    sync = results[0]
    console.print(f"synchronous step: rollouts {sync['time/wait_for_rollouts'] / sync['time/step']:.0%}, "
                  f"learner {sync['time/learner'] / sync['time/step']:.0%}, "
                  f"weight sync {sync['time/weight_sync'] / sync['time/step']:.0%}")


if __name__ == "__main__":
    main()
