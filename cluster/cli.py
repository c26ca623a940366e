"""The `research` console script: one entry point, one subcommand per role."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# subcommand -> (module, function, one-line help). Modules are imported lazily: `research world` must not pay
# for importing torch or vLLM.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "world": ("qa.world", "main", "generate the synthetic multi-hop world (corpus, train, dev)"),
    "index": ("retrieval_service.cli", "index_main", "build a faiss index from a corpus"),
    "serve": ("retrieval_service.cli", "serve_main", "run the retrieval service"),
    "models": ("cluster.cli", "models_main", "prepare the offline policies (SmolLM2 conversion, tiny test policy)"),
    "config": ("cluster.cli", "config_main", "print a resolved config (preset + key=value overrides) as YAML"),
    "plan": ("cluster.plan", "main", "memory estimate per role (learner rank, rollout engine, retrieval replica): "
             "does CONFIG fit? [--json]"),
    "demo": ("cluster.demo", "main", "run the whole pipeline on this machine"),
    "train": ("cluster.train", "main", "train (the job `ray job submit` runs): CONFIG [key=value ...] [--resume]"),
    "eval": ("cluster.eval", "main", "evaluate a policy on benchmark files: CONFIG --data FILE --out DIR"),
    "data": ("qa.prepare", "main", "prepare data: musique-train, val (100 MuSiQue dev), eval sets"),
    "scale": ("cluster.cli", "scale_main", "change the number of rollout actors of a running job: RUN_DIR N"),
    "dashboard": ("cluster.dashboard", "main", "serve TensorBoard over a run directory"),
}


def models_main(argv: list[str] | None = None) -> int:
    """Prepare the offline policies and print their directories."""
    from cluster.models import smollm2_dir, tiny_policy_dir

    parser = argparse.ArgumentParser(prog="research models", description=COMMANDS["models"][2])
    parser.add_argument("--smollm2", action="store_true", help="convert the packaged SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--tiny", action="store_true", help="build the tiny random Qwen2 test policy")
    args = parser.parse_args(argv)
    if not (args.smollm2 or args.tiny):
        args.smollm2 = args.tiny = True
    if args.tiny:
        print(f"tiny-random-qwen2: {tiny_policy_dir()}")
    if args.smollm2:
        print(f"smollm2-135m-instruct: {smollm2_dir()}")
    return 0


def scale_main(argv: list[str] | None = None) -> int:
    """Ask a running job to scale its rollout actors; it applies the request at its next step boundary."""
    import json
    from pathlib import Path

    from cluster.train import CONTROL_FILE

    parser = argparse.ArgumentParser(prog="research scale", description=COMMANDS["scale"][2])
    parser.add_argument("run_dir", help="the job's run directory")
    parser.add_argument("num_actors", type=int, help="rollout actors wanted (>= 1)")
    args = parser.parse_args(argv)
    if args.num_actors < 1:
        print("research scale: num_actors must be >= 1", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"research scale: no such run directory {run_dir}", file=sys.stderr)
        return 2
    target = run_dir / CONTROL_FILE
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps({"num_actors": args.num_actors}))
    partial.replace(target)  # atomic: the driver never reads half a file
    print(f"asked {run_dir} for {args.num_actors} rollout actors")
    return 0


def config_main(argv: list[str] | None = None) -> int:
    """Print the resolved configuration, so users see exactly what a run will use."""
    import yaml

    from cluster.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="research config", description=COMMANDS["config"][2])
    parser.add_argument("config", help="a YAML file or a preset name under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _resolve(name: str) -> Callable[[list[str]], int]:
    """Import the function that implements a subcommand."""
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `research <command> ...` to the module that owns the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: research <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    return int(_resolve(argv[0])(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
