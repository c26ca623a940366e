"""The synthetic world: deterministic files in wiki-18 / FlashRAG format whose questions the corpus answers."""

from __future__ import annotations

import json
import os
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qa.world import generate_world, main
from qa.world_entities import CITY_PREFIXES, FILM_PATTERNS, ORG_KINDS, build_world, entity_counts
from qa.world_names import STOP_WORDS, NameForge

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZE = 1500


def _normalize(text: str) -> str:
    # SQuAD-style normalisation, as the reward applies it to answers.
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=7, num_passages=SIZE)
    return out


@pytest.fixture(scope="module")
def corpus(world_dir: Path) -> dict[str, tuple[str, str]]:
    """id -> (title, text)."""
    passages = {}
    for record in _read_jsonl(world_dir / "corpus.jsonl"):
        title, text = record["contents"].split("\n", 1)
        passages[record["id"]] = (title.strip('"'), text)
    return passages


def _questions(world_dir: Path) -> list[dict]:
    return _read_jsonl(world_dir / "train.jsonl") + _read_jsonl(world_dir / "dev.jsonl")


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path, world_dir: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    generate_world(again, seed=7, num_passages=SIZE)
    generate_world(other, seed=8, num_passages=SIZE)
    for name in ("corpus.jsonl", "train.jsonl", "dev.jsonl", "world.json"):
        assert (again / name).read_bytes() == (world_dir / name).read_bytes(), name
    for name in ("corpus.jsonl", "train.jsonl", "dev.jsonl"):
        assert (other / name).read_bytes() != (world_dir / name).read_bytes(), name


def test_output_does_not_depend_on_string_hash_seed(tmp_path: Path) -> None:
    # Iterating a set of strings would make files depend on PYTHONHASHSEED; two processes must agree.
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        subprocess.run([sys.executable, "-m", "qa.world", "--out", str(out), "--seed", "3", "--num-passages", "400"],
                       check=True, env=env, cwd=REPO_ROOT, capture_output=True)
        outputs.append([(out / name).read_bytes() for name in ("corpus.jsonl", "train.jsonl", "dev.jsonl")])
    assert outputs[0] == outputs[1]


def test_corpus_lines_are_wiki18_format(world_dir: Path) -> None:
    lines = (world_dir / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    ids = []
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"id", "contents"}
        assert isinstance(record["id"], str)
        title, text = record["contents"].split("\n", 1)
        assert title.startswith('"') and title.endswith('"') and len(title) > 2
        assert 40 <= len(text.split()) <= 120, record
        ids.append(record["id"])
    assert ids == [str(i) for i in range(len(lines))]


def test_question_records_are_flashrag_format(world_dir: Path, corpus: dict[str, tuple[str, str]]) -> None:
    for split in ("train", "dev"):
        records = _read_jsonl(world_dir / f"{split}.jsonl")
        assert [r["id"] for r in records] == [f"{split}_{i}" for i in range(len(records))]
        for r in records:
            assert set(r) == {"id", "question", "golden_answers", "metadata"}
            assert r["question"].endswith("?")
            assert r["golden_answers"] and all(isinstance(a, str) and a for a in r["golden_answers"])
            meta = r["metadata"]
            assert meta["hops"] in (1, 2)
            assert len(meta["supporting_ids"]) == meta["hops"]
            assert all(sid in corpus for sid in meta["supporting_ids"])
            assert meta["relation"] and meta["answer_type"]


def test_answers_are_stated_in_the_last_supporting_passage(world_dir: Path,
                                                           corpus: dict[str, tuple[str, str]]) -> None:
    for q in _questions(world_dir):
        text = f" {_normalize(corpus[q['metadata']['supporting_ids'][-1]][1])} "
        assert f" {_normalize(q['golden_answers'][0])} " in text, q
        if q["metadata"]["answer_type"] == "year":
            assert q["golden_answers"][0].isdigit()


def test_questions_name_their_subject_and_chain_through_the_bridge(world_dir: Path,
                                                                   corpus: dict[str, tuple[str, str]]) -> None:
    for q in _questions(world_dir):
        ids = q["metadata"]["supporting_ids"]
        subject = corpus[ids[0]][0]
        assert subject in q["question"], q
        if q["metadata"]["hops"] == 2:
            bridge, first_text = corpus[ids[1]][0], corpus[ids[0]][1]
            assert bridge not in q["question"] and bridge in first_text, q


