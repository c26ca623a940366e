"""Readers for the public multi-hop QA formats, all producing QARecord, plus a FlashRAG jsonl writer.

Formats: FlashRAG jsonl, MuSiQue (official jsonl with paragraphs, or a dev list without them), HotpotQA and
2WikiMultiHopQA originals (a JSON list or JSON Lines), IRCoT's processed jsonl, verl-style parquet and R1-Searcher's
eval jsonl. `read_records(path)` detects the format from the file's extension and the keys of its first record.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from qa.records import QARecord

FORMATS = ("flashrag", "musique", "hotpotqa", "2wikimultihopqa", "ircot", "verl", "r1searcher")
# DeepResearcher and similar verl datasets join several golden answers into one ground-truth string with this.
ANSWER_SPLIT = "<|answer_split|>"
_PARQUET_BATCH_ROWS = 1024

Row = dict[str, Any]
Converter = Callable[[Row, int], QARecord]


# ---------------------------------------------------------------------------------------------- raw rows


def _iter_json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) for a JSON list file or a JSON Lines file, whatever the extension says."""
    with path.open("r", encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith("["):
            # A JSON list cannot be parsed incrementally with the standard library; these files are a few MB.
            try:
                rows = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error
            for number, row in enumerate(rows, start=1):
                yield f"record {number}", row
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: invalid JSON: {error.msg}") from error
            yield f"line {number}", row


def _iter_parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) for a parquet file, read in record batches so memory stays flat on large files."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid/OSError family
        raise ValueError(f"{path}: not a readable parquet file: {error}") from error
    number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            number += 1
            yield f"record {number}", row


def _iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        return _iter_parquet_rows(path)
    return _iter_json_rows(path)


# ---------------------------------------------------------------------------------------------- field helpers


