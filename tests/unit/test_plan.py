"""`research plan`: the memory arithmetic, ZeRO scaling, the JSON shape, the presets' verdicts, the largest micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.plan import (
    GIB,
    KNOWN_ARCHITECTURES,
    RUNTIME_BYTES,
    WIKI18_PASSAGES,
    Architecture,
    LearnerShape,
    largest_micro_batch,
    learner_breakdown,
    main,
    plan,
    resolve_architecture,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = Architecture(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=32, tie_embeddings=True)
GPU_PRESETS = ["qwen2.5-7b-instruct", "qwen2.5-7b-base", "qwen2.5-32b-instruct"]


def shape(arch: Architecture = SMALL, **changes: object) -> LearnerShape:
    base = dict(arch=arch, seq_len=10, zero_stage=0, world_size=1, p=4, checkpointing=False, reference=False,
                chunk_tokens=None)
    base.update(changes)
    return LearnerShape(**base)


def test_parameter_count_by_hand() -> None:
    # head dim 4: q 8x8 + k, v 8x4 each + o 8x8 + biases 16 = 208; MLP 3x8x16 = 384; norms 16 -> 608 per layer.
    assert SMALL.params == 32 * 8 + 2 * 608 + 8
    # The public Qwen2.5 sizes: 7.62B and 32.76B parameters.
    assert round(KNOWN_ARCHITECTURES["qwen/qwen2.5-7b-instruct"].params / 1e9, 2) == 7.62
    assert round(KNOWN_ARCHITECTURES["qwen/qwen2.5-32b-instruct"].params / 1e9, 2) == 32.76


def test_learner_arithmetic_of_a_small_model() -> None:
    n = SMALL.params
    parts, peak, figures = learner_breakdown(shape(), micro_batch=2)
    # fp32 ZeRO-0 (plain AdamW): weights, gradients, m and v; no master copy, no bucket.
    assert parts["parameters"] == parts["gradients"] == 4 * n
    assert parts["optimizer (adam m, v, fp32 master)"] == 8 * n
    assert "fp32 gradients" not in parts and "reduce bucket" not in parts
    # 20 tokens; per layer and token 24h + p(5h + 4I) = 192 + 416 bytes, plus the 2 x 10 x 10 fp32 additive mask.
    per_layer = 608 * 20 + 4 * 200
    edges = 12 * 8 * 20 + 200
    assert parts["activations (all layers)"] == 2 * per_layer + edges
    assert parts["activation gradients (one layer)"] == per_layer
    assert parts["log-probs"] == 3 * 20 * 32 * 4
    assert peak == 16 * n + RUNTIME_BYTES + 3 * per_layer + edges + 3 * 20 * 32 * 4
    assert figures["without_checkpointing"] == 3 * per_layer + edges


def test_checkpointing_keeps_layer_inputs_and_one_layer() -> None:
    parts, peak, _ = learner_breakdown(shape(checkpointing=True), micro_batch=2)
    per_layer = 608 * 20 + 4 * 200
    inputs = 2 * 4 * 8 * 20 + 12 * 8 * 20 + 200
    assert parts["activations (checkpointed layer inputs)"] == inputs
    static = 16 * SMALL.params + RUNTIME_BYTES
    assert peak == static + inputs + max(2 * per_layer, 3 * 20 * 32 * 4)


def test_zero_stages_partition_optimizer_then_gradients_then_parameters() -> None:
    arch = KNOWN_ARCHITECTURES["qwen/qwen2.5-7b-instruct"]
    n, w = arch.params, 8
    by_stage = {s: learner_breakdown(shape(arch, zero_stage=s, world_size=w, p=2), 1)[0] for s in range(4)}
    optimizer = "optimizer (adam m, v, fp32 master)"
    assert by_stage[0][optimizer] == 12 * n and by_stage[0]["fp32 gradients"] == 4 * n
    for stage in (1, 2, 3):
        assert by_stage[stage][optimizer] == 12 * n / w
        assert by_stage[stage]["fp32 gradients"] == 4 * n / w
    assert by_stage[1]["gradients"] == 2 * n and by_stage[2]["gradients"] == by_stage[3]["gradients"] == 2 * n / w
    assert by_stage[2]["parameters"] == 2 * n and by_stage[3]["parameters"] == 2 * n / w
    assert "zero3 gathered parameters" in by_stage[3] and "zero3 gathered parameters" not in by_stage[2]
    # A reference policy is partitioned only under ZeRO-3.
    assert learner_breakdown(shape(arch, zero_stage=3, world_size=w, p=2, reference=True), 1)[0]["reference policy"] == 2 * n / w
    assert learner_breakdown(shape(arch, zero_stage=2, world_size=w, p=2, reference=True), 1)[0]["reference policy"] == 2 * n


def test_logprob_chunk_caps_the_logit_memory() -> None:
    arch = KNOWN_ARCHITECTURES["qwen/qwen2.5-7b-instruct"]
    whole = learner_breakdown(shape(arch, seq_len=8704, p=2, checkpointing=True), 2)[0]["log-probs"]
    chunked = learner_breakdown(shape(arch, seq_len=8704, p=2, checkpointing=True, chunk_tokens=1024), 2)[0]["log-probs"]
    assert whole == 3 * 2 * 8704 * arch.vocab * 4
    assert chunked == 3 * 1024 * arch.vocab * 4


def test_largest_micro_batch() -> None:
    s = shape(seq_len=64)
    capacity = learner_breakdown(s, 5)[1]
    assert largest_micro_batch(s, capacity) == 5
    assert largest_micro_batch(s, capacity - 1) == 4
    assert largest_micro_batch(s, learner_breakdown(s, 1)[1] - 1) == 0


def test_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test-tiny", "--json", "hardware.host_memory_gib=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"learner_rank", "rollout_engine", "retrieval_replica"}
    for role in out.values():
        assert isinstance(role["estimate_gib"], float) and role["capacity_gib"] == 16.0
        assert isinstance(role["fits"], bool)
        assert isinstance(role["breakdown_gib"], dict)
    assert out["learner_rank"]["max_micro_batch"] >= out["learner_rank"]["micro_batch_size"]
    assert out["rollout_engine"]["kv_tokens"] > 0


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-cpu", "hardware.host_memory_gib=24"]) == 0
    out = capsys.readouterr().out
    assert "learner_rank" in out and "largest micro-batch that fits" in out and "KV cache" in out


def test_gpu_presets_get_a_verdict_without_building_or_downloading_anything() -> None:
    # In a fresh interpreter: planning must not import torch (so nothing is built or downloaded).
    code = (
        "import json, sys; from cluster.plan import main; "
        f"codes = [main([name, '--json']) for name in {GPU_PRESETS!r}]; "
        "assert codes == [0, 0, 0], codes; assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    verdicts = [json.loads(chunk) for chunk in done.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert len(verdicts) == 3 and all(isinstance(v["learner_rank"]["fits"], bool) for v in verdicts)


def test_seven_b_on_a100_40gb_verdicts() -> None:
    config = load_config("qwen2.5-7b-instruct")
    plans = plan(config)
    learner, rollout, retrieval = plans["learner_rank"], plans["rollout_engine"], plans["retrieval_replica"]
    assert learner.capacity == 40 * GIB and learner.extra["seq_len"] == 8704
    assert learner.fits  # log-probs in 1,024-token chunks (learner.logprob_chunk_tokens)
    # Whole-micro-batch log-probs of 2 x 8704 tokens x 152k vocabulary (29.6 GiB) would not fit.
    assert not plan(load_config("qwen2.5-7b-instruct", ["learner.logprob_chunk_tokens=0"]))["learner_rank"].fits
    # KV per token per GPU at TP 2: 2 x 28 layers x 2 KV heads x 128 x 2 bytes.
    assert rollout.extra["kv_bytes_per_token"] == 28672 and rollout.fits
    assert retrieval.breakdown["index"] == WIKI18_PASSAGES * 768 * 4 and retrieval.fits


def test_builtin_policies_resolve_without_a_build() -> None:
    tiny = resolve_architecture("tiny-random-qwen2")
    assert (tiny.layers, tiny.hidden, tiny.kv_heads) == (3, 128, 2)
    assert resolve_architecture("smollm2-135m-instruct").vocab == 49152


def test_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["qwen2.5-7b-instruct", "hardware.gpu_memory_gib=null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hardware.gpu_memory_gib" in err
    assert main(["test-tiny", "policy.name_or_path=someone/unknown-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["no-such-preset"]) == 2
