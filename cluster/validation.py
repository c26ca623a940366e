"""Validation one can believe: per-question results, greedy and sampled, and the before/after change with a paired
bootstrap interval.

Greedy validation alone hides what GRPO changes: a greedy trajectory flips only when the most likely token does, so
24 questions answered greedily measured nothing but one 1-hop question flipping (issue 20). Sampling
`trainer.val_samples` trajectories per question at the training temperature measures the policy GRPO actually
updates, and averaging them per question makes each question's score finer than 0/1.

    per_question(batches)        -> {prompt id: {reward, f1, searches, correct_two_search, samples}} (means)
    validation_results(...)      -> scalars (greedy: val/reward, val/reward_2hop, val/searches_2hop ...; sampled:
                                    the same names with _sampled, plus a bootstrap interval of each per-hop reward)
                                    and the per-question results of both modes
    learning_block(first, last)  -> the summary's "learning" entry: 2-hop sampled reward before and after, its paired
                                    bootstrap 95 % interval (questions resampled with replacement, the same draw for
                                    both ends), and 2-hop sampled searches before and after

ValidationLog appends each validation's per-question results to run_dir/validation.jsonl, so the first and the last
validation survive a --resume and the interval can be recomputed from the run directory alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

VALIDATION_FILE = "validation.jsonl"
LEARNING_METRIC = "val/reward_2hop_sampled"
BOOTSTRAP_DRAWS = 10_000
_FIELDS = ("reward", "f1", "searches", "correct_two_search")


def per_question(batches: list[pa.RecordBatch]) -> dict[str, dict[str, float]]:
    """Each question's means over its trajectories: reward, F1, searches, and the share that searched at least
    twice and answered exactly (the behaviour the learn-cpu run is after); `samples` counts the trajectories."""
    if not batches:
        return {}
    table = pa.Table.from_batches(batches)
    ids = table.column("prompt_id").to_pylist()
    reward = table.column("reward").to_numpy(zero_copy_only=False)
    f1 = table.column("f1").to_numpy(zero_copy_only=False)
    em = table.column("em").to_numpy(zero_copy_only=False)
    searches = table.column("num_searches").to_numpy(zero_copy_only=False)
    rows: dict[str, list[int]] = {}
    for row, prompt_id in enumerate(ids):
        rows.setdefault(prompt_id, []).append(row)
    results = {}
    for prompt_id, index in rows.items():
        picked = np.array(index)
        results[prompt_id] = {
            "reward": float(reward[picked].mean()), "f1": float(f1[picked].mean()),
            "searches": float(searches[picked].mean()),
            "correct_two_search": float(((searches[picked] >= 2) & (em[picked] >= 1.0)).mean()),
            "samples": float(len(index)),
        }
    return results


def bootstrap_mean_ci(values: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of `values` (one value per question)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, values.size, size=(draws, values.size))
    means = values[picks].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap_ci(before: np.ndarray, after: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                        seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of mean(after - before) over paired questions: each draw resamples
    questions with replacement and takes both ends of the same questions, so between-question spread cancels."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape:
        raise ValueError(f"paired values need equal shapes, got {before.shape} and {after.shape}")
    return bootstrap_mean_ci(after - before, draws, seed)


def _mode_scalars(results: dict[str, dict[str, float]], hops: dict[str, int], suffix: str,
                  with_ci: bool) -> dict[str, float]:
    """Means over questions of one mode, overall and per hop count; sampled modes get a bootstrap interval of the
    per-hop reward (val/reward_2hop_sampled_ci_lo / _ci_hi) for the curves."""
    if not results:
        return {}
    scalars = {}
    groups: dict[str, list[str]] = {"": list(results)}
    for prompt_id in results:
        if prompt_id in hops:
            groups.setdefault(f"_{hops[prompt_id]}hop", []).append(prompt_id)
    for tag, ids in sorted(groups.items()):
        for name in _FIELDS:
            scalars[f"val/{name}{tag}{suffix}"] = float(np.mean([results[i][name] for i in ids]))
        if with_ci and tag:
            low, high = bootstrap_mean_ci(np.array([results[i]["reward"] for i in ids]))
            scalars[f"val/reward{tag}{suffix}_ci_lo"], scalars[f"val/reward{tag}{suffix}_ci_hi"] = low, high
    return scalars


def validation_results(greedy: list[pa.RecordBatch], sampled: list[pa.RecordBatch],
                       hops: dict[str, int]) -> tuple[dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Scalars and per-question results of one validation: greedy trajectories (one per question) under the
    established names (val/reward, val/reward_2hop, val/searches_2hop ...), sampled ones with a _sampled suffix."""
    results = {"greedy": per_question(greedy), "sampled": per_question(sampled)}
    scalars = {**_mode_scalars(results["greedy"], hops, "", with_ci=False),
               **_mode_scalars(results["sampled"], hops, "_sampled", with_ci=True)}
    return scalars, results


