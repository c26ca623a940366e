"""Streaming readers of a passage corpus in the wiki-18 format (jsonl) or as parquet.

A wiki-18 line is {"id": "...", "contents": "\\"Title\\"\\ntext"}. Records with separate "title" and "text"
fields are accepted and turned into the same contents string. Nothing here holds more than one batch in memory, so
the full 21M-passage corpus streams through.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

_PARQUET_ROWS_PER_BATCH = 8192
_FINGERPRINT_CHUNK = 1 << 20
_FINGERPRINT_SAMPLES = 16


class CorpusRecord(NamedTuple):
    """One passage: its corpus id and the wiki-18 contents string."""

    id: str
    contents: str


def join_contents(title: str, text: str) -> str:
    """The wiki-18 contents string of a title and a text."""
    return f'"{title}"\n{text}'


def split_contents(contents: str) -> tuple[str, str]:
    """Title (without its quotes) and text of a wiki-18 contents string."""
    title, _, text = contents.partition("\n")
    title = title.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, text


def _record(obj: object, position: int, source: Path) -> CorpusRecord:
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: record {position} is not an object")
    if "contents" in obj:
        contents = obj["contents"]
    elif "text" in obj:
        contents = join_contents(str(obj.get("title", "")), str(obj["text"]))
    else:
        raise ValueError(f"{source}: record {position} has neither 'contents' nor 'text'")
    if not isinstance(contents, str):
        raise ValueError(f"{source}: record {position} has non-string contents")
    raw_id = obj.get("id", position)
    return CorpusRecord(str(raw_id), contents)


def read_corpus(path: str | Path, skip: int = 0) -> Iterator[CorpusRecord]:
    """Yield the passages of a .jsonl or .parquet corpus in file order, after skipping the first `skip`."""
    path = Path(path)
    if path.suffix == ".parquet":
        yield from _read_parquet(path, skip)
        return
    with path.open("rb") as handle:
        position = 0
        for line in handle:
            if not line.strip():
                continue
            # Skipped lines are counted, not parsed: resuming a 21M-line build must not re-parse it all.
            if position >= skip:
                yield _record(json.loads(line), position, path)
            position += 1


def _read_parquet(path: Path, skip: int) -> Iterator[CorpusRecord]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    columns = [c for c in ("id", "contents", "title", "text") if c in names]
    position = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS_PER_BATCH, columns=columns):
        if position + batch.num_rows <= skip:
            position += batch.num_rows
            continue
        for row in batch.to_pylist():
            if position >= skip:
                yield _record(row, position, path)
            position += 1


def count_records(path: str | Path) -> int:
    """Number of passages, without parsing jsonl lines (parquet: from the footer)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def corpus_fingerprint(path: str | Path) -> str:
    """A cheap identity of a corpus file: its size and sha256 over evenly spaced 1 MiB samples."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= _FINGERPRINT_CHUNK * _FINGERPRINT_SAMPLES:
            digest.update(handle.read())
        else:
            step = (size - _FINGERPRINT_CHUNK) // (_FINGERPRINT_SAMPLES - 1)
            for i in range(_FINGERPRINT_SAMPLES):
                handle.seek(i * step)
                digest.update(handle.read(_FINGERPRINT_CHUNK))
    return f"sampled-sha256:{size}:{digest.hexdigest()[:32]}"
