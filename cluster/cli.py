"""The `research` console script: one entry point, one subcommand per role."""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NoReturn

# subcommand -> (module, function, one-line help). Modules are imported lazily: `research world` must not pay
# for importing torch or vLLM.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "world": ("qa.world", "main", "generate the synthetic multi-hop world (corpus, train, dev)"),
    "index": ("retrieval_service.cli", "index_main", "build a faiss index from a corpus"),
    "serve": ("retrieval_service.cli", "serve_main", "run the retrieval service"),
    "models": ("cluster.cli", "models_main", "prepare the offline policies (SmolLM2 conversion, tiny test policy)"),
    "config": ("cluster.cli", "config_main", "print a resolved config (preset + key=value overrides); --explain: every key"),
    "plan": ("cluster.plan", "main", "memory estimate per role (learner rank, rollout engine, retrieval replica) "
             "and placement on the launch files: does CONFIG fit? (exit 1 if not) [--json] [--launch FILE]"),
    "demo": ("cluster.demo", "main", "run the whole pipeline on this machine"),
    "train": ("cluster.train", "main", "train a policy (the job ray job submit runs): CONFIG [key=value ...] [--resume]"),
    "eval": ("cluster.eval", "main", "evaluate a policy on benchmark files: CONFIG --data FILE --out DIR"),
    "data": ("qa.prepare", "main", "prepare data: musique-train, val (100 MuSiQue dev), eval sets"),
    "scale": ("cluster.cli", "scale_main", "change the number of rollout actors of a running job: RUN_DIR N"),
    "dashboard": ("cluster.dashboard", "main", "serve TensorBoard over a run directory"),
}


class CommandParser(argparse.ArgumentParser):
    """The parser of a `research` command: a usage error is one line on stderr and exit code 2.

    With `config_help`, --help ends with the config sections and how to see every key (commands taking a config).
    """

    def __init__(self, prog: str, description: str, config_help: bool = False) -> None:
        epilog = None
        if config_help:
            from cluster.config import sections_help

            epilog = sections_help()
        super().__init__(prog=prog, description=textwrap.fill(description, 100), epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """Options and positionals in any order: `CONFIG --resume key=value` works too."""
        return self.parse_intermixed_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """Print `prog: error: message` as one line and exit 2 (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def fail(prog: str, message: object) -> int:
    """Print `prog: error: message` as one line on stderr; returns the exit code 2."""
    if isinstance(message, OSError) and message.filename and message.strerror:
        message = f"{message.filename}: {message.strerror}"
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def log_progress(fmt: str) -> None:
    """INFO logging for a long-running command, minus the line per HTTP request that httpx logs at INFO (the warm
    start's and the pool filter's searches run in the driver: hundreds of them)."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    for library in ("httpx", "httpcore"):
        logging.getLogger(library).setLevel(logging.WARNING)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def models_main(argv: list[str] | None = None) -> int:
    """Prepare the offline policies and print their directories."""
    from cluster.models import smollm2_dir, tiny_policy_dir

    parser = CommandParser("research models", "Prepare the offline policies (both unless one is named).")
    parser.add_argument("--smollm2", action="store_true", help="convert the packaged SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--tiny", action="store_true", help="build the tiny random Qwen2 test policy")
    args = parser.parse_args(argv)
    if not (args.smollm2 or args.tiny):
        args.smollm2 = args.tiny = True
    try:
        if args.tiny:
            print(f"tiny-random-qwen2: {tiny_policy_dir()}")
        if args.smollm2:
            print(f"smollm2-135m-instruct: {smollm2_dir()}")
    except (FileNotFoundError, ValueError) as error:
        return fail(parser.prog, error)
    return 0


def scale_main(argv: list[str] | None = None) -> int:
    """Ask a running job to scale its rollout actors; it applies the request at its next step boundary."""
    from pathlib import Path

    from cluster.scale import request_actors

    parser = CommandParser("research scale", "Change the number of rollout actors of a running job; it applies "
                           "the request at its next step boundary.")
    parser.add_argument("run_dir", help="the job's run directory")
    parser.add_argument("num_actors", type=positive_int, help="rollout actors wanted (>= 1)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        return fail(parser.prog, f"no such run directory {run_dir}")
    try:
        request_actors(run_dir, args.num_actors)
    except OSError as error:
        return fail(parser.prog, f"cannot write the scale request in {run_dir}: {error}")
    print(f"asked {run_dir} for {args.num_actors} rollout actors")
    return 0


def config_main(argv: list[str] | None = None) -> int:
    """Print the resolved configuration (or, with --explain, every key's description and type too)."""
    import yaml

    from cluster.config import ConfigError, explain_config, load_config, resolve_preset

    parser = CommandParser("research config", "Print the configuration a run would use: a preset or YAML file "
                           "with dotted key=value overrides applied, as YAML.", config_help=True)
    parser.add_argument("config", help="a YAML file or a preset name under configs/")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. learner.lr=5e-7")
    parser.add_argument("--explain", action="store_true",
                        help="print every key (dotted) with its value, type, default and description instead")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        return fail(parser.prog, err)
    if args.explain:
        print(f"# {resolve_preset(args.config)}{' with ' + ' '.join(args.overrides) if args.overrides else ''}; "
              "override any key with key=value\n")
        print(explain_config(config))
    else:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _resolve(name: str) -> Callable[[list[str]], int]:
    """Import the function that implements a subcommand."""
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `research <command> ...` to the module that owns the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: research <command> [options]   (research <command> --help for its options)\n\ncommands:\n"
              + "\n".join(lines))
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; commands: {', '.join(COMMANDS)}"
        return fail("research", f"unknown command '{argv[0]}'{hint}")
    return int(_resolve(argv[0])(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
