"""The synthetic multi-hop world: invented entities, a wiki-18 style corpus, and FlashRAG-format questions.

Names are invented from syllables, so a model cannot answer from memory and reward comes only through search.
`generate_world` writes corpus.jsonl, train.jsonl, dev.jsonl and world.json; the same seed gives byte-identical
files. `research world --out DIR --seed S` runs it from the command line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qa.world_entities import build_world, entity_counts
from qa.world_names import NameForge
from qa.world_passages import CorpusWriter
from qa.world_questions import Question, QuestionPool

WRITE_BUFFER = 1 << 20


@dataclass(frozen=True)
class WorldSummary:
    """What `generate_world` wrote: exact counts and the four file paths."""

    seed: int
    num_passages: int
    num_train: int
    num_dev: int
    corpus_path: Path
    train_path: Path
    dev_path: Path
    world_path: Path


def default_split_sizes(num_passages: int) -> tuple[int, int]:
    """Default (num_train, num_dev): train about half the corpus size, dev ~10% of train capped at 500."""
    num_train = max(20, num_passages // 2)
    return num_train, min(500, max(10, num_train // 10))


def generate_world(out_dir: str | Path, *, seed: int = 0, num_passages: int = 2000, num_train: int | None = None,
                   num_dev: int | None = None) -> WorldSummary:
    """Generate a world from `seed` and write its corpus, train and dev questions and summary into `out_dir`."""
    if num_passages < 1:
        raise ValueError(f"num_passages must be positive, got {num_passages}")
    default_train, default_dev = default_split_sizes(num_passages)
    num_train = default_train if num_train is None else num_train
    num_dev = default_dev if num_dev is None else num_dev
    if num_train < 0 or num_dev < 0:
        raise ValueError(f"num_train and num_dev must be >= 0, got {num_train} and {num_dev}")

    rng = random.Random(seed)
    forge = NameForge(rng)
    counts = entity_counts(num_passages)
    world = build_world(rng, forge, counts)
    corpus = CorpusWriter(rng, forge, world)
    corpus.render(num_passages)

    # Shuffle so that a passage id says nothing about what kind of passage it is.
    order = list(range(len(corpus.passages)))
    rng.shuffle(order)
    corpus_id = [0] * len(order)
    for new_id, old in enumerate(order):
        corpus_id[old] = new_id

    pool = QuestionPool(random.Random(seed + 1), world)
    capacity = pool.capacity
    if num_train + num_dev > capacity:
        raise ValueError(f"the world holds {capacity} distinct questions but num_train + num_dev = "
                         f"{num_train + num_dev}; raise num_passages or lower num_train/num_dev")
    # Dev is drawn first so that it does not change when only num_train changes.
    dev = pool.draw(num_dev)
    train = pool.draw(num_train)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("corpus", "train", "dev")}
    with open(paths["corpus"], "w", encoding="utf-8", buffering=WRITE_BUFFER) as f:
        dumps = json.dumps
        for new_id, old in enumerate(order):
            title, text = corpus.passages[old]
            f.write(f'{{"id": "{new_id}", "contents": {dumps(chr(34) + title + chr(34) + chr(10) + text)}}}\n')
    for split, questions in (("train", train), ("dev", dev)):
        _write_questions(paths[split], split, questions, corpus.entity_passage, corpus_id)

    world_path = out / "world.json"
    info = {
        "seed": seed,
        "num_passages": len(corpus.passages),
        "num_train": len(train),
        "num_dev": len(dev),
        "options": {"num_passages": num_passages, "num_train": num_train, "num_dev": num_dev},
        "entities": {"countries": len(world.countries), "cities": len(world.cities),
                     "persons": len(world.persons), "organisations": len(world.organisations),
                     "films": len(world.films)},
        "passage_kinds": dict(corpus.kinds),
        "question_capacity": capacity,
        "hops": {split: dict(sorted(Counter(q.hops for q in qs).items())) for split, qs in (("train", train), ("dev", dev))},
        "relations": dict(sorted(Counter(q.relation for q in train + dev).items())),
    }
    world_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return WorldSummary(seed, len(corpus.passages), len(train), len(dev), paths["corpus"], paths["train"],
                        paths["dev"], world_path)


def _write_questions(path: Path, split: str, questions: list[Question], entity_passage: dict[tuple[str, int], int],
                     corpus_id: list[int]) -> None:
    with open(path, "w", encoding="utf-8", buffering=WRITE_BUFFER) as f:
        for i, q in enumerate(questions):
            record = {
                "id": f"{split}_{i}",
                "question": q.text,
                "golden_answers": q.golden_answers,
                "metadata": {
                    "hops": q.hops,
                    "supporting_ids": [str(corpus_id[entity_passage[key]]) for key in q.supporting],
                    "relation": q.relation,
                    "answer_type": q.answer_type,
                },
            }
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`research world --out DIR --seed S [--num-passages N] [--num-train N] [--num-dev N]`."""
    parser = argparse.ArgumentParser(prog="research world", usage="%(prog)s --out DIR [options]",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write corpus.jsonl, train/dev.jsonl, world.json")
    parser.add_argument("--seed", type=int, default=0, help="world seed; the same seed gives identical files")
    parser.add_argument("--num-passages", type=int, default=2000, help="approximate corpus size")
    parser.add_argument("--num-train", type=int, default=None, help="train questions (default: scales with corpus)")
    parser.add_argument("--num-dev", type=int, default=None, help="dev questions (default: ~10%% of train, max 500)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = generate_world(args.out, seed=args.seed, num_passages=args.num_passages,
                                 num_train=args.num_train, num_dev=args.num_dev)
    except (ValueError, OSError) as error:  # bad sizes; an --out that is a file or not writable
        print(f"research world: error: {error}", file=sys.stderr)
        return 2
    print(f"world seed={summary.seed}: {summary.num_passages} passages, {summary.num_train} train, "
          f"{summary.num_dev} dev questions -> {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
