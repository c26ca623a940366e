"""`research plan` against measurements: test-tiny's real learner step, and bench/gpu_check.py's CPU smoke mode."""

from __future__ import annotations

import json
import os
import re
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


def test_gpu_check_scores_with_the_learners_chunked_head() -> None:
    from bench import gpu_check
    from bench.gpu_check import TINY, build_model, random_batch
    from learner import logprobs

    assert gpu_check.token_logprobs is logprobs.token_logprobs  # the learner's code, not a copy
    model = build_model(TINY, torch.float32, torch.device("cpu"))
    batch = random_batch(2, 8, 24, TINY.vocab, torch.device("cpu"))
    chunked, _ = gpu_check.token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_tokens=7)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    whole = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    valid = batch["attention_mask"][:, 1:].bool()
    torch.testing.assert_close(chunked[valid], whole[valid], atol=1e-5, rtol=0)


def only_torch_and_transformers(site: Path) -> list[str]:
    """Link into `site` the top-level modules of torch, transformers and what they require (no extras): a
    site-packages holding nothing else. Returns the distributions linked."""
    from importlib import metadata

    todo, seen = ["torch", "transformers"], set()
    while todo:
        name = re.split(r"[\s<>=!~;\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency this machine does not have
        seen.add(name)
        todo += [r for r in dist.requires or [] if "extra ==" not in r]
        tops = {Path(str(f)).parts[0] for f in dist.files or []}  # packages, modules, their .dist-info
        for top in tops:
            source = Path(dist.locate_file(top))
            if top.endswith(("__pycache__", "..")) or not source.exists() or top == "bin":
                continue
            target = site / top
            if not target.exists():
                target.symlink_to(source)
    return sorted(seen)


def test_gpu_check_needs_only_torch_and_transformers(tmp_path: Path) -> None:
    # A GPU machine may have nothing but torch and transformers: run with a site-packages of only those (-S: the
    # real one is not on the path) and the repository.
    linked = only_torch_and_transformers(tmp_path)
    assert "torch" in linked and not {"pyarrow", "ray", "deepspeed", "vllm", "faiss-cpu"} & set(linked)
    done = subprocess.run([sys.executable, "-S", "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--steps", "1",
                           "--chunk-tokens", "16"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON line
    result = json.loads(lines[0])
    assert result["parameters"] == result["planned_parameters"] and result["loss"] == result["loss"]
