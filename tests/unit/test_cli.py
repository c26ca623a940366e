"""The `research` console script dispatches to the module that owns each command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster.cli import COMMANDS, main


def test_help_lists_commands(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails(capsys) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_every_command_resolves() -> None:
    from cluster.cli import _resolve

    for name in COMMANDS:
        assert callable(_resolve(name))


def test_config_command_prints_overrides(capsys) -> None:
    assert main(["config", "test-tiny", "learner.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["config", "test-tiny", "learner.nope=1"]) == 2
    assert "learner.nope" in capsys.readouterr().err


def test_console_script_world(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("research")
    result = subprocess.run(
        [str(script), "world", "--out", str(tmp_path / "w"), "--seed", "3", "--num-passages", "300"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for name in ("corpus.jsonl", "train.jsonl", "dev.jsonl"):
        assert (tmp_path / "w" / name).stat().st_size > 0