def _literal(value: Any) -> Any:
    """A field that some 2Wiki dumps store as a stringified Python list, parsed safely (never eval)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"cannot parse stringified field {value[:80]!r}") from error
    return value


def _required(row: Row, key: str) -> Any:
    value = row.get(key)
    if value is None or value == "":
        raise ValueError(f"record has no {key!r}")
    return value


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _sentences_to_text(sentences: Any) -> str:
    if isinstance(sentences, str):
        return sentences.strip()
    # HotpotQA sentences carry their own leading space, 2Wiki's do not: strip and rejoin so both read the same.
    return " ".join(s.strip() for s in sentences if s and s.strip())


def _titled_context(row: Row, facts: list[Any]) -> tuple[list[str], list[dict[str, str]]]:
    """Supporting titles and paragraphs of a HotpotQA-style record: context [[title, sentences]], facts [[title, i]]."""
    titles = _unique(str(fact[0]) for fact in facts)
    context = _literal(row.get("context")) or []
    text_by_title = {str(title): _sentences_to_text(sentences) for title, sentences in context}
    paragraphs = [{"title": t, "text": text_by_title[t]} for t in titles if t in text_by_title]
    return titles, paragraphs


# ---------------------------------------------------------------------------------------------- converters


def _flashrag_record(row: Row, index: int) -> QARecord:
    # Some FlashRAG-format files omit ids; the position keeps them unique within the file.
    return QARecord.from_flashrag(row if "id" in row else {**row, "id": str(index)})


def _musique_record(row: Row, index: int) -> QARecord:
    decomposition = row.get("question_decomposition") or []
    paragraphs = row.get("paragraphs") or []
    supporting = [p for p in paragraphs if p.get("is_supporting")]
    if supporting:
        titles = _unique(p["title"] for p in supporting)
    else:
        # The dev list without paragraphs still names each hop's document as "Title_k".
        titles = _unique(re.sub(r"_\d+$", "", str(step["document_id"]))
                         for step in decomposition if step.get("document_id"))
    record_id = str(_required(row, "id"))
    hops_match = re.match(r"(\d+)hop", record_id)
    metadata: dict[str, Any] = {
        "hops": int(hops_match.group(1)) if hops_match else len(decomposition),
        "answerable": row.get("answerable", True),
    }
    if decomposition:
        metadata["question_decomposition"] = decomposition
    return QARecord(
        id=record_id,
        question=_required(row, "question"),
        golden_answers=[_required(row, "answer"), *(row.get("answer_aliases") or [])],
        supporting_titles=titles,
        supporting_paragraphs=[{"title": p["title"], "text": p["paragraph_text"]} for p in supporting],
        source="musique",
        metadata=metadata,
    )


def _hotpotqa_record(row: Row, index: int) -> QARecord:
    titles, paragraphs = _titled_context(row, _literal(row.get("supporting_facts")) or [])
    return QARecord(
        id=str(row.get("_id", row.get("id", index))),
        question=_required(row, "question"),
        golden_answers=[_required(row, "answer")],
        supporting_titles=titles,
        supporting_paragraphs=paragraphs,
        source="hotpotqa",
        metadata={key: row[key] for key in ("type", "level") if row.get(key) is not None},
    )


def _2wikimultihopqa_record(row: Row, index: int) -> QARecord:
    titles, paragraphs = _titled_context(row, _literal(row.get("supporting_facts")) or [])
    metadata: dict[str, Any] = {"type": row.get("type")}
    if row.get("evidences") is not None:
        metadata["evidences"] = _literal(row["evidences"])
    return QARecord(
        id=str(row.get("_id", row.get("id", index))),
        question=_required(row, "question"),
        golden_answers=[_required(row, "answer")],
        supporting_titles=titles,
        supporting_paragraphs=paragraphs,
        source="2wikimultihopqa",
        metadata=metadata,
    )


def _ircot_answers(answers_objects: list[Row]) -> list[str]:
    answers: list[str] = []
    for obj in answers_objects:
        answers.extend(obj.get("spans") or [])
        if obj.get("number") not in (None, ""):
            answers.append(str(obj["number"]))
        date = obj.get("date") or {}
        date_text = " ".join(str(date[k]) for k in ("day", "month", "year") if date.get(k))
        if date_text:
            answers.append(date_text)
    return answers


def _ircot_record(row: Row, index: int) -> QARecord:
    supporting = [c for c in row.get("contexts") or [] if c.get("is_supporting")]
    return QARecord(
        id=str(row.get("question_id", index)),
        question=_required(row, "question_text"),
        golden_answers=_ircot_answers(_required(row, "answers_objects")),
        supporting_titles=_unique(c["title"] for c in supporting),
        supporting_paragraphs=[{"title": c["title"], "text": c["paragraph_text"]} for c in supporting],
        source="ircot",
    )


def _split_ground_truth(ground_truth: Any) -> list[str]:
    if ground_truth is None:
        return []
    if isinstance(ground_truth, dict):
        # Search-R1's parquet files store {"target": [answers]}.
        return _split_ground_truth(ground_truth.get("target"))
    if isinstance(ground_truth, str):
        return ground_truth.split(ANSWER_SPLIT)
    if isinstance(ground_truth, (list, tuple)):
        return [answer for item in ground_truth for answer in _split_ground_truth(item)]
    return [str(ground_truth)]


def _prompt_question(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    user_messages = [m.get("content") for m in prompt or [] if m.get("role") == "user"]
    return user_messages[-1] if user_messages else None


def _verl_record(row: Row, index: int) -> QARecord:
    extra_info = row.get("extra_info") or {}
    reward_model = row.get("reward_model") or {}
    answers = _split_ground_truth(reward_model.get("ground_truth")) or _split_ground_truth(extra_info.get("answer"))
    question = extra_info.get("question") or _prompt_question(row.get("prompt"))
    record_index = extra_info.get("index")
    metadata = {key: row[key] for key in ("data_source", "ability") if row.get(key) is not None}
    if extra_info.get("split") is not None:
        metadata["split"] = extra_info["split"]
    return QARecord(
        id=str(record_index if record_index is not None else index),
        question=question,  # type: ignore[arg-type]  # validated by QARecord
        golden_answers=answers,
        source="verl",
        metadata=metadata,
    )


def _r1searcher_record(row: Row, index: int) -> QARecord:
    skipped = {"idx", "question", "answer", "gen_text_store"}
    return QARecord(
        id=str(row.get("idx", index)),
        question=_required(row, "question"),
        golden_answers=[_required(row, "answer")],
        source="r1searcher",
        metadata={key: value for key, value in row.items() if key not in skipped},
    )


_CONVERTERS: dict[str, Converter] = {
    "flashrag": _flashrag_record,
    "musique": _musique_record,
    "hotpotqa": _hotpotqa_record,
    "2wikimultihopqa": _2wikimultihopqa_record,
    "ircot": _ircot_record,
    "verl": _verl_record,
    "r1searcher": _r1searcher_record,
}


# ---------------------------------------------------------------------------------------------- detection


def detect_format_of_row(row: Row) -> str | None:
    """The format a raw record belongs to, judged from its keys; None when no reader recognises it."""
    keys = set(row)
    if "golden_answers" in keys:
        return "flashrag"
    if "reward_model" in keys or ("prompt" in keys and "extra_info" in keys):
        return "verl"
    if "question_text" in keys and "answers_objects" in keys:
        return "ircot"
    if keys & {"paragraphs", "answer_aliases", "question_decomposition"}:
        return "musique"
    if keys & {"evidences", "entity_ids"}:
        return "2wikimultihopqa"
    if keys & {"supporting_facts", "context"}:
        return "hotpotqa"
    if {"idx", "question", "answer"} <= keys:
        return "r1searcher"
    return None


def _detect(path: Path, location: str, row: Any) -> str:
    fmt = detect_format_of_row(row) if isinstance(row, dict) else None
    if fmt is None:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{path}: {location}: cannot tell the QA format from the first record (keys: {keys})")
    return fmt


def detect_format(path: str | Path) -> str:
    """The format of a QA file, from its extension (parquet) and the keys of its first record."""
    path = Path(path)
    for location, row in _iter_rows(path):
        return _detect(path, location, row)
    raise ValueError(f"{path}: empty file, cannot tell its QA format")


# ---------------------------------------------------------------------------------------------- reading


def _convert(path: Path, rows: Iterable[tuple[str, Any]], fmt: str) -> Iterator[QARecord]:
    convert = _CONVERTERS[fmt]
    for index, (location, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {location}: expected a JSON object, got {type(row).__name__}")
        try:
            record = convert(row, index)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            reason = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(f"{path}: {location}: malformed {fmt} record: {reason}") from error
        yield record


def read_records(path: str | Path, fmt: str = "auto") -> Iterator[QARecord]:
    """Stream QARecords from a QA file; fmt is one of FORMATS or "auto" (detected from the first record)."""
    if fmt != "auto" and fmt not in _CONVERTERS:
        raise ValueError(f"unknown QA format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    return _read(Path(path), fmt)


def _read(path: Path, fmt: str) -> Iterator[QARecord]:
    rows = _iter_rows(path)
    if fmt == "auto":
        first = next(rows, None)
        if first is None:
            return
        fmt = _detect(path, *first)
        rows = itertools.chain([first], rows)
    yield from _convert(path, rows, fmt)


def read_flashrag(path: str | Path) -> Iterator[QARecord]:
    """FlashRAG jsonl: {id, question, golden_answers, metadata?}."""
    return read_records(path, "flashrag")


def read_musique(path: str | Path) -> Iterator[QARecord]:
    """MuSiQue: official jsonl with paragraphs and is_supporting, or the dev list with question_decomposition only."""
    return read_records(path, "musique")


def read_hotpotqa(path: str | Path) -> Iterator[QARecord]:
    """HotpotQA original, a JSON list or JSON Lines: context [[title, sentences]], supporting_facts [[title, i]]."""
    return read_records(path, "hotpotqa")


def read_2wikimultihopqa(path: str | Path) -> Iterator[QARecord]:
    """2WikiMultiHopQA original, a JSON list or JSON Lines; stringified list fields are parsed with literal_eval."""
    return read_records(path, "2wikimultihopqa")


def read_ircot(path: str | Path) -> Iterator[QARecord]:
    """IRCoT processed jsonl: question_text, answers_objects spans, contexts with is_supporting."""
    return read_records(path, "ircot")


def read_verl(path: str | Path) -> Iterator[QARecord]:
    """verl-style parquet: reward_model.ground_truth answers, extra_info.question or the last user message."""
    return read_records(path, "verl")


def read_r1searcher(path: str | Path) -> Iterator[QARecord]:
    """R1-Searcher eval jsonl: {idx, question, answer}."""
    return read_records(path, "r1searcher")


def write_flashrag_jsonl(records: Iterable[QARecord], path: str | Path) -> int:
    """Write records as FlashRAG jsonl (one to_flashrag() object per line); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_flashrag(), ensure_ascii=False) + "\n")
            count += 1
    return count
