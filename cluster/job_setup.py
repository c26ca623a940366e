"""What a job needs before its first step: questions as prompt ids, a corpus index, and retrieval service URLs.

With no data files configured, the job uses the synthetic world of `data.world_seed` / `data.world_passages`, and its
index, both cached under $RESEARCH_CACHE/worlds so that repeated runs (tests, the demo) build them once.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from actors.prompts import Question, build_prompt_ids
from cluster.config import JobConfig
from cluster.models import cache_root

log = logging.getLogger(__name__)


def world_dir(config: JobConfig) -> Path:
    """The cached synthetic world (and its index) of this config's seed and size."""
    dev = f"-dev{config.data.world_dev}" if config.data.world_dev is not None else ""
    return cache_root() / "worlds" / f"seed{config.data.world_seed}-n{config.data.world_passages}{dev}"


def ensure_world(config: JobConfig) -> Path:
    """Generate the synthetic world once; later calls reuse it."""
    from qa.world import generate_world

    directory = world_dir(config)
    if not (directory / "world.json").is_file():
        generate_world(directory, seed=config.data.world_seed, num_passages=config.data.world_passages,
                       num_dev=config.data.world_dev)
    return directory


def ensure_index(config: JobConfig) -> Path:
    """The index the job serves: retrieval.index_dir when set, else the synthetic world's (built once, resumable)."""
    if config.retrieval.index_dir:
        return Path(config.retrieval.index_dir)
    from retrieval_service.build import build_index

    world = ensure_world(config)
    build_index(world / "corpus.jsonl", world / "index", config.retrieval.encoder, factory="Flat")
    return world / "index"


def data_files(config: JobConfig) -> tuple[list[Path], list[Path]]:
    """Training and validation files: the configured ones, or the synthetic world's train/dev."""
    if config.data.train_files:
        train = [Path(f) for f in config.data.train_files]
        val = [Path(f) for f in config.data.val_files]
        return train, val
    directory = ensure_world(config)
    return [directory / "train.jsonl"], [Path(f) for f in config.data.val_files] or [directory / "dev.jsonl"]


def load_questions(files: list[Path], tokenizer: Any, template: str, max_prompt_tokens: int,
                   limit: int | None = None, sample_seed: int | None = None,
                   per_hop: dict[int, int] | None = None) -> list[Question]:
    """Read questions in any format qa/ reads and tokenise their prompts; over-long prompts are dropped and counted.

    With `sample_seed`, `limit` questions are drawn at random (the paper's 100-question validation subset);
    otherwise the first `limit` are kept. `per_hop` ({hops: count}, with `sample_seed`) draws that many questions of
    each hop count (metadata.hops) instead, so a validation set can hold enough 2-hop questions to measure them.
    """
    from qa.readers import read_records

    records = [record for path in files for record in read_records(path)]
    if per_hop:
        rng, drawn = random.Random(sample_seed), []
        for hops, count in sorted(per_hop.items()):
            matching = [record for record in records if record.metadata.get("hops") == hops]
            if len(matching) < count:
                raise ValueError(f"{count} {hops}-hop questions wanted, {', '.join(map(str, files))} hold "
                                 f"{len(matching)} (raise data.world_dev for the synthetic world)")
            drawn += rng.sample(matching, count)
        records = drawn
    elif sample_seed is not None and limit is not None and limit < len(records):
        records = random.Random(sample_seed).sample(records, limit)
    elif limit is not None:
        records = records[:limit]
    questions, too_long = [], 0
    for record in records:
        ids = build_prompt_ids(record.question, template, tokenizer)
        if len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        questions.append(Question(f"{record.source}:{record.id}", ids, list(record.golden_answers), record.question))
    if too_long:
        log.warning("dropped %d questions whose prompts exceed %d tokens", too_long, max_prompt_tokens)
    if not questions:
        raise ValueError(f"no usable questions in {', '.join(map(str, files))}")
    return questions
