"""`research data`: the training, validation and evaluation files, counts, and malformed input refused by line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qa.prepare import main, prepare_eval, prepare_musique_train, prepare_val
from qa.readers import read_records


def test_musique_train_from_the_parquet_has_the_papers_19938_questions(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.jsonl"
    report = prepare_musique_train(str(shared_data / "musique" / "agenticrag_musique_train.parquet"), out)
    assert report.read == report.written == 19938
    records = list(read_records(out))
    assert len(records) == 19938 and len({r.id for r in records}) == 19938
    assert records[0].question and records[0].golden_answers


def test_val_draws_size_questions_reproducibly_from_dev(shared_data: Path, tmp_path: Path) -> None:
    dev = str(shared_data / "musique" / "lag_musique_dev_full.json")
    first = prepare_val(dev, tmp_path / "a.jsonl", size=100, seed=3)
    prepare_val(dev, tmp_path / "b.jsonl", size=100, seed=3)
    prepare_val(dev, tmp_path / "c.jsonl", size=100, seed=4)
    assert first.read == 2417 and first.written == 100
    ids = [[r.id for r in read_records(tmp_path / f"{n}.jsonl")] for n in "abc"]
    assert ids[0] == ids[1] and ids[0] != ids[2] and len(set(ids[0])) == 100
    dev_ids = {r.id for r in read_records(dev)}
    assert set(ids[0]) <= dev_ids
    with pytest.raises(ValueError, match="asked for 5000"):
        prepare_val(dev, tmp_path / "d.jsonl", size=5000)


def test_musique_official_format_drops_unanswerable(tmp_path: Path) -> None:
    src = tmp_path / "musique_full.jsonl"
    rows = [{"id": "2hop__1", "question": "Q1?", "answer": "A", "answer_aliases": ["a1"], "answerable": True,
             "paragraphs": [], "question_decomposition": []},
            {"id": "2hop__2", "question": "Q2?", "answer": "B", "answer_aliases": [], "answerable": False,
             "paragraphs": [], "question_decomposition": []}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare_musique_train(str(src), tmp_path / "train.jsonl")
    assert (report.read, report.written, report.dropped) == (2, 1, {"unanswerable": 1})
    (record,) = read_records(tmp_path / "train.jsonl")
    assert record.golden_answers == ["A", "a1"]


@pytest.mark.parametrize(("folder", "name", "count"), [
    ("bamboogle", "r1searcher_bamboogle.jsonl", 125),
    ("bamboogle", "flashrag_bamboogle_test.jsonl", 125),
    ("hotpotqa", "ircot_hotpotqa_dev_subsampled.jsonl", 500),
    ("2wikimultihopqa", "lag_2wiki_dev4000.json", 4000),
    ("musique", "migres_musique_dev200.jsonl", 200),
])
def test_eval_sets_convert_from_their_files(shared_data: Path, tmp_path: Path, folder: str, name: str,
                                            count: int) -> None:
    out = tmp_path / "eval.jsonl"
    report = prepare_eval(str(shared_data / folder / name), out)
    assert report.read == report.written == count
    assert sum(1 for _ in read_records(out, "flashrag")) == count


def test_malformed_line_is_refused_with_its_number_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    src = tmp_path / "broken.jsonl"
    good = {"id": "1", "question": "Q?", "golden_answers": ["A"]}
    src.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "2"}) + "\n{\"id\": \"3\", \"quest\n")
    out = tmp_path / "out.jsonl"
    assert main(["eval", "--src", str(src), "--out", str(out)]) == 2
    assert "line 3" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob("*.partial")) == []

    src.write_text(json.dumps(good) + "\n" + json.dumps({"id": "2", "question": "Q2?", "golden_answers": []}) + "\n")
    assert main(["eval", "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "no golden answer" in err and not out.exists()


def test_cli_reports_counts(tmp_path: Path, capsys) -> None:
    src = tmp_path / "bamboogle.jsonl"
    src.write_text("".join(json.dumps({"idx": i, "question": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(7)))
    assert main(["eval", "--src", str(src), "--out", str(tmp_path / "o.jsonl"), "--limit", "5"]) == 0
    assert "read 5, wrote 5" in capsys.readouterr().out
    assert main(["val", "--src", str(src), "--out", str(tmp_path / "v.jsonl"), "--size", "3", "--seed", "1"]) == 0
    assert "wrote 3" in capsys.readouterr().out
    assert main(["musique-train", "--src", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.jsonl")]) == 2
