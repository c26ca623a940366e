"""`research dashboard RUN_DIR`: TensorBoard over a run's scalars, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def tensorboard_command(run_dir: str | Path, host: str = "127.0.0.1", port: int = 6006) -> list[str]:
    """The TensorBoard command line for a run directory (its tensorboard/ subdirectory when present)."""
    logdir = Path(run_dir)
    if (logdir / "tensorboard").is_dir():
        logdir = logdir / "tensorboard"
    executable = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    return [executable, "--logdir", str(logdir), "--host", host, "--port", str(port)]


def main(argv: list[str] | None = None) -> int:
    """Serve TensorBoard on a run until interrupted."""
    from cluster.cli import CommandParser, fail

    parser = CommandParser("research dashboard", "Serve TensorBoard over a run's scalars, bound to 127.0.0.1 unless "
                           "told otherwise; runs until interrupted.")
    parser.add_argument("run_dir", help="a run directory written by research train")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=6006, help="TCP port (default: 6006)")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        return fail(parser.prog, f"no such run directory {args.run_dir}")
    command = tensorboard_command(args.run_dir, args.host, args.port)
    print(f"TensorBoard on http://{args.host}:{args.port} ({' '.join(command)})", flush=True)
    # Become TensorBoard (no child left behind): whoever stops this PID stops the server.
    try:
        os.execv(command[0], command)
    except OSError as error:
        return fail(parser.prog, f"cannot start {command[0]}: {error}")
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
