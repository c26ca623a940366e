"""Encoder + index = a retriever: queries in, (passage, score) lists out. Synchronous; the server batches around it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval_service.config import EncoderConfig
from retrieval_service.encoder import Encoder
from retrieval_service.index import PassageIndex, check_encoder


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: the corpus record {"id", "contents"} and its cosine score."""

    document: dict[str, str]
    score: float


def clean_query(query: str) -> str:
    """Replace what the tokenizer cannot take (lone surrogates) instead of failing on it."""
    return query.encode("utf-8", "replace").decode("utf-8")


class Retriever:
    """Dense retrieval over one index directory with one encoder (checked to be the index's encoder)."""

    def __init__(
        self, index_dir: str | Path, encoder_config: EncoderConfig | None = None, use_gpu: bool = False
    ) -> None:
        self.index = PassageIndex(index_dir, use_gpu=use_gpu)
        config = encoder_config or EncoderConfig(name_or_path=self.index.meta.encoder)
        check_encoder(self.index.meta, config.name_or_path)  # before loading a model that would be refused
        self.encoder = Encoder(config)
        check_encoder(self.index.meta, config.name_or_path, self.encoder.dim)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Top-k hits of each query: one encoder forward and one faiss search for the whole list."""
        if not queries:
            return []
        vectors = self.encoder.encode_queries([clean_query(q) for q in queries])
        scores, rows = self.index.search(vectors, topk)
        return [
            [Hit(self.index.docs.get(int(r)), float(s)) for r, s in zip(row_ids, row_scores, strict=True) if r >= 0]
            for row_ids, row_scores in zip(rows, scores, strict=True)
        ]

    def close(self) -> None:
        """Release the index files."""
        self.index.close()
