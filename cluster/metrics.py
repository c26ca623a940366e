"""One logging path for a run: JSONL file, TensorBoard scalars, optional W&B, Ray metrics, and the end-of-run PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

METRICS_FILE = "metrics.jsonl"
CURVES_PNG = "curves.png"
# The curves a ReSearch practitioner watches (paper Fig. 3/4): reward, response length, search calls; with sampled
# validation (trainer.val_samples) also the held-out 2-hop sampled reward and searches, the learning run's measure,
# drawn with their bootstrap 95 % intervals (val/..._ci_lo, _ci_hi) where logged.
CURVES = (
    ("reward/mean", ("val/reward", "val/reward_2hop_sampled"), "reward"),
    ("rollout/response_length", (), "response length (tokens)"),
    ("rollout/searches", ("val/searches_2hop_sampled",), "searches per trajectory"),
)


def batch_metrics(groups: list[pa.RecordBatch], policy_version: int) -> dict[str, float]:
    """Rollout-side scalars of a training batch: reward, format, answer quality, lengths, searches, staleness."""
    table = pa.Table.from_batches(groups)
    col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in (
        "reward", "format_valid", "f1", "em", "num_searches", "num_turns", "generated_tokens", "truncated",
        "retrieval_errors", "generation_seconds", "retrieval_seconds", "policy_version")}
    lengths = np.array([len(r) for r in table.column("response_ids").to_pylist()])
    # A search written in the last allowed turn is neither run nor counted: this says how often that happened.
    turn_cap = np.array([reason == "max_turns" for reason in table.column("end_reason").to_pylist()])
    staleness = policy_version - col["policy_version"]
    return {
        "reward/mean": float(col["reward"].mean()), "reward/std": float(col["reward"].std()),
        "reward/format_valid": float(col["format_valid"].mean()), "reward/f1": float(col["f1"].mean()),
        "reward/em": float(col["em"].mean()),
        "rollout/response_length": float(lengths.mean()), "rollout/generated_tokens": float(col["generated_tokens"].sum()),
        "rollout/searches": float(col["num_searches"].mean()), "rollout/turns": float(col["num_turns"].mean()),
        "rollout/truncated": float(col["truncated"].mean()), "rollout/ended_at_turn_cap": float(turn_cap.mean()), "rollout/retrieval_errors": float(col["retrieval_errors"].sum()),
        "rollout/generation_seconds": float(col["generation_seconds"].mean()),
        "rollout/retrieval_seconds": float(col["retrieval_seconds"].mean()),
        "staleness/mean": float(staleness.mean()), "staleness/max": float(staleness.max()),
        **{f"staleness/frac_{k}": float((staleness == k).mean()) for k in range(int(staleness.max()) + 1)},
        **by_searches(col["reward"], col["num_searches"]),
    }


def by_searches(reward: np.ndarray, searches: np.ndarray) -> dict[str, float]:
    """Share of the samples and their mean reward by search count (0, 1, 2, 3+): what GRPO sees a second search
    earn against one (reward/searches_2_mean vs reward/searches_1_mean); a count no sample had is left out."""
    out = {}
    for tag, picked in (("0", searches == 0), ("1", searches == 1), ("2", searches == 2), ("3+", searches >= 3)):
        out[f"reward/searches_{tag}_share"] = float(picked.mean())
        if picked.any():
            out[f"reward/searches_{tag}_mean"] = float(reward[picked].mean())
    return out


def validation_metrics(batches: list[pa.RecordBatch]) -> dict[str, float]:
    """Means of greedy validation rollouts: reward, format validity, answer F1/EM and searches."""
    if not batches:
        return {}
    table = pa.Table.from_batches(batches)
    mean = {k: float(np.mean(table.column(k).to_numpy(zero_copy_only=False))) for k in
            ("reward", "format_valid", "f1", "em", "num_searches")}
    return {"val/reward": mean["reward"], "val/format_valid": mean["format_valid"], "val/f1": mean["f1"],
            "val/em": mean["em"], "val/searches": mean["num_searches"]}


class MetricsLogger:
    """Writes each step's scalars to run_dir/metrics.jsonl, TensorBoard, W&B (when configured) and Ray metrics."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            import wandb  # optional: only when configured

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=str(self.run_dir))
        self._gauges: dict[str, Any] = {}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record one step's scalars everywhere; non-finite values are written to JSONL as null."""
        if not scalars:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None}
        record = {"step": step, "time": time.time(),
                  **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        self._export_ray(clean)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A text entry (markdown) in TensorBoard, e.g. a sample trajectory; JSONL holds scalars only."""
        if self._tb is not None:
            self._tb.add_text(tag, text, step)
            self._tb.flush()

    def _export_ray(self, scalars: dict[str, float]) -> None:
        """Ray metrics (Prometheus via the dashboard) when this process is attached to a Ray cluster."""
        try:
            import ray
            from ray.util.metrics import Gauge
        except ImportError:
            return
        if not ray.is_initialized():
            return
        for key, value in scalars.items():
            name = "research_" + "".join(c if c.isalnum() else "_" for c in key)
            if name not in self._gauges:
                self._gauges[name] = Gauge(name, description=key)
            if math.isfinite(value):
                self._gauges[name].set(value)

    def close(self) -> None:
        """Flush and close every sink."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(run_dir: str | Path) -> Path:
    """Write run_dir/curves.png: reward (train and validation), response length and searches per trajectory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cluster.validation import learning_from_file

    records = read_metrics(run_dir)
    learning = learning_from_file(run_dir)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    for axis, (train_key, val_keys, title) in zip(axes, CURVES, strict=True):
        series = [(train_key, "train", "-o")]
        series += [(key, "validation (greedy)" if key == "val/reward" else key.removeprefix("val/"), "--s") for key in val_keys]
        for key, label, style in series:
            points = [(r["step"], r[key], r.get(f"{key}_ci_lo"), r.get(f"{key}_ci_hi")) for r in records
                      if r.get(key) is not None]
            if not points:
                continue
            steps, values, lows, highs = zip(*points, strict=True)
            if all(v is not None for v in lows + highs):  # a bootstrap 95 % interval of the mean over questions
                errors = [[v - lo for v, lo in zip(values, lows, strict=True)],
                          [hi - v for v, hi in zip(values, highs, strict=True)]]
                axis.errorbar(steps, values, yerr=errors, fmt=style, markersize=3, capsize=3, label=label + " (95% CI)")
            else:
                axis.plot(steps, values, style, markersize=3, label=label)
        if learning is not None and train_key == "reward/mean":
            low, high = learning["ci95"]
            title += (f"\n2-hop sampled {learning['before']:.3f} -> {learning['after']:.3f}, "
                      f"change 95% CI [{low:+.3f}, {high:+.3f}]")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if val_keys:
            axis.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / CURVES_PNG
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def portable(value: Any, run_dir: str | Path) -> Any:
    """`value` (a summary: dicts, lists, strings) with paths inside run_dir made relative to it, so a committed
    summary.json names no machine's directories."""
    root = str(Path(run_dir).absolute())
    if isinstance(value, dict):
        return {key: portable(item, run_dir) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [portable(item, run_dir) for item in value]
    if isinstance(value, str) and (value == root or value.startswith(root + "/")):
        return value[len(root) + 1:] or "."
    return value
