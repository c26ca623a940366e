"""`research data`: build the question files training and evaluation read, as FlashRAG jsonl.

- `musique-train --src FILE_OR_HUB_ID --out FILE`: the paper's training set, MuSiQue-Ans train (19,938 answerable
  questions), from any MuSiQue file qa/ reads (official jsonl, verl parquet, ...) or a Hugging Face dataset id.
- `val --src MUSIQUE_DEV --out FILE --size 100 --seed S`: the paper's validation subset, `size` random dev questions.
- `eval --src FILE --out FILE`: one evaluation set (HotpotQA, 2Wiki, MuSiQue dev, Bamboogle) from its original
  or FlashRAG file.

Every command reports counts and refuses a malformed record with its line (or record) number; the output file is
written whole or not at all.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qa.readers import read_records, write_flashrag_jsonl
from qa.records import QARecord

# owner/name as the hub spells dataset ids; anything with a leading "/" or "." or more slashes is a local path.
_FILE_SUFFIXES = frozenset({".json", ".jsonl", ".parquet"})
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass
class PrepareReport:
    """What a preparation command read and wrote."""

    out: Path
    read: int = 0
    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Records left out, by reason (unanswerable, duplicate id)."""

    def summary(self) -> str:
        """One line for the terminal."""
        dropped = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items() if count)
        return f"read {self.read}, wrote {self.written} to {self.out}" + (f" (dropped {dropped})" if dropped else "")


def _write_atomically(records: Iterable[QARecord], out: Path) -> int:
    """Write FlashRAG jsonl to a temporary file beside `out` and move it into place only if every record was valid."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    try:
        count = write_flashrag_jsonl(records, temporary)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return count


def _hub_records(dataset_id: str, split: str) -> Iterator[QARecord]:
    """Records of a Hugging Face dataset split (needs hub access; never used by the tests)."""
    import datasets  # a trl dependency; imported here so the file commands never pay for it

    rows = datasets.load_dataset(dataset_id, split=split)
    with tempfile.TemporaryDirectory() as scratch:
        # The hub rows are in one of the formats qa/ reads; going through a file keeps one conversion path.
        path = Path(scratch) / f"{split}.jsonl"
        rows.to_json(str(path), lines=True, force_ascii=False)
        yield from read_records(path)


def source_records(src: str, split: str = "train") -> Iterator[QARecord]:
    """Records of a local file (any format qa/ reads) or, when no such file exists, a hub dataset id."""
    if Path(src).exists():
        return read_records(src)
    if Path(src).suffix in _FILE_SUFFIXES or not _HUB_ID.fullmatch(src):
        raise FileNotFoundError(f"{src}: no such file (and not a hub dataset id of the form owner/name)")
    return _hub_records(src, split)


def _filtered(records: Iterable[QARecord], report: PrepareReport, answerable_only: bool) -> Iterator[QARecord]:
    seen: set[str] = set()
    for record in records:
        report.read += 1
        if answerable_only and record.metadata.get("answerable") is False:
            report.dropped["unanswerable"] = report.dropped.get("unanswerable", 0) + 1
            continue
        if record.id in seen:
            report.dropped["duplicate id"] = report.dropped.get("duplicate id", 0) + 1
            continue
        seen.add(record.id)
        yield record


def prepare_musique_train(src: str, out: str | Path, split: str = "train") -> PrepareReport:
    """MuSiQue-Ans train as FlashRAG jsonl: answerable questions only, duplicate ids dropped."""
    report = PrepareReport(Path(out))
    report.written = _write_atomically(_filtered(source_records(src, split), report, True), report.out)
    return report


def prepare_val(src: str, out: str | Path, size: int = 100, seed: int = 0, split: str = "validation") -> PrepareReport:
    """`size` questions drawn with `seed` from a MuSiQue dev file (the paper validates on 100), in drawn order."""
    report = PrepareReport(Path(out))
    records = list(_filtered(source_records(src, split), report, True))
    if size > len(records):
        raise ValueError(f"{src}: asked for {size} validation questions, the source has {len(records)}")
    sample = random.Random(seed).sample(records, size)
    report.dropped["not drawn"] = len(records) - size
    report.written = _write_atomically(sample, report.out)
    return report


def prepare_eval(src: str, out: str | Path, limit: int | None = None, split: str = "test") -> PrepareReport:
    """One evaluation set as FlashRAG jsonl (the first `limit` questions when given)."""
    report = PrepareReport(Path(out))
    records = _filtered(source_records(src, split), report, False)
    if limit is not None:
        records = itertools.islice(records, limit)
    report.written = _write_atomically(records, report.out)
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="research data", description="Build the question files training and "
                                     "evaluation read, as FlashRAG jsonl.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("musique-train", help="MuSiQue-Ans train (the paper's 19,938 questions)")
    train.add_argument("--src", required=True, help="a MuSiQue file in any format qa/ reads, or a hub dataset id")
    train.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    train.add_argument("--out", required=True, help="FlashRAG jsonl to write")
    val = commands.add_parser("val", help="the paper's validation subset: random MuSiQue dev questions")
    val.add_argument("--src", required=True, help="MuSiQue dev file, or a hub dataset id")
    val.add_argument("--split", default="validation", help="split of a hub dataset (default: validation)")
    val.add_argument("--out", required=True, help="FlashRAG jsonl to write")
    val.add_argument("--size", type=int, default=100, help="questions to draw (default: 100, as the paper)")
    val.add_argument("--seed", type=int, default=0, help="seed of the draw")
    evaluation = commands.add_parser("eval", help="an evaluation set from its original or FlashRAG file")
    evaluation.add_argument("--src", required=True, help="benchmark file in any format qa/ reads, or a hub id")
    evaluation.add_argument("--split", default="test", help="split of a hub dataset (default: test)")
    evaluation.add_argument("--out", required=True, help="FlashRAG jsonl to write")
    evaluation.add_argument("--limit", type=int, default=None, help="keep only the first N questions")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `research data <musique-train|val|eval> ...`; prints counts, exit 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "musique-train":
            report = prepare_musique_train(args.src, args.out, args.split)
        elif args.command == "val":
            report = prepare_val(args.src, args.out, args.size, args.seed, args.split)
        else:
            report = prepare_eval(args.src, args.out, args.limit, args.split)
    except (ValueError, OSError, ImportError) as error:  # bad input, missing files, no hub access or `datasets`
        print(f"research data: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.command}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
