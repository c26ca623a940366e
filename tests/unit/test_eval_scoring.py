"""How `research eval` turns a rolled-out row into its prediction, and the eval's retrieval settings."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.eval import eval_meta, eval_retrieval, scored_prediction

TRUNCATED = {"end_reason": "length", "answer": "Paris", "em": 1.0, "f1": 1.0}


def test_a_truncated_response_predicts_nothing_as_the_reference_eval() -> None:
    """The reference's eval gives an over-length response the prediction "" (ReCall, branch re-search,
    src/flashrag/pipeline/active_pipeline.py:81-95), whatever answer it wrote before the cut."""
    config = load_config("test-tiny")
    assert config.eval.truncated_answer == "empty"
    assert scored_prediction(TRUNCATED, config.eval.truncated_answer) == ("", 0.0, 0.0)
    assert scored_prediction(TRUNCATED, "keep") == ("Paris", 1.0, 1.0)
    # Only the token budget truncates: an answer ended by EOS, another EOS id or the turn cap keeps its credit.
    for end in ("eos", "other_eos", "max_turns"):
        assert scored_prediction({**TRUNCATED, "end_reason": end}) == ("Paris", 1.0, 1.0)
    with pytest.raises(ValueError, match="'drop'"):
        scored_prediction(TRUNCATED, "drop")


def test_eval_searches_use_the_eval_empty_query_text_and_records_name_the_setting() -> None:
    """The reference's eval inserts 'nothing to search' for an empty query (active_pipeline.py:66-74); its training
    rollout searches the empty string (retrieval.empty_query_result None, the training default)."""
    config = load_config("test-tiny")
    assert config.retrieval.empty_query_result is None
    retrieval = eval_retrieval(config, ["http://127.0.0.1:1"])
    assert retrieval.urls == ["http://127.0.0.1:1"] and retrieval.empty_query_result == "nothing to search"
    kept = load_config("test-tiny", ["eval.truncated_answer=keep"])
    assert eval_meta(config, "m")["eval"] != eval_meta(kept, "m")["eval"]  # a resumed eval must not mix the two