def test_mix_of_hops_and_relations_and_no_shared_questions(world_dir: Path) -> None:
    train, dev = _read_jsonl(world_dir / "train.jsonl"), _read_jsonl(world_dir / "dev.jsonl")
    assert {q["metadata"]["hops"] for q in dev} == {1, 2}
    hops = [q["metadata"]["hops"] for q in train]
    assert abs(hops.count(1) - hops.count(2)) <= 1
    assert len({q["metadata"]["relation"] for q in train}) >= 20
    train_texts = [q["question"] for q in train]
    assert len(set(train_texts)) == len(train_texts)
    assert not set(train_texts) & {q["question"] for q in dev}
    assert 0 < len(dev) < len(train)


def test_entity_names_are_unique_and_not_stop_words() -> None:
    rng = random.Random(11)
    world = build_world(rng, NameForge(rng), entity_counts(3000))
    names = ([p.name for p in world.persons] + [c.name for c in world.cities] + [k.name for k in world.countries]
             + [o.name for o in world.organisations] + [f.title for f in world.films])
    assert len(names) == len({n.lower() for n in names})
    # Every word that is not part of a fixed pattern ("Return to ...", "... Bank", "North ...") is invented.
    fixed = {w.lower() for text in FILM_PATTERNS + CITY_PREFIXES + tuple(k for k, _ in ORG_KINDS) for w in text.split()}
    invented = {w.lower() for n in names for w in n.split()} - fixed
    assert invented and not invented & STOP_WORDS
    # Stems of places are single invented words that the reader can tell apart from English.
    for country in world.countries:
        assert " " not in country.name and country.name.isalpha()


def test_summary_and_world_json(world_dir: Path) -> None:
    info = json.loads((world_dir / "world.json").read_text())
    assert info["seed"] == 7
    assert info["num_passages"] == len((world_dir / "corpus.jsonl").read_text().splitlines())
    assert info["num_train"] == len(_read_jsonl(world_dir / "train.jsonl"))
    assert info["num_dev"] == len(_read_jsonl(world_dir / "dev.jsonl"))
    assert info["options"]["num_passages"] == SIZE
    assert info["passage_kinds"]["event"] > 0 and info["passage_kinds"]["surname"] > 0


@pytest.mark.parametrize("target", [100, 800, 4000])
def test_corpus_size_follows_num_passages(tmp_path: Path, target: int) -> None:
    summary = generate_world(tmp_path, seed=1, num_passages=target, num_train=30, num_dev=5)
    assert abs(summary.num_passages - target) <= 0.1 * target
    assert (summary.num_train, summary.num_dev) == (30, 5)
    assert summary.corpus_path.exists() and summary.world_path.exists()


def test_dev_set_does_not_depend_on_num_train(tmp_path: Path) -> None:
    a = generate_world(tmp_path / "a", seed=2, num_passages=300, num_train=10, num_dev=8)
    b = generate_world(tmp_path / "b", seed=2, num_passages=300, num_train=40, num_dev=8)
    assert a.dev_path.read_bytes() == b.dev_path.read_bytes()


def test_main_prints_summary_and_rejects_impossible_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path / "w"), "--seed", "4", "--num-passages", "200"]) == 0
    out = capsys.readouterr().out
    assert "200 passages" in out and "train" in out
    assert main(["--out", str(tmp_path / "x"), "--num-passages", "100", "--num-train", "100000"]) == 2
    assert "distinct questions" in capsys.readouterr().err


@pytest.mark.slow
def test_timing_100k_passages(tmp_path: Path) -> None:
    start = time.perf_counter()
    summary = generate_world(tmp_path, seed=0, num_passages=100_000)
    seconds = time.perf_counter() - start
    print(f"\n100k-passage world: {summary.num_passages} passages, {summary.num_train} train, "
          f"{summary.num_dev} dev in {seconds:.1f} s")
    assert summary.num_passages == 100_000
