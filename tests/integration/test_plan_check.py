"""`research plan` against measurements: test-tiny's real learner step, and bench/gpu_check.py's CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _run_module(module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run `python -m module args --json` from the repository root in a fresh process (its own peak RSS)."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=600,
        # Without the rendezvous variables an earlier test's process group left in this process's environment: the
        # child would try to serve the same MASTER_PORT, which that group still holds.
        env={**{k: v for k, v in os.environ.items()
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_learner_peak_is_within_30_percent_of_the_plan() -> None:
    # A fixed mmap threshold makes glibc hand freed tensors back at once, so RSS follows live bytes (what the plan
    # counts) instead of what the heap happened to keep; bench/RESULTS.md has the default-allocator figure too.
    result = _run_module("bench.plan_check", "test-tiny", "--steps", "2", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result["micro_batch_size"] == 8 and result["seq_len"] == 608
    assert 0.7 <= result["ratio"] <= 1.3, result


def test_gpu_check_smoke_on_cpu() -> None:
    result = _run_module("bench.gpu_check", "--device", "cpu", "--tiny", "--micro-batch", "2", "--chunk-tokens", "16",
                         "--steps", "2")
    assert result["parameters"] == result["planned_parameters"]
    assert result["seq_len"] == 64 and result["tokens_per_second"] > 0
    assert result["estimate_gib"] > 0 and result["peak_rss_gib"] > 0


def test_chunked_logprobs_match_the_whole_softmax() -> None:
    from bench.gpu_check import TINY, build_model, chunked_token_logprobs, random_batch

    model = build_model(TINY, torch.float32, torch.device("cpu"))
    batch = random_batch(2, 8, 24, TINY.vocab, torch.device("cpu"))
    chunked = chunked_token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_tokens=7)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    whole = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
