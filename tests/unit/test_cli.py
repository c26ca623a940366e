"""The `research` console script dispatches to the module that owns each command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """`research ARGV` in this process: (exit code, stdout, stderr); argparse's exits are caught."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    """The single stderr line of a failed command (asserting exit code 2 and no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_mistyped_command_gets_a_suggestion(capsys) -> None:
    code, out, err = run(["trian"], capsys)
    assert one_line_error(code, err) == "research: error: unknown command 'trian' (did you mean 'train'?)"
    assert out == ""


def test_config_explain_prints_every_field_with_description_type_and_value(capsys) -> None:
    from pydantic import BaseModel

    from cluster.config import JobConfig, config_keys, load_config

    code, out, _ = run(["config", "test-tiny", "--explain", "learner.lr=5e-7"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    config = load_config("test-tiny", ["learner.lr=5e-7"])
    leaves = 0
    for key in config_keys():
        *sections, name = key.split(".")
        model: type = JobConfig
        for section in sections:
            model = model.model_fields[section].annotation
        field = model.model_fields[name]
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            assert f"[{key}]" in out  # a section header
            continue
        leaves += 1
        assert f"\n{key} = " in "\n" + out, key
        assert " ".join(field.description.split()) in flat, key
    assert leaves >= 90  # every value the job config has
    assert "learner.lr = 5e-07  (float > 0.0; default 1e-06)" in out
    assert "learner.zero_stage = 2  (one of: 0, 1, 2, 3)" in out
    assert config.learner.lr == 5e-7


@pytest.mark.parametrize("command", ["train", "eval", "demo", "config"])
def test_help_lists_config_sections_and_points_to_explain(command: str, capsys) -> None:
    from pydantic import BaseModel

    from cluster.config import JobConfig

    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert "research config PRESET --explain" in out
    assert "`" not in out
    for name, field in JobConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            doc = field.annotation.__doc__.strip().splitlines()[0]
            assert re.search(rf"^  {name} +{re.escape(doc)}$", out, re.MULTILINE), name
        else:
            assert re.search(rf"^  [a-z_, ]*\b{name}\b[a-z_, ]* +top-level values$", out, re.MULTILINE), name


@pytest.mark.parametrize("argv", [
    ["config", "test-tiny"],
    ["train", "test-tiny"],
    ["demo"],
    ["eval", "test-tiny", "--data", "unread.jsonl", "--out", "unwritten"],
])
def test_mistyped_config_key_gets_a_suggestion_in_every_command(argv: list[str], capsys) -> None:
    code, _, err = run([*argv, "learner.lrr=1"], capsys)
    line = one_line_error(code, err)
    assert line == f"research {argv[0]}: error: unknown config key 'learner.lrr' (did you mean 'learner.lr'?)"


def test_config_errors_stop_train_before_ray_starts(tmp_path: Path, capsys) -> None:
    import ray

    for overrides, expected in [
        (["learner.lr=abc"], "config key 'learner.lr': Input should be a valid number"),
        (["trainer.batch_size=[1, 2]"], "config key 'trainer.batch_size'"),
        (["temperature=0"], "did you mean 'learner.grpo.temperature' or 'rollout.sampling.temperature'?"),
        ([f"data.train_files=[{tmp_path / 'missing.jsonl'}]"], "no such file"),
        ([f"retrieval.index_dir={tmp_path / 'no-index'}"], "no such directory"),
        (["learner.lr"], "not of the form key=value"),
    ]:
        code, _, err = run(["train", "test-tiny", *overrides], capsys)
        assert expected in one_line_error(code, err), err
    assert not ray.is_initialized()


def test_bad_config_files_are_one_line_errors(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("learner:\n  lr: [1\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("learner:\n  zero_stag: 3\n")
    cases = [
        (["config", str(broken)], "is not valid YAML"),
        (["config", str(typo)], "unknown config key 'learner.zero_stag' (did you mean 'learner.zero_stage'?)"),
        (["config", "no-such-preset"], "config file not found: no-such-preset (presets:"),
        (["demo", "--config", str(tmp_path)], "config file not found"),
        (["eval", "test-tiny", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")], "none.jsonl"),
        (["eval", "test-tiny", "--data", "x", "--out", "y", "--actors", "-1"], "--actors: must be >= 0"),
        (["scale", str(tmp_path), "0"], "must be >= 1"),
        (["scale", str(tmp_path / "nope"), "2"], "no such run directory"),
        (["dashboard", str(tmp_path / "nope")], "no such run directory"),
        (["train"], "the following arguments are required: config"),
        (["world", "--out", str(broken)], "research world: error:"),
    ]
    for argv, expected in cases:
        code, _, err = run(argv, capsys)
        assert expected in one_line_error(code, err), (argv, err)


def test_serve_and_index_flags_come_from_the_config_models(capsys) -> None:
    from retrieval_service.cli import index_parser, serve_parser
    from retrieval_service.config import EncoderConfig, IndexBuildConfig, RetrievalConfig, ServerConfig

    parser, flags = serve_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    assert {field for section, field in flags.flags if section == "server"} == set(ServerConfig.model_fields) - {
        "auth_token"}
    help_text = " ".join(parser.format_help().split())
    for field in ServerConfig.model_fields.values():
        if field.description and "Bearer" not in field.description:
            assert field.description in help_text
    args = parser.parse_args(["--index", "idx", "--batch-workers", "3", "--max-batch", "8", "--max-wait-ms", "1.5",
                              "--no-micro-batching", "--cpu-threads", "1", "--cache-size", "0", "--port", "9",
                              "--topk", "3", "--faiss-threads", "2"])
    server = flags.build(ServerConfig, args, "server")
    assert (server.micro_batch_workers, server.micro_batch_max_size, server.micro_batch_max_wait_ms) == (3, 8, 1.5)
    assert (server.micro_batching, server.cache_size, server.port, server.faiss_threads) == (False, 0, 9, 2)
    assert server.host == ServerConfig().host
    assert flags.build(EncoderConfig, args, "encoder").cpu_threads == 1
    assert flags.build(RetrievalConfig, args, "retrieval").model_dump(include={"index_dir", "topk"}) == {
        "index_dir": "idx", "topk": 3}

    parser, flags = index_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    args = parser.parse_args(["--corpus", "c.jsonl", "--out", "o", "--shard-size", "200", "--keep-shards",
                              "--max-length", "128", "--encoder", "enc", "--factory", "HNSW32"])
    build = flags.build(IndexBuildConfig, args, "build")
    assert (build.shard_size, build.keep_shards, build.factory, build.ray_actors) == (200, True, "HNSW32", 0)
    encoder = flags.build(EncoderConfig, args, "encoder")
    assert (encoder.passage_max_length, encoder.name_or_path, encoder.batch_size) == (128, "enc", 64)


def test_serve_and_index_values_are_validated_by_the_models(tmp_path: Path, capsys) -> None:
    code, _, err = run(["serve", "--index", str(tmp_path), "--port", "99999", "--batch-workers", "0"], capsys)
    line = one_line_error(code, err)
    assert line.startswith("research serve: error: --port: Input should be less than or equal to 65535")
    assert "--batch-workers: Input should be greater than or equal to 1" in line
    code, _, err = run(["serve", "--index", str(tmp_path / "none")], capsys)
    assert "research serve: error:" in one_line_error(code, err)
    code, _, err = run(["index", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "i"),
                        "--shard-size", "0"], capsys)
    assert one_line_error(code, err).startswith("research index: error: --shard-size: Input should be greater")
    code, _, err = run(["index", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "i")], capsys)
    assert "c.jsonl: No such file or directory" in one_line_error(code, err)


@pytest.mark.parametrize("argv", [["demo", "learner.lrr=1"], ["serve", "--index", ".", "--port", "-1"]])
def test_errors_exit_2_with_one_line_and_no_traceback(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = one_line_error(result.returncode, result.stderr)
    assert line.startswith(f"research {argv[0]}: error: ")


def test_index_refuses_a_bad_factory_before_encoding(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"id": "{i}", "contents": "passage {i}"}}\n' for i in range(3)))
    for factory, reason in (("Bogus", "could not parse"), ("IVF16,PQ7", "multiple of")):
        code, _, err = run(["index", "--corpus", str(corpus), "--out", str(tmp_path / "index"), "--factory", factory,
                            "--no-progress"], capsys)
        line = one_line_error(code, err)
        assert f"--factory '{factory}'" in line and "384-d" in line and reason in line
        assert not (tmp_path / "index" / "build").exists()  # nothing was encoded


def test_long_running_commands_log_progress_without_a_line_per_http_request() -> None:
    """httpx logs every request at INFO; the driver's searches (warm start, pool filter) made hundreds of lines."""
    script = ("import logging, httpx\n"
              "from cluster.cli import log_progress\n"
              "log_progress('%(name)s %(message)s')\n"
              "httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200))).get('http://retrieval/')\n"
              "logging.getLogger('research.train').info('step 1: reward 0.5')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert "research.train step 1: reward 0.5" in done.stderr
    assert "HTTP Request" not in done.stderr
