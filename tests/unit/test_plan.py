"""`research plan`: the memory arithmetic, ZeRO scaling, the JSON shape, the presets' verdicts, the largest micro-batch."""

from __future__ import annotations

import json
import re
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
    # Whole logits: autograd's LM head weight gradient, in the training dtype, before ZeRO reduces it.
    assert parts["lm head weight gradient"] == 4 * 32 * 8
    assert peak == 16 * n + RUNTIME_BYTES + 3 * per_layer + edges + 3 * 20 * 32 * 4 + 4 * 32 * 8
    assert figures["without_checkpointing"] == 3 * per_layer + edges


def test_checkpointing_keeps_layer_inputs_and_one_layer() -> None:
    parts, peak, _ = learner_breakdown(shape(checkpointing=True), micro_batch=2)
    per_layer = 608 * 20 + 4 * 200
    inputs = 2 * 4 * 8 * 20 + 12 * 8 * 20 + 200
    assert parts["activations (checkpointed layer inputs)"] == inputs
    static = 16 * SMALL.params + RUNTIME_BYTES
    assert peak == static + inputs + max(2 * per_layer, 3 * 20 * 32 * 4 + 4 * 32 * 8)


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
    assert set(out) == {"learner_rank", "rollout_engine", "retrieval_replica", "placement"}
    assert out.pop("placement") == []  # test-tiny names no launch files or nodes
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
    config = load_config("qwen2.5-7b-instruct", ["hardware.gpu_memory_gib=40"])
    plans = plan(config)
    learner, rollout, retrieval = plans["learner_rank"], plans["rollout_engine"], plans["retrieval_replica"]
    assert learner.capacity == 40 * GIB and learner.extra["seq_len"] == 8704
    assert learner.fits  # log-probs in 1,024-token chunks (learner.logprob_chunk_tokens)
    # Whole-micro-batch log-probs of 2 x 8704 tokens x 152k vocabulary (29.6 GiB) would not fit.
    assert not plan(load_config("qwen2.5-7b-instruct", ["learner.logprob_chunk_tokens=0", "hardware.gpu_memory_gib=40"])
                    )["learner_rank"].fits
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


def test_rank0_counts_the_weight_sync_buffers_communicator_and_head_gradient() -> None:
    config = load_config("qwen2.5-7b-instruct")
    learner, rollout = plan(config)["learner_rank"], plan(config)["rollout_engine"]
    embedding = 152064 * 3584  # the largest tensor: it travels as one bucket, larger than the 256 MiB ones
    assert learner.breakdown["weight-sync buffers (rank 0)"] == 2 * 2 * embedding  # two bf16 buffers, 2 x 1.02 GiB
    assert learner.breakdown["weight-sync communicator (rank 0)"] == 0.5 * GIB
    # The chunked head's fp32 weight gradient and its bf16 cast are both alive at the end of its backward.
    assert learner.breakdown["lm head weight gradient"] == (4 + 2) * embedding
    assert learner.per == "1 GPU, rank 0"
    # Every engine worker receives whole buckets outside vLLM's budget: they must fit in what it leaves.
    assert rollout.extra["outside_vllm_budget_gib"]["weight-sync receive buffer"] == round(2 * embedding / GIB, 3)
    squeezed = plan(load_config("qwen2.5-7b-instruct", ["rollout.engine.gpu_memory_utilization=0.99"]))
    assert not squeezed["rollout_engine"].fits and "do not fit" in squeezed["rollout_engine"].notes[0]


def test_exit_code_1_when_a_role_or_the_placement_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    # 32B on 40 GB A100s: the learner rank does not fit (it used to print "NO" and exit 0).
    assert main(["qwen2.5-32b-instruct", "hardware.gpu_memory_gib=40", "hardware.launch_files=[]"]) == 1
    assert "NO" in capsys.readouterr().out
    assert main(["qwen2.5-32b-instruct"]) == 0
    # Memory fits but 17 ranks do not find 17 learner_node units on two 8-unit nodes.
    assert main(["qwen2.5-32b-instruct", "learner.world_size=17", "--launch", "cluster/launch/rayjob-32b.yaml"]) == 1
    assert "1 of 17 learner ranks" in capsys.readouterr().out
    nodes = "hardware.nodes=[{count: 2, cpus: 96, gpus: 8, resources: {learner_node: 8, rollout_node: 8, retrieval_node: 1}, head: true}]"
    assert main(["qwen2.5-7b-instruct", "hardware.launch_files=[]", nodes, "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)["placement"][0]
    assert verdict["source"] == "hardware.nodes" and verdict["fits"] and verdict["gpus"] == 16


def test_model_shape_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # A hub model none of the built-in numbers know, already in the cache (as `huggingface-cli download` leaves it).
    llama = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(llama))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    arch = resolve_architecture("meta-llama/Llama-3.1-8B")
    assert round(arch.params / 1e9, 2) == 8.03 and not arch.qkv_bias  # Llama 3.1 8B: 8.03B parameters
    assert main(["qwen2.5-7b-instruct", "policy.name_or_path=meta-llama/Llama-3.1-8B"]) == 0
    assert "model shape from " + str(repo / "snapshots" / "abc123" / "config.json") in capsys.readouterr().out
    # A local directory's config.json is read the same way.
    local = tmp_path / "my-policy"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(llama))
    assert resolve_architecture(str(local)) == arch


def test_readme_plan_blocks_are_the_tools_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty: the shapes come from the built-in table, as printed
    blocks = re.findall(r"```text\n\$ research plan ([^\n]+)\n(.*?)\n```", (REPO / "README.md").read_text(), re.DOTALL)
    assert len(blocks) >= 2
    for args, printed in blocks:
        assert main(args.split()) == 0
        assert capsys.readouterr().out.rstrip("\n") == printed, f"README block of `research plan {args}` is stale"
