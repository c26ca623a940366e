"""The one record type every dataset reader produces: a question, its golden answers and its evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Keys under which to_flashrag() keeps the fields FlashRAG's format has no slot for, so a round trip loses nothing.
_EXTRA_KEYS = ("supporting_titles", "supporting_paragraphs", "source")


@dataclass
class QARecord:
    """A question with its golden answers (primary first, then aliases) and, where known, its supporting evidence."""

    id: str
    question: str
    golden_answers: list[str]
    supporting_titles: list[str] = field(default_factory=list)
    """Titles of the supporting paragraphs, in order; empty where the format lacks them."""
    supporting_paragraphs: list[dict[str, str]] = field(default_factory=list)
    """Supporting paragraphs as {"title", "text"}; empty where the format carries no paragraph text."""
    source: str = "flashrag"
    """The format the record was first read from (a reader's format name)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping, e.g. hops, question type, data source."""

    def __post_init__(self) -> None:
        self.id = str(self.id)
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("record has no question")
        self.question = self.question.strip()
        answers = [self.golden_answers] if isinstance(self.golden_answers, str) else self.golden_answers
        if answers is None:
            answers = []
        cleaned: list[str] = []
        for answer in answers:
            # Numbers occur as golden answers in some sets; an exact duplicate alias adds nothing to a max.
            text = str(answer).strip() if answer is not None else ""
            if text and text not in cleaned:
                cleaned.append(text)
        if not cleaned:
            raise ValueError("record has no golden answer")
        self.golden_answers = cleaned

    @property
    def answer(self) -> str:
        """The primary golden answer."""
        return self.golden_answers[0]

    def to_flashrag(self) -> dict[str, Any]:
        """This record as a FlashRAG dataset row: {"id", "question", "golden_answers", "metadata"}."""
        metadata = dict(self.metadata)
        metadata["source"] = self.source
        if self.supporting_titles:
            metadata["supporting_titles"] = list(self.supporting_titles)
        if self.supporting_paragraphs:
            metadata["supporting_paragraphs"] = [dict(p) for p in self.supporting_paragraphs]
        return {
            "id": self.id,
            "question": self.question,
            "golden_answers": list(self.golden_answers),
            "metadata": metadata,
        }

    @classmethod
    def from_flashrag(cls, row: dict[str, Any]) -> QARecord:
        """Build a record from a FlashRAG dataset row, restoring what to_flashrag() kept in its metadata."""
        metadata = dict(row.get("metadata") or {})
        extras = {key: metadata.pop(key) for key in _EXTRA_KEYS if key in metadata}
        return cls(
            id=row["id"],
            question=row.get("question"),  # type: ignore[arg-type]  # validated in __post_init__
            golden_answers=row.get("golden_answers"),  # type: ignore[arg-type]
            supporting_titles=list(extras.get("supporting_titles") or []),
            supporting_paragraphs=list(extras.get("supporting_paragraphs") or []),
            source=str(extras.get("source") or "flashrag"),
            metadata=metadata,
        )
