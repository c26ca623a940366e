"""Eval records on disk (JSON Lines, resumable) and the results tables built from them (JSON + markdown).

One directory per benchmark under the eval's output directory:
    <out>/<benchmark>/records.jsonl   one record per question: question, golden answers, full response, extracted
                                      answer, searches, EM, F1, cover-EM, judge verdict, ...
    <out>/<benchmark>/results.{json,md}
    <out>/results.{json,md}           every benchmark of the run in one table
    <out>/eval_meta.json              what produced the records (model, template, sampling): resume checks it
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cluster.paper_results import PAPER, paper_numbers

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
META = "eval_meta.json"


# ---------------------------------------------------------------------------------------------- records


def read_records_file(path: Path) -> list[dict[str, Any]]:
    """The complete records of a records file; a line cut short by a killed eval is dropped (and redone)."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: line %d is incomplete (interrupted write); that question is redone", path, number)
    return records


def write_records_file(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace a records file atomically (a crash leaves the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)


class RecordsWriter:
    """Appends one record per finished question and flushes it, so an interrupted eval loses at most one line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        """Write one record line and push it to the OS."""
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


def check_meta(out_dir: Path, meta: dict[str, Any], restart: bool) -> None:
    """Refuse to resume records made by a different model or setting (unless restarting); then record `meta`."""
    path = out_dir / META
    if path.is_file() and not restart:
        previous = json.loads(path.read_text())
        differing = sorted(key for key in set(previous) | set(meta) if previous.get(key) != meta.get(key))
        if differing:
            raise ValueError(
                f"{out_dir} holds records of a different eval ({', '.join(differing)} differ); "
                "use another --out or --restart to discard them"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- tables


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(benchmark: str, records: Sequence[dict[str, Any]], policy_name: str, judged: bool) -> dict[str, Any]:
    """The results row of one benchmark: means over its records (fractions, not percent) and the paper's numbers."""
    count = len(records)
    verdicts = [r.get("judge") for r in records]
    statuses = [v["status"] if v else None for v in verdicts]
    end_reasons: dict[str, int] = {}
    for record in records:
        end_reasons[record["end_reason"]] = end_reasons.get(record["end_reason"], 0) + 1
    row: dict[str, Any] = {
        "benchmark": benchmark,
        "questions": count,
        "em": _mean([r["em"] for r in records]),
        "f1": _mean([r["f1"] for r in records]),
        "cover_em": _mean([r["cover_em"] for r in records]),
        # Unjudged verdicts count as not correct: LJ never rewards a judge failure.
        "lj": _mean([float(s == "correct") for s in statuses]) if judged and count else None,
        "judged": sum(s in ("correct", "incorrect") for s in statuses),
        "unjudged": sum(s == "unjudged" for s in statuses) + (sum(s is None for s in statuses) if judged else 0),
        "format_valid": _mean([float(r["format_valid"]) for r in records]),
        "mean_searches": _mean([r["num_searches"] for r in records]),
        "mean_response_tokens": _mean([r["response_tokens"] for r in records]),
        "mean_reward": _mean([r["reward"] for r in records]),
        "end_reasons": end_reasons,
        "paper": None,
    }
    reported = paper_numbers(policy_name, benchmark)
    if reported is not None:
        model, em, lj = reported
        row["paper"] = {"model": model, "em": em / 100, "lj": lj / 100, "source": PAPER}
    return row


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def render_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    """A markdown results table (percentages like the paper) followed by notes on how to read it."""
    with_paper = any(row["paper"] for row in rows)
    header = ["benchmark", "n", "EM", "F1", "cover-EM", "LJ", "format-valid", "searches", "response tokens"]
    if with_paper:
        header += ["paper EM", "paper LJ"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["benchmark"], str(row["questions"]), _percent(row["em"]), _percent(row["f1"]),
                 _percent(row["cover_em"]), _percent(row["lj"]), _percent(row["format_valid"]),
                 _number(row["mean_searches"]), _number(row["mean_response_tokens"], 1)]
        if with_paper:
            paper = row["paper"]
            cells += [_percent(paper["em"]), _percent(paper["lj"])] if paper else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def table_notes(rows: Sequence[dict[str, Any]], judge_description: str | None) -> list[str]:
    """How to read the table: metrics in percent, where LJ comes from (or why it is empty), the paper's row."""
    notes = ["EM, F1, cover-EM, LJ and format-valid in percent; searches and response tokens (generated, "
             "retrieved text excluded) are means per question; greedy decoding."]
    if judge_description is None:
        notes.append("LJ is empty: no judge was configured (pass --judge-url and --judge-model to fill it).")
    else:
        unjudged = sum(row["unjudged"] for row in rows)
        notes.append(f"LJ judged by {judge_description}" + (
            f"; {unjudged} unjudged answers (judge failures) count as incorrect." if unjudged else "."))
    models = sorted({row["paper"]["model"] for row in rows if row["paper"]})
    if models:
        notes.append(f"paper EM/LJ: {', '.join(models)} as reported in {PAPER} (full dev/test sets, wiki-18, "
                     "gpt-4o-mini judge); ours are on the files and corpus of this run.")
    return notes


def write_tables(out_dir: Path, rows: Sequence[dict[str, Any]], judge_description: str | None) -> Path:
    """Write results.json and results.md for each benchmark and for the whole run; returns the run's markdown."""
    notes = table_notes(rows, judge_description)
    for row in rows:
        directory = out_dir / row["benchmark"]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps(row, indent=2) + "\n")
        (directory / "results.md").write_text(render_markdown([row], table_notes([row], judge_description)))
    (out_dir / "results.json").write_text(
        json.dumps({"benchmarks": list(rows), "judge": judge_description, "notes": notes}, indent=2) + "\n"
    )
    markdown = out_dir / "results.md"
    markdown.write_text(render_markdown(rows, notes))
    return markdown
