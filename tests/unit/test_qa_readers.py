"""Dataset readers on every public QA file in shared/data, plus malformed-input and round-trip cases on tmp files."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qa.readers import FORMATS, detect_format, read_records, read_verl, write_flashrag_jsonl
from qa.records import QARecord

# (file under shared/data, detected format, records per its SOURCE.md, has supporting titles, has paragraph text)
QA_FILES = [
    ("2wikimultihopqa/migres_2wiki_200.jsonl", "2wikimultihopqa", 200, True, True),
    ("2wikimultihopqa/lag_2wiki_dev4000.json", "2wikimultihopqa", 4000, True, False),
    ("2wikimultihopqa/agenticrag_2wiki_dev_full.parquet", "verl", 12576, False, False),
    ("2wikimultihopqa/r1searcher_2wiki_500.jsonl", "r1searcher", 500, False, False),
    ("bamboogle/flashrag_bamboogle_test.jsonl", "flashrag", 125, False, False),
    ("bamboogle/r1searcher_bamboogle.jsonl", "r1searcher", 125, False, False),
    ("hotpotqa/ircot_hotpotqa_dev_subsampled.jsonl", "ircot", 500, True, True),
    ("hotpotqa/migres_hotpot_dev200.jsonl", "hotpotqa", 200, True, True),
    ("hotpotqa/agenticrag_hotpotqa_dev_full.parquet", "verl", 7405, False, False),
    ("hotpotqa/r1searcher_hotpotqa_500.jsonl", "r1searcher", 500, False, False),
    ("hotpotqa/hipporag_hotpotqa_train100.json", "hotpotqa", 100, True, True),
    ("multi_benchmark/deepresearcher_test.parquet", "verl", 3197, False, False),
    ("musique/lag_musique_dev_full.json", "musique", 2417, True, False),
    ("musique/migres_musique_dev200.jsonl", "musique", 200, True, True),
    ("musique/agenticrag_musique_train.parquet", "verl", 19938, False, False),
    ("musique/r1searcher_musique_500.jsonl", "r1searcher", 500, False, False),
    ("musique/hipporag_musique_train100.json", "musique", 100, True, True),
]

_CACHE: dict[str, list[QARecord]] = {}


@pytest.fixture(scope="module")
def records(shared_data: Path) -> Iterator[Callable[[str], list[QARecord]]]:
    """Each shared file read once per test module, however many tests look at it."""

    def load(relative: str) -> list[QARecord]:
        if relative not in _CACHE:
            _CACHE[relative] = list(read_records(shared_data / relative))
        return _CACHE[relative]

    yield load
    _CACHE.clear()


@pytest.mark.parametrize(("relative", "fmt", "count", "has_titles", "has_paragraphs"), QA_FILES)
def test_reads_every_shared_qa_file(
    shared_data: Path, records: Callable[[str], list[QARecord]],
    relative: str, fmt: str, count: int, has_titles: bool, has_paragraphs: bool,
) -> None:
    assert detect_format(shared_data / relative) == fmt
    loaded = records(relative)
    assert len(loaded) == count
    assert len({r.id for r in loaded}) == count
    for record in loaded:
        assert record.source == fmt
        assert record.question.strip()
        assert record.golden_answers and all(isinstance(a, str) and a.strip() for a in record.golden_answers)
        assert bool(record.supporting_titles) == has_titles, record.id
        for paragraph in record.supporting_paragraphs:
            assert paragraph["title"] in record.supporting_titles and paragraph["text"].strip()
    assert any(r.supporting_paragraphs for r in loaded) == has_paragraphs


def test_musique_aliases_follow_the_primary_answer(records: Callable[[str], list[QARecord]]) -> None:
    dev = records("musique/lag_musique_dev_full.json")
    # SOURCE.md: 680 of the 2417 dev questions have aliases.
    assert sum(len(r.golden_answers) > 1 for r in dev) == 680
    first = dev[0]
    assert first.answer == "Miquette Giraudy"
    # The list without paragraphs names each hop's document "Title_k"; the suffix is dropped.
    assert first.supporting_titles == ["Green (Steve Hillage album)", "Miquette Giraudy"]
    assert first.metadata["hops"] == 2


def test_musique_supporting_paragraphs_and_hops(records: Callable[[str], list[QARecord]]) -> None:
    for record in records("musique/migres_musique_dev200.jsonl"):
        assert 2 <= len(record.supporting_paragraphs) <= 4
        assert record.metadata["hops"] == len(record.metadata["question_decomposition"])
    trained = records("musique/hipporag_musique_train100.json")[0]
    assert trained.golden_answers == ["G. Stanley Hall", "Stanley Hall"]


def test_hotpotqa_and_2wiki_supporting_facts(records: Callable[[str], list[QARecord]]) -> None:
    hotpot = records("hotpotqa/migres_hotpot_dev200.jsonl")[0]
    assert hotpot.supporting_titles == ["Nobody's Hero", "Neil Peart"]
    assert hotpot.metadata["type"] and hotpot.metadata["level"]
    assert all(len(r.supporting_paragraphs) == 2 for r in records("hotpotqa/ircot_hotpotqa_dev_subsampled.jsonl"))
    wiki = records("2wikimultihopqa/migres_2wiki_200.jsonl")
    # SOURCE.md: 36 MIGRES items (probably train questions) come without context paragraphs.
    assert sum(not r.supporting_paragraphs for r in wiki) == 36
    assert wiki[0].supporting_titles == ["Forbidden Ground", "Free Guy", "Pál Gábor", "Shawn Levy"]
    assert wiki[0].metadata["evidences"][0] == ["Forbidden Ground", "director", "Pál Gábor"]


def test_deepresearcher_answer_split_and_sources(records: Callable[[str], list[QARecord]]) -> None:
    mixed = records("multi_benchmark/deepresearcher_test.parquet")
    per_source = Counter(r.metadata["data_source"] for r in mixed)
    assert per_source == {"2wiki": 512, "hotpotqa": 512, "musique": 512, "Bamboogle": 125,
                          "nq": 512, "tq": 512, "popqa": 512}
    # SOURCE.md: only nq, tq and popqa have several answers joined with <|answer_split|>.
    with_aliases = {r.metadata["data_source"] for r in mixed if len(r.golden_answers) > 1}
    assert with_aliases == {"nq", "tq", "popqa"}
    assert not any("<|answer_split|>" in a for r in mixed for a in r.golden_answers)
    assert mixed[0].id.startswith("2wiki_")


def test_bamboogle_copies_agree(records: Callable[[str], list[QARecord]]) -> None:
    flashrag = records("bamboogle/flashrag_bamboogle_test.jsonl")
    r1 = records("bamboogle/r1searcher_bamboogle.jsonl")
    assert [(r.question, r.golden_answers) for r in flashrag] == [(r.question, r.golden_answers) for r in r1]


def test_flashrag_round_trip_keeps_everything(tmp_path: Path, records: Callable[[str], list[QARecord]]) -> None:
    original = records("musique/migres_musique_dev200.jsonl")
    path = tmp_path / "out" / "musique.jsonl"
    assert write_flashrag_jsonl(original, path) == 200
    assert list(read_records(path)) == original
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(row) == {"id", "question", "golden_answers", "metadata"}


# --- synthetic files: formats and failures the shared data does not exercise -----------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_stringified_2wiki_fields_are_parsed_safely(tmp_path: Path) -> None:
    row = {"_id": "a1", "type": "comparison", "question": "Q?", "answer": "no",
           "context": [["A", ["A is x."]], ["B", ["B is y.", "More."]]],
           "supporting_facts": "[['A', 0], ['B', 1]]", "evidences": "[['A', 'is', 'x']]", "entity_ids": "Q1"}
    record = next(read_records(_write_lines(tmp_path / "wiki.json", [json.dumps(row)])))
    assert record.source == "2wikimultihopqa"
    assert record.supporting_titles == ["A", "B"]
    assert record.supporting_paragraphs[1] == {"title": "B", "text": "B is y. More."}
    assert record.metadata["evidences"] == [["A", "is", "x"]]
    hostile = dict(row, supporting_facts="__import__('os').getcwd()")
    path = _write_lines(tmp_path / "hostile.jsonl", [json.dumps(row), json.dumps(hostile)])
    with pytest.raises(ValueError, match=r"hostile\.jsonl: line 2: .*stringified"):
        list(read_records(path))


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"id": "1", "question": "Q?", "golden_answers": ["a"]})
    path = _write_lines(tmp_path / "broken.jsonl", [good, "", '{"id": "3", "question": '])
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3: invalid JSON"):
        list(read_records(path))


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"id": "2", "question": "Q?", "golden_answers": []}, "no golden answer"),
        ({"id": "2", "question": "  ", "golden_answers": ["a"]}, "no question"),
    ],
)
def test_record_without_question_or_answer_names_its_line(tmp_path: Path, row: dict, reason: str) -> None:
    good = {"id": "1", "question": "Q?", "golden_answers": ["a"]}
    path = _write_lines(tmp_path / "missing.jsonl", [json.dumps(good), json.dumps(row)])
    with pytest.raises(ValueError, match=rf"missing\.jsonl: line 2: .*{reason}"):
        list(read_records(path))


def test_json_list_record_without_answer_names_its_record_number(tmp_path: Path) -> None:
    rows = [{"_id": "x", "question": "Q?", "answer": "a", "supporting_facts": [], "context": []},
            {"_id": "y", "question": "Q?", "supporting_facts": [], "context": []}]
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"hotpot\.json: record 2: .*'answer'"):
        list(read_records(path))


def test_verl_parquet_ground_truth_shapes(tmp_path: Path) -> None:
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Who wrote Z?"}]
    table = pa.table({
        "data_source": ["nq", "nq", "nq"],
        "prompt": [prompt, prompt, prompt],
        "reward_model": [{"ground_truth": "A<|answer_split|>B"}, {"ground_truth": None}, {"ground_truth": "C"}],
        "extra_info": [{"question": "Q1?", "answer": None}, {"question": None, "answer": "D"},
                       {"question": None, "answer": None}],
    })
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    loaded = list(read_records(path))
    assert [r.golden_answers for r in loaded] == [["A", "B"], ["D"], ["C"]]
    # Without extra_info.question the question is the last user message of the prompt.
    assert [r.question for r in loaded] == ["Q1?", "Who wrote Z?", "Who wrote Z?"]
    assert [r.id for r in loaded] == ["0", "1", "2"]

    search_r1 = pa.table({"prompt": [prompt], "reward_model": [{"ground_truth": {"target": ["E", "F"]}}],
                          "extra_info": [{"index": 7}]})
    pq.write_table(search_r1, path)
    assert [(r.id, r.golden_answers) for r in read_verl(path)] == [("7", ["E", "F"])]

    unanswered = pa.table({"prompt": [prompt, prompt], "reward_model": [{"ground_truth": "G"}, {"ground_truth": ""}]})
    pq.write_table(unanswered, path)
    with pytest.raises(ValueError, match=r"train\.parquet: record 2: .*no golden answer"):
        list(read_records(path))


def test_unknown_format_and_unrecognised_keys(tmp_path: Path) -> None:
    assert "musique" in FORMATS
    with pytest.raises(ValueError, match="unknown QA format"):
        read_records(tmp_path / "x.jsonl", fmt="squad")
    path = _write_lines(tmp_path / "corpus.jsonl", [json.dumps({"id": "0", "contents": "\"T\"\ntext"})])
    with pytest.raises(ValueError, match=r"corpus\.jsonl: line 1: cannot tell the QA format"):
        list(read_records(path))
    assert list(read_records(_write_lines(tmp_path / "empty.jsonl", [""]))) == []
