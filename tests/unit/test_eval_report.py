"""Eval tables: means over records, LJ from verdicts (unjudged never correct), the paper's numbers beside ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.eval_report import (
    check_meta,
    read_records_file,
    render_markdown,
    summarize,
    table_notes,
    write_tables,
)
from cluster.paper_results import PAPER_RESULTS, canonical_benchmark, paper_model, paper_numbers


def _record(em: float, verdict: str | None, searches: int = 1) -> dict:
    return {"em": em, "f1": max(em, 0.5), "cover_em": em, "format_valid": True, "num_searches": searches,
            "response_tokens": 100, "reward": 0.5, "end_reason": "eos",
            "judge": {"status": verdict, "rationale": ""} if verdict else None}


@pytest.mark.parametrize(("name", "row"), [
    ("Qwen/Qwen2.5-7B-Instruct", "ReSearch-Qwen-7B-Instruct"),
    ("Qwen/Qwen2.5-7B", "ReSearch-Qwen-7B"),
    ("Qwen/Qwen2.5-32B-Instruct", "ReSearch-Qwen-32B-Instruct"),
    ("agentrl/ReSearch-Qwen-32B", "ReSearch-Qwen-32B"),
    ("/ckpt/qwen2.5-7b-instruct-step100", "ReSearch-Qwen-7B-Instruct"),
    ("Qwen/Qwen2.5-3B-Instruct", None),
    ("Qwen/Qwen2-7B-Instruct", None),
    ("smollm2-135m-instruct", None),
    ("tiny-random-qwen2", None),
])
def test_paper_model_of_a_policy(name: str, row: str | None) -> None:
    assert paper_model(name) == row


def test_benchmark_names_and_paper_numbers() -> None:
    assert canonical_benchmark("flashrag_bamboogle_test.jsonl") == "bamboogle"
    assert canonical_benchmark("lag_2wiki_dev4000.json") == "2wikimultihopqa"
    assert canonical_benchmark("world") is None
    assert paper_numbers("Qwen/Qwen2.5-7B-Instruct", "hotpotqa") == ("ReSearch-Qwen-7B-Instruct", 43.52, 63.62)
    assert paper_numbers("Qwen/Qwen2.5-32B-Instruct", "bamboogle") == ("ReSearch-Qwen-32B-Instruct", 56.80, 67.20)
    assert paper_numbers("Qwen/Qwen2.5-7B-Instruct", "world") is None
    assert all(set(row) == {"hotpotqa", "2wikimultihopqa", "musique", "bamboogle"} for row in PAPER_RESULTS.values())


def test_summary_is_the_mean_of_records_and_unjudged_is_not_correct(tmp_path: Path) -> None:
    records = [_record(1.0, "correct"), _record(0.0, "correct"), _record(0.0, "unjudged", 3), _record(0.0, None)]
    row = summarize("bamboogle", records, "Qwen/Qwen2.5-7B-Instruct", judged=True)
    assert row["em"] == 0.25 and row["lj"] == 0.5 and row["mean_searches"] == 1.5
    assert row["judged"] == 2 and row["unjudged"] == 2
    assert row["paper"]["model"] == "ReSearch-Qwen-7B-Instruct" and row["paper"]["em"] == pytest.approx(0.424)
    markdown = render_markdown([row], table_notes([row], "gpt-4o-mini at https://api"))
    assert "| bamboogle | 4 | 25.00 | 62.50 | 25.00 | 50.00 | 100.00 | 1.50 | 100.0 | 42.40 | 54.40 |" in markdown
    assert "2 unjudged" in markdown and "arXiv 2503.19470" in markdown

    unjudged_run = summarize("world", records, "tiny-random-qwen2", judged=False)
    assert unjudged_run["lj"] is None and unjudged_run["paper"] is None
    write_tables(tmp_path, [unjudged_run], None)
    text = (tmp_path / "results.md").read_text()
    assert "paper EM" not in text and "LJ is empty: no judge was configured" in text
    assert json.loads((tmp_path / "world" / "results.json").read_text())["em"] == 0.25


def test_records_file_drops_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "resp')
    assert [r["key"] for r in read_records_file(path)] == ["a", "b"]
    assert read_records_file(tmp_path / "missing.jsonl") == []


def test_meta_mismatch_is_refused_unless_restarting(tmp_path: Path) -> None:
    check_meta(tmp_path, {"model": "a", "topk": 5}, restart=False)
    check_meta(tmp_path, {"model": "a", "topk": 5}, restart=False)
    with pytest.raises(ValueError, match="model"):
        check_meta(tmp_path, {"model": "b", "topk": 5}, restart=False)
    check_meta(tmp_path, {"model": "b", "topk": 5}, restart=True)
