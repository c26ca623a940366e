"""`research index --faiss-index FILE`: an index built elsewhere over the same corpus with the same encoder is adopted
(checked on re-encoded passages) and serves the same results; another encoder, order or corpus is refused."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from cluster.cli import main
from retrieval_service.build import build_index
from retrieval_service.config import EncoderConfig
from retrieval_service.encoder import Encoder
from retrieval_service.index import PassageIndex, read_meta

TOPICS = ["volcano", "river", "violin", "glacier", "comet", "orchard", "harbour", "desert", "library", "bridge"]


def write_corpus(path: Path, order: list[int]) -> Path:
    """A small wiki-18 style corpus whose passages differ in topic (so re-encoded vectors tell them apart)."""
    lines = [json.dumps({"id": str(i), "contents": f'"{TOPICS[i % 10]} {i}"\nA passage about the {TOPICS[i % 10]} '
                         f"number {i}, with words of its own: {' '.join(TOPICS[(i * 7 + k) % 10] for k in range(3))}."})
             for i in order]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, index dir) of a normal build with the packaged MiniLM."""
    root = tmp_path_factory.mktemp("adopt")
    corpus = write_corpus(root / "corpus.jsonl", list(range(30)))
    build_index(corpus, root / "built", EncoderConfig(), progress=False)
    return corpus, root / "built"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`research ARGV`: (exit code, stderr)."""
    code = main(argv)
    return code, capsys.readouterr().err


def test_an_index_built_elsewhere_is_adopted_and_serves_the_same_results(
        built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, reference = built
    code, err = run(["index", "--corpus", str(corpus), "--out", str(tmp_path / "adopted"), "--faiss-index",
                     str(reference / "index.faiss"), "--no-progress"], capsys)
    assert code == 0, err
    meta, expected = read_meta(tmp_path / "adopted"), read_meta(reference)
    assert (meta.count, meta.dim, meta.factory, meta.normalized) == (30, expected.dim, "Flat", True)
    queries = Encoder(EncoderConfig()).encode_queries(["a passage about the comet", "the violin"])
    adopted, original = PassageIndex(tmp_path / "adopted"), PassageIndex(reference)
    for (scores, rows), (want_scores, want_rows) in [(adopted.search(queries, 5), original.search(queries, 5))]:
        assert np.array_equal(rows, want_rows) and np.allclose(scores, want_scores)
        assert adopted.passages(rows[0]) == original.passages(want_rows[0])


def test_an_index_without_stored_vectors_is_checked_by_self_retrieval(
        built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, reference = built
    flat = faiss.read_index(str(reference / "index.faiss"))
    vectors = flat.reconstruct_n(0, flat.ntotal)
    ivf = faiss.index_factory(flat.d, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)  # no direct map: cannot reconstruct
    ivf.train(vectors)
    ivf.add(vectors)
    ivf.nprobe = 2
    faiss.write_index(ivf, str(tmp_path / "ivf.faiss"))
    code, err = run(["index", "--corpus", str(corpus), "--out", str(tmp_path / "ivf"), "--faiss-index",
                     str(tmp_path / "ivf.faiss"), "--no-progress"], capsys)
    assert code == 0, err
    assert read_meta(tmp_path / "ivf").factory == "IndexIVFFlat"


def test_another_encoder_order_or_corpus_is_refused(built: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    corpus, reference = built
    flat = faiss.read_index(str(reference / "index.faiss"))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((flat.ntotal, flat.d)).astype(np.float32)
    other = faiss.IndexFlatIP(flat.d)
    other.add(noise / np.linalg.norm(noise, axis=1, keepdims=True))
    faiss.write_index(other, str(tmp_path / "other.faiss"))
    shuffled = write_corpus(tmp_path / "shuffled.jsonl", list(range(29, -1, -1)))
    shorter = write_corpus(tmp_path / "shorter.jsonl", list(range(20)))
    l2 = faiss.IndexFlatL2(flat.d)
    l2.add(flat.reconstruct_n(0, flat.ntotal))
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    for source, faiss_file, reason in ((corpus, tmp_path / "other.faiss", "cosine"),
                                       (shuffled, reference / "index.faiss", "cosine"),
                                       (shorter, reference / "index.faiss", "holds 30 vectors but"),
                                       (corpus, tmp_path / "l2.faiss", "inner product")):
        out = tmp_path / f"out-{faiss_file.stem}-{source.stem}"
        code, err = run(["index", "--corpus", str(source), "--out", str(out), "--faiss-index", str(faiss_file),
                         "--no-progress"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and reason in err, err
        assert "--faiss-index" in err and not out.exists()  # refused before anything is written
