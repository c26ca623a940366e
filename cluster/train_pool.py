"""The RL training pool: which training questions GRPO samples, by the filters of `data.pool` (our addition).

GRPO can only teach a behaviour that earns more than the alternatives. On 2-hop questions of the synthetic world
whose answer already shows up in the first search's results (the question as the query), one search earns full
reward and a second one is wasted tokens, so a policy that searches once is right and GRPO reinforces that
shortcut (bench/RESULTS.md, "search habits"). `data.pool` narrows the pool to questions where the target
behaviour is the rewarded path:

    hops                 keep questions of these hop counts (metadata.hops)
    first_search_misses  drop those whose first search returns a golden answer at retrieval.topk
    second_search_finds  keep 2-hop ones where the first result names the bridge and a search for it finds an answer
    exclude_warm_start   drop the questions the format warm start imitated (its warm_start.json lists them)

Every check goes through the real retrieval service with the rollout's own result formatting (the warm start's
`search_blocks`), so a question is judged by exactly the text a policy would read. A few hundred searches take
seconds, so nothing is cached; run_dir/pool.json records the counts and the kept question ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.prompts import Question
from cluster.config import JobConfig, TrainPoolConfig

log = logging.getLogger("research.train_pool")
POOL_FILE = "pool.json"


@dataclass
class PoolReport:
    """What the filters did: questions before, how many each filter dropped, and the ids kept."""

    total: int
    dropped: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (run_dir/pool.json)."""
        return {"total": self.total, "kept_count": len(self.kept), "dropped": self.dropped, "kept": self.kept}


def pool_active(pool: TrainPoolConfig) -> bool:
    """Whether any filter is on."""
    return bool(pool.hops or pool.first_search_misses or pool.second_search_finds or pool.exclude_warm_start)


def contains_answer(block: str, golden_answers: Sequence[str]) -> bool:
    """Whether a result block holds a golden answer (case-insensitive substring, the warm start's test)."""
    text = block.lower()
    return any(answer.lower() in text for answer in golden_answers if answer)


def records_by_prompt_id(files: Sequence[Path]) -> dict[str, Any]:
    """{prompt id: QA record} as load_questions names them."""
    from qa.readers import read_records

    return {f"{record.source}:{record.id}": record for path in files for record in read_records(path)}


def warm_start_question_ids(policy_path: str | Path) -> set[str]:
    """The raw question ids the warm start trained on, from the warm-started policy's manifest (none if absent)."""
    from cluster.warm_start import MANIFEST

    manifest = Path(policy_path) / MANIFEST
    if not manifest.is_file():
        return set()
    return {str(i) for i in json.loads(manifest.read_text()).get("question_ids", [])}


def bridges(files: Sequence[Path], records: dict[str, Any]) -> dict[str, str]:
    """{prompt id: bridge entity} of the 2-hop records: the title of their last supporting passage, read from the
    synthetic world's corpus.jsonl beside the question file."""
    from cluster.warm_start import _passage_titles

    found: dict[str, str] = {}
    for path in files:
        wanted = {pid: r for pid, r in records.items() if r.metadata.get("hops") == 2
                  and r.metadata.get("supporting_ids")}
        if not wanted:
            continue
        titles = _passage_titles(Path(path).parent / "corpus.jsonl",
                                 {str(r.metadata["supporting_ids"][-1]) for r in wanted.values()})
        found.update({pid: titles[str(r.metadata["supporting_ids"][-1])] for pid, r in wanted.items()
                      if str(r.metadata["supporting_ids"][-1]) in titles})
    return found


def select_pool(config: JobConfig, questions: list[Question], files: Sequence[Path], urls: list[str],
                warm_ids: set[str] | None = None) -> tuple[list[Question], PoolReport]:
    """The questions `data.pool` keeps, in their original order, and what each filter dropped.

    `warm_ids` are the raw ids of the warm start's questions (warm_start_question_ids)."""
    from cluster.warm_start import expert_query, search_blocks

    pool, warm_ids = config.data.pool, warm_ids or set()
    report = PoolReport(total=len(questions))
    if not pool_active(pool):
        report.kept = [q.prompt_id for q in questions]
        return list(questions), report
    records = records_by_prompt_id(files)
    kept = list(questions)

    def keep(name: str, test: Any) -> None:
        nonlocal kept
        before = len(kept)
        kept = [q for q in kept if test(q)]
        report.dropped[name] = before - len(kept)

    if pool.hops:
        keep("hops", lambda q: q.prompt_id in records and records[q.prompt_id].metadata.get("hops") in pool.hops)
    if pool.exclude_warm_start:
        keep("warm_start", lambda q: q.prompt_id not in records or str(records[q.prompt_id].id) not in warm_ids)
    topk, style = config.retrieval.topk, config.retrieval.result_format
    if pool.first_search_misses and kept:
        first = asyncio.run(search_blocks(urls, [expert_query(_expert(q)) for q in kept], topk, style))
        misses = {q.prompt_id for q, block in zip(kept, first, strict=True) if not contains_answer(block, q.golden_answers)}
        keep("first_search_answers", lambda q: q.prompt_id in misses)
    if pool.second_search_finds and kept:
        bridge = bridges(files, records)
        keep("no_bridge", lambda q: q.prompt_id in bridge)
        routed = kept
        blocks = asyncio.run(search_blocks(urls, [query for q in routed for query in
                                                  (expert_query(_expert(q)), bridge[q.prompt_id])], topk, style))
        reachable = {q.prompt_id for k, q in enumerate(routed)
                     if bridge[q.prompt_id].lower() in blocks[2 * k].lower()
                     and contains_answer(blocks[2 * k + 1], q.golden_answers)}
        keep("second_search_misses", lambda q: q.prompt_id in reachable)
    report.kept = [q.prompt_id for q in kept]
    log.info("training pool: %d of %d questions kept (dropped: %s)", len(kept), len(questions),
             ", ".join(f"{k} {v}" for k, v in report.dropped.items()))
    if not kept:
        raise ValueError(f"data.pool kept none of the {len(questions)} training questions ({report.dropped})")
    return kept, report


def _expert(question: Question) -> Any:
    """The question as the warm start's expert sees it (only its text matters for the query)."""
    from cluster.warm_start import ExpertQuestion

    return ExpertQuestion(question.prompt_id, question.text, list(question.golden_answers), "")


def training_pool(config: JobConfig, questions: list[Question], files: Sequence[Path], urls: list[str],
                  policy_path: str, run_dir: Path | None = None) -> list[Question]:
    """The job's RL pool: `select_pool` with the warm start's questions read from `policy_path`; writes
    run_dir/pool.json when any filter is on."""
    if not pool_active(config.data.pool):
        return questions
    warm = warm_start_question_ids(policy_path) if config.data.pool.exclude_warm_start else set()
    if config.data.pool.exclude_warm_start and config.warm_start.enabled and not warm:
        raise ValueError(f"data.pool.exclude_warm_start: no warm-start manifest with question ids in {policy_path}")
    kept, report = select_pool(config, questions, files, urls, warm)
    if run_dir is not None:
        (Path(run_dir) / POOL_FILE).write_text(json.dumps(report.as_dict(), indent=2))
    return kept
