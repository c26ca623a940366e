"""`make demo`: the pipeline on this machine, stage by stage, with a summary of what each stage did.

Stages: synthetic world -> faiss index -> retrieval service on 127.0.0.1 -> rollouts of SmolLM2-135M-Instruct with
search (when the rollout engine is installed) -> summary table. Everything goes under the run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cluster.config import JobConfig, load_config

console = Console()


def _stage(title: str) -> None:
    """Print a stage header."""
    console.rule(f"[bold]{title}")


def make_world(config: JobConfig, run_dir: Path) -> tuple[Path, dict]:
    """Generate (or reuse) the synthetic world of the config's size and seed."""
    from qa.world import generate_world

    world_dir = run_dir / "world"
    if (world_dir / "world.json").is_file():
        return world_dir, json.loads((world_dir / "world.json").read_text())
    started = time.perf_counter()
    summary = generate_world(world_dir, seed=config.data.world_seed, num_passages=config.data.world_passages)
    info = {"passages": summary.num_passages, "train": summary.num_train, "dev": summary.num_dev,
            "seconds": round(time.perf_counter() - started, 2)}
    console.print(f"world: {info}")
    return world_dir, info


def make_index(config: JobConfig, world_dir: Path, run_dir: Path) -> Path:
    """Encode the world's corpus into a faiss index (resumes if interrupted)."""
    from retrieval_service.build import build_index

    index_dir = run_dir / "index"
    meta = build_index(world_dir / "corpus.jsonl", index_dir, config.retrieval.encoder, factory="Flat")
    if meta is not None:
        console.print(f"index: {meta.count} passages, {meta.dim}-d, encoder {meta.encoder}")
    return index_dir


async def _probe_retrieval(url: str, world_dir: Path, topk: int, limit: int) -> dict:
    """Ask the service the world's 1-hop dev questions and measure how often the supporting passage comes back."""
    from qa.readers import read_records
    from retrieval_service.client import RetrievalClient

    questions = [r for r in read_records(world_dir / "dev.jsonl") if r.metadata.get("hops") == 1][:limit]
    client = RetrievalClient([url])
    try:
        results = await client.search([r.question for r in questions], topk)
    finally:
        await client.aclose()
    hits = sum(r.metadata["supporting_ids"][0] in {p.id for p in passages} for r, passages in zip(questions, results, strict=True))
    return {"questions": len(questions), "recall_at_k": hits / max(len(questions), 1), "k": topk}


def run_rollouts(config: JobConfig, url: str, world_dir: Path, run_dir: Path, num_prompts: int) -> dict | None:
    """A few ReSearch rollouts of the configured policy against the live service, if the rollout engine exists."""
    try:
        from actors.demo_rollouts import demo_rollouts
    except ImportError as error:
        console.print(f"[yellow]rollouts skipped: the rollout engine is not available yet ({error})")
        return None
    return demo_rollouts(config, url, world_dir, run_dir, num_prompts)


def main(argv: list[str] | None = None) -> int:
    """Run the demo stages and print what each did."""
    parser = argparse.ArgumentParser(prog="research demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo-cpu", help="preset name or YAML file")
    parser.add_argument("--prompts", type=int, default=4, help="questions to roll out")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    run_dir = Path(config.run_dir or "runs/demo")
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    _stage("1. synthetic world")
    started = time.perf_counter()
    world_dir, world_info = make_world(config, run_dir)
    timings["world"] = time.perf_counter() - started

    _stage("2. faiss index")
    started = time.perf_counter()
    index_dir = make_index(config, world_dir, run_dir)
    timings["index"] = time.perf_counter() - started

    _stage("3. retrieval service on 127.0.0.1")
    from retrieval_service.process import ServiceProcess

    started = time.perf_counter()
    with ServiceProcess(index_dir, log_path=run_dir / "retrieval.log") as service:
        timings["service start"] = time.perf_counter() - started
        console.print(f"service: {service.url} (log {run_dir / 'retrieval.log'})")
        probe = asyncio.run(_probe_retrieval(service.url, world_dir, config.retrieval.topk, limit=64))
        console.print(f"retrieval probe: {probe}")

        _stage("4. rollouts with search")
        started = time.perf_counter()
        rollouts = run_rollouts(config, service.url, world_dir, run_dir, args.prompts)
        timings["rollouts"] = time.perf_counter() - started

    table = Table(title="demo summary")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    table.add_row("world", f"{world_info['passages']} passages, {world_info['train']} train / {world_info['dev']} dev questions",
                  f"{timings['world']:.1f}")
    table.add_row("index", str(index_dir), f"{timings['index']:.1f}")
    table.add_row("retrieval", f"recall@{probe['k']} {probe['recall_at_k']:.2f} on {probe['questions']} 1-hop dev questions",
                  f"{timings['service start']:.1f}")
    table.add_row("rollouts", json.dumps(rollouts) if rollouts else "not run (rollout engine not available)",
                  f"{timings['rollouts']:.1f}")
    console.print(table)
    console.print(f"everything is under {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