def learning_block(first: dict[str, Any], last: dict[str, Any], hops: int = 2,
                   draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict[str, Any]:
    """The summary's "learning" entry from two ValidationLog records (the first and the last validation): sampled
    reward of the `hops`-hop questions both saw, before and after, with the paired bootstrap 95 % interval of the
    change, and their sampled searches per trajectory before and after."""
    before_q, after_q = first["sampled"], last["sampled"]
    ids = sorted(i for i in before_q if i in after_q and first["hops"].get(i) == hops)
    if not ids:
        raise ValueError(f"no {hops}-hop question has sampled results in both validations")
    before = np.array([before_q[i]["reward"] for i in ids])
    after = np.array([after_q[i]["reward"] for i in ids])
    searches_before = np.array([before_q[i]["searches"] for i in ids])
    searches_after = np.array([after_q[i]["searches"] for i in ids])
    low, high = paired_bootstrap_ci(before, after, draws, seed)
    searches_low, searches_high = paired_bootstrap_ci(searches_before, searches_after, draws, seed)
    return {
        "metric": f"val/reward_{hops}hop_sampled", "n_questions": len(ids),
        "samples_per_question": int(before_q[ids[0]]["samples"]),
        "step_before": first["step"], "step_after": last["step"],
        "before": float(before.mean()), "after": float(after.mean()), "change": float(after.mean() - before.mean()),
        "ci95": [low, high],
        f"searches_{hops}hop_before": float(searches_before.mean()),
        f"searches_{hops}hop_after": float(searches_after.mean()),
        "searches_ci95": [searches_low, searches_high],
    }


class ValidationLog:
    """Per-question results of every validation, appended to run_dir/validation.jsonl; scalars for the metrics."""

    def __init__(self, run_dir: str | Path, hops: dict[str, int]) -> None:
        self.path = Path(run_dir) / VALIDATION_FILE
        self.hops = hops

    def observe(self, step: int, greedy: list[pa.RecordBatch], sampled: list[pa.RecordBatch]) -> dict[str, float]:
        """Record one validation (greedy and sampled batches as the rollout actors return them); its scalars."""
        scalars, results = validation_results(greedy, sampled, self.hops)
        asked = set(results["greedy"]) | set(results["sampled"])
        record = {"step": step, "hops": {i: self.hops[i] for i in sorted(asked) if i in self.hops}, **results}
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return scalars

    def learning(self) -> dict[str, Any] | None:
        """The "learning" block from the first and the last validation on file; None without two sampled ones."""
        return learning_from_file(self.path.parent)


def read_validations(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of run_dir/validation.jsonl, in order."""
    path = Path(run_dir) / VALIDATION_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def learning_from_file(run_dir: str | Path) -> dict[str, Any] | None:
    """learning_block of run_dir's first and last validation with sampled 2-hop results; None when fewer than two."""
    records = [r for r in read_validations(run_dir)
               if any(r["hops"].get(i) == 2 for i in r.get("sampled", {}))]
    if len(records) < 2 or records[0]["step"] == records[-1]["step"]:
        return None
    return learning_block(records[0], records[-1])
