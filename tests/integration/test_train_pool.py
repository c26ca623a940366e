"""The RL pool filter (data.pool) against a real retrieval service over a small synthetic world: every kept question
is 2-hop, its first search misses the answer, its bridge route finds it, and no warm-start question is kept."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _config(world: Path, *pool: str):  # noqa: ANN202 - a JobConfig
    from cluster.config import load_config

    return load_config("test-tiny", [f"data.train_files=[{world / 'train.jsonl'}]",
                                     f"data.val_files=[{world / 'dev.jsonl'}]", f"retrieval.index_dir={world / 'index'}",
                                     "retrieval.topk=2", *pool])


def _questions(world: Path, config) -> list:  # noqa: ANN001
    from transformers import AutoTokenizer

    from cluster.job_setup import load_questions
    from cluster.models import tiny_policy_dir

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir())
    return load_questions([world / "train.jsonl"], tokenizer, config.rollout.prompt_template, 10**6)


def test_pool_keeps_only_two_hop_questions_the_second_search_answers(rollout_world: Path,
                                                                     retrieval_url: str) -> None:
    from cluster.train_pool import bridges, contains_answer, records_by_prompt_id, select_pool
    from cluster.warm_start import search_blocks

    config = _config(rollout_world, "data.pool.hops=[2]", "data.pool.first_search_misses=true",
                     "data.pool.second_search_finds=true", "data.pool.exclude_warm_start=true")
    questions = _questions(rollout_world, config)
    records = records_by_prompt_id([rollout_world / "train.jsonl"])
    two_hop = [q for q in questions if records[q.prompt_id].metadata["hops"] == 2]
    warm = {str(records[two_hop[0].prompt_id].id), str(records[two_hop[1].prompt_id].id)}

    kept, report = select_pool(config, questions, [rollout_world / "train.jsonl"], [retrieval_url], warm)

    assert kept and report.kept == [q.prompt_id for q in kept]
    assert report.total == len(questions) and report.total - len(kept) == sum(report.dropped.values())
    assert report.dropped["hops"] == len(questions) - len(two_hop)
    assert report.dropped["warm_start"] == 2 and not {str(records[q.prompt_id].id) for q in kept} & warm
    # The filter is not vacuous on this world: some 2-hop questions' first search already returns the answer.
    assert report.dropped["first_search_answers"] > 0
    # Checked again here, query by query, through the same service: what the filter promises holds.
    bridge = bridges([rollout_world / "train.jsonl"], records)
    queries = [text for q in kept for text in (q.text.rstrip("?").strip(), bridge[q.prompt_id])]
    blocks = asyncio.run(search_blocks([retrieval_url], queries, 2, config.retrieval.result_format))
    for k, question in enumerate(kept):
        assert records[question.prompt_id].metadata["hops"] == 2
        assert not contains_answer(blocks[2 * k], question.golden_answers), question.text
        assert bridge[question.prompt_id].lower() in blocks[2 * k].lower()
        assert contains_answer(blocks[2 * k + 1], question.golden_answers), question.text


def test_pool_without_filters_keeps_everything_and_training_pool_writes_its_report(
        rollout_world: Path, retrieval_url: str, tmp_path: Path) -> None:
    from cluster.train_pool import POOL_FILE, select_pool, training_pool

    plain = _config(rollout_world)
    questions = _questions(rollout_world, plain)
    kept, report = select_pool(plain, questions, [rollout_world / "train.jsonl"], [retrieval_url])
    assert kept == questions and report.dropped == {}
    assert training_pool(plain, questions, [rollout_world / "train.jsonl"], [retrieval_url], "", tmp_path) == questions
    assert not (tmp_path / POOL_FILE).exists()  # nothing filtered, nothing to report

    first_only = _config(rollout_world, "data.pool.first_search_misses=true")
    kept = training_pool(first_only, questions, [rollout_world / "train.jsonl"], [retrieval_url], "", tmp_path)
    written = json.loads((tmp_path / POOL_FILE).read_text())
    assert written["kept"] == [q.prompt_id for q in kept] and written["total"] == len(questions)
    assert 0 < written["kept_count"] < len(questions)
