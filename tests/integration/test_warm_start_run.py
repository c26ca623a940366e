"""The format warm start end to end on the tiny policy: real retrieval service, a Ray LearnerGroup, HF export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_warm_start_trains_and_exports_a_loadable_policy(rollout_world: Path, retrieval_url: str, tiny_dir: Path,
                                                         tmp_path: Path) -> None:
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.config import load_config
    from cluster.train import connect_ray
    from cluster.warm_start import MANIFEST, cache_key, run_warm_start

    config = load_config("test-tiny", [
        f"data.train_files=[{rollout_world / 'train.jsonl'}]", f"data.val_files=[{rollout_world / 'dev.jsonl'}]",
        f"retrieval.index_dir={rollout_world / 'index'}", "warm_start.enabled=true", "warm_start.questions=3",
        "warm_start.two_hop_questions=1",
        "warm_start.batch_size=2", "warm_start.epochs=1", "warm_start.lr=1e-3", "warm_start.cpus=1",
    ])
    dev = [json.loads(line)["question"] for line in (rollout_world / "dev.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    started_ray = not ray.is_initialized()
    connect_ray(None, quiet=True)
    try:
        manifest = run_warm_start(config, str(tiny_dir), [retrieval_url], tokenizer, rollout_world / "train.jsonl",
                                  dev, tmp_path)
    finally:
        if started_ray:
            ray.shutdown()
    assert manifest["trajectories"] == 4 and manifest["steps"] == 2
    assert manifest["two_hop_trajectories"] == 1  # its first search named the bridge, the second found the answer
    assert manifest["nll_after"] < manifest["nll_before"]  # two steps at lr 1e-3 already fit the expert tokens better
    assert manifest["held_out_trajectories"] == 0 and manifest["stopped_early"] == ""
    train_ids = {json.loads(line)["id"] for line in (rollout_world / "train.jsonl").read_text().splitlines()}
    assert set(manifest["question_ids"]) <= train_ids
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the exported directory is what vLLM and the learner load
    assert (tmp_path / "tokenizer_config.json").is_file()
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    # The cache key changes with what the weights depend on, and only then.
    key = cache_key(config, str(tiny_dir), rollout_world / "train.jsonl")
    assert key == cache_key(config, str(tiny_dir), rollout_world / "train.jsonl")
    other = config.model_copy(update={"warm_start": config.warm_start.model_copy(update={"lr": 2e-3})})
    assert key != cache_key(other, str(tiny_dir), rollout_world / "train.jsonl")


def test_warm_start_stops_at_the_held_out_nll_floor(rollout_world: Path, retrieval_url: str, tiny_dir: Path,
                                                    tmp_path: Path) -> None:
    """With held-out experts and a floor above their NLL, the warm start stops after its first step and says so; the
    held-out questions are not among those it trained on."""
    import ray
    from transformers import AutoTokenizer

    from cluster.config import load_config
    from cluster.train import connect_ray
    from cluster.warm_start import run_warm_start

    config = load_config("test-tiny", [
        f"data.train_files=[{rollout_world / 'train.jsonl'}]", f"data.val_files=[{rollout_world / 'dev.jsonl'}]",
        f"retrieval.index_dir={rollout_world / 'index'}", "warm_start.enabled=true", "warm_start.questions=4",
        "warm_start.held_out=2", "warm_start.stop_nll=100", "warm_start.batch_size=1", "warm_start.epochs=2",
        "warm_start.lr=1e-3", "warm_start.cpus=1",
    ])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    started_ray = not ray.is_initialized()
    connect_ray(None, quiet=True)
    try:
        manifest = run_warm_start(config, str(tiny_dir), [retrieval_url], tokenizer, rollout_world / "train.jsonl",
                                  [], tmp_path)
    finally:
        if started_ray:
            ray.shutdown()
    assert manifest["trajectories"] == 2 and manifest["held_out_trajectories"] == 2
    assert manifest["steps"] == 1 and len(manifest["held_out_nll"]) == 1  # stopped at once: 4 steps were allowed
    assert manifest["held_out_nll"][0] <= 100 and "stop_nll" in manifest["stopped_early"]
    assert not set(manifest["question_ids"]) & set(manifest["held_out_question_ids"])
