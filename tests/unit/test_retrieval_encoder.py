"""The encoder with the packaged MiniLM: normalisation, batching order, E5 prefixes, pooling from the folder config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qa.world import generate_world
from retrieval_service.config import EncoderConfig
from retrieval_service.encoder import Encoder, resolve_encoder_path

TEXTS = ['"Teboara"\nTeboara is a city in Vruaria on the river Dreindou.', "short", "", "who founded Teboara?"]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    # The exact path; bf16 and ONNX Runtime query forwards are tested against it below.
    return Encoder(EncoderConfig(device="cpu", cpu_runtime="torch", cpu_query_dtype="float32"))


def linked_copy(target: Path, pooling: dict | None = None) -> Path:
    """A folder of symlinks to the packaged model, optionally with another pooling config."""
    source = resolve_encoder_path("all-MiniLM-L6-v2")
    target.mkdir()
    for item in source.iterdir():
        if item.name != "1_Pooling":
            (target / item.name).symlink_to(item)
    (target / "1_Pooling").mkdir()
    config = pooling or json.loads((source / "1_Pooling" / "config.json").read_text())
    (target / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return target


def test_vectors_are_unit_float32_and_batching_keeps_order(minilm: Encoder) -> None:
    batched = minilm.encode_passages(TEXTS, batch_size=2)
    assert batched.shape == (len(TEXTS), 384) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([minilm.encode_passages([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert minilm.encode_queries([]).shape == (0, 384)
    # A question is closer to the passage that answers it than to the others.
    assert int(np.argmax(batched @ minilm.encode_queries(["On which river does Teboara lie?"])[0])) == 0


def test_e5_name_adds_query_and_passage_prefixes(minilm: Encoder, tmp_path: Path) -> None:
    e5_like = Encoder(EncoderConfig(name_or_path=str(linked_copy(tmp_path / "my-e5-small")), device="cpu",
                                    cpu_runtime="torch", cpu_query_dtype="float32"))
    assert e5_like.is_e5 and not minilm.is_e5
    np.testing.assert_allclose(
        e5_like.encode_queries(["who founded Teboara?"]), minilm.encode_queries(["query: who founded Teboara?"]),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        e5_like.encode_passages(["Teboara is a city."]), minilm.encode_passages(["passage: Teboara is a city."]),
        atol=1e-5,
    )


def test_pooling_follows_the_sentence_transformers_config(tmp_path: Path) -> None:
    cls_folder = linked_copy(tmp_path / "cls-pooled", pooling={"pooling_mode_cls_token": True})
    encoder = Encoder(EncoderConfig(name_or_path=str(cls_folder), device="cpu", cpu_runtime="torch"))
    assert encoder.pooling == "cls"
    with torch.inference_mode():
        batch = encoder.tokenizer([TEXTS[0]], return_tensors="pt")
        cls = encoder.model(**batch).last_hidden_state[:, 0]
        expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_passages([TEXTS[0]]), expected, atol=1e-5)


def test_query_chunks_in_length_order_match_one_by_one(minilm: Encoder) -> None:
    # 40 queries of 1 to ~30 tokens: more than one CPU chunk of 16, each padded only to its own longest query.
    queries = [" ".join(["where was the founder of Teboara born"] * (i % 5)) + f" q{i}" for i in range(40)]
    batched = minilm.encode_queries(queries)
    one_by_one = np.concatenate([minilm.encode_queries([q]) for q in queries])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    whole = Encoder(EncoderConfig(device="cpu", query_batch_size=0, cpu_runtime="torch", cpu_query_dtype="float32"))
    np.testing.assert_allclose(whole.encode_queries(queries), one_by_one, atol=1e-5)  # one padded forward


@pytest.mark.parametrize("variant", ["bf16", "onnxruntime"])
def test_fast_query_forwards_keep_top1_agreement_and_fp32_passages(minilm: Encoder, tmp_path: Path,
                                                                   variant: str) -> None:
    # A small real sample: 150 passages of the synthetic world and its questions, passages encoded in fp32 as an
    # index is; the top-1 passage of each question with bf16 (torch) or fp32 ONNX Runtime query forwards against the
    # fp32 torch ones (the goal is 99 %).
    generate_world(tmp_path, seed=0, num_passages=150)
    passages = [json.loads(line)["contents"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    questions = [json.loads(line)["question"] for line in (tmp_path / "train.jsonl").read_text().splitlines()][:100]
    if variant == "bf16":
        fast_encoder = Encoder(EncoderConfig(device="cpu", cpu_runtime="torch", cpu_query_dtype="bfloat16"))
        assert next(fast_encoder.query_model.parameters()).dtype == torch.bfloat16
    else:
        fast_encoder = Encoder(EncoderConfig(device="cpu", cpu_runtime="onnxruntime", cpu_query_dtype="float32"))
        assert fast_encoder.runtime == "onnxruntime"
        assert type(fast_encoder.small_batch_model).__name__ == "OnnxForward"
    vectors = minilm.encode_passages(passages)
    np.testing.assert_allclose(fast_encoder.encode_passages(passages[:8]), vectors[:8], atol=1e-5)  # index: fp32
    reference = minilm.encode_queries(questions)
    if variant == "bf16":
        fast = fast_encoder.encode_queries(questions)
    else:  # one client's requests: forwards of 1, 3 and 2 queries, all ONNX Runtime (larger ones run in torch)
        fast = np.concatenate([fast_encoder.encode_queries([q]) for q in questions[:50]]
                              + [fast_encoder.encode_queries(questions[k:k + 3]) for k in range(50, 98, 3)]
                              + [fast_encoder.encode_queries(questions[98:])])
    assert fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    same = np.argmax(reference @ vectors.T, axis=1) == np.argmax(fast @ vectors.T, axis=1)
    assert same.mean() >= 0.99
    if variant == "onnxruntime":  # the same fp32 arithmetic, reordered: equal to rounding
        np.testing.assert_allclose(fast, reference, atol=1e-4)


def test_auto_runtime_is_onnxruntime_where_installed() -> None:
    from retrieval_service.encoder import query_runtime_on_cpu
    from retrieval_service.onnx_forward import onnxruntime_available

    assert query_runtime_on_cpu("auto") == ("onnxruntime" if onnxruntime_available() else "torch")
    assert query_runtime_on_cpu("torch") == "torch"


def test_auto_query_dtype_follows_the_cpu_flags(tmp_path: Path) -> None:
    from retrieval_service.encoder import cpu_has_bf16, query_dtype_on_cpu

    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert cpu_has_bf16(str(with_bf16)) and not cpu_has_bf16(str(without))
    assert not cpu_has_bf16(str(tmp_path / "missing"))
    assert query_dtype_on_cpu("float32") == "float32" and query_dtype_on_cpu("bfloat16") == "bfloat16"
    assert query_dtype_on_cpu("auto") == ("bfloat16" if cpu_has_bf16() else "float32")
