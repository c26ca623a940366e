"""Metric sinks: JSONL, TensorBoard event files, the curves PNG, and the dashboard command."""

from __future__ import annotations

import math
from pathlib import Path

from cluster.dashboard import tensorboard_command
from cluster.metrics import MetricsLogger, plot_curves, read_metrics


def test_logger_writes_jsonl_tensorboard_and_png(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log(step, {"reward/mean": 0.1 * step, "rollout/response_length": 50.0 + step,
                          "rollout/searches": 1.0, "loss": math.nan})
    logger.log(3, {"val/reward": 0.25})
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[0]["loss"] is None and records[2]["reward/mean"] == 0.30000000000000004
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == [0.10000000149011612, 0.20000000298023224, 0.30000001192092896]

    png = plot_curves(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_dashboard_command_points_at_tensorboard_dir(tmp_path: Path) -> None:
    (tmp_path / "tensorboard").mkdir()
    command = tensorboard_command(tmp_path, port=7007)
    assert command[1:] == ["--logdir", str(tmp_path / "tensorboard"), "--host", "127.0.0.1", "--port", "7007"]
