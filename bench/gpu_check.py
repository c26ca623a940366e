"""GPU check: one learner step of a random ~1.5B Qwen2 at 8,192-token responses, peak memory vs `research plan`.

One command on a one-GPU machine where only torch and transformers are installed (DeepSpeed optional,
`--deepspeed`), run from the repository root:

    python -m bench.gpu_check                       # one CUDA GPU: micro-batch 1 x (512 + 8192) tokens, 3 steps
    python -m bench.gpu_check --device cpu --tiny   # smoke run on CPU in seconds (what the tests run)

It prints one JSON line. The model is random-weight with Qwen2.5-1.5B's shape (28 layers, hidden 1536, intermediate
8960, 12 heads, 2 KV heads, vocabulary 151,936, tied embeddings) in bf16 with gradient checkpointing; log-probs and
entropy come from the learner's own chunked head (`learner.logprobs.token_logprobs`, `--chunk-tokens` positions at a
time, recomputed in backward), the loss is a clipped-ratio GRPO surrogate with the learner's entropy bonus, and AdamW
steps on fp32 master weights (what DeepSpeed's bf16 optimizer keeps: bf16 weights and gradients, fp32 master,
moments and gradient copy). The JSON holds the peak CUDA memory (allocated and reserved) against cluster.plan's
estimate for the same shape, and tokens/s.

Not yet run on a GPU: the figures it prints there are still to be recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from cluster.plan import GIB, RUNTIME_BYTES, Architecture, LearnerShape, learner_breakdown
from learner.logprobs import token_logprobs

ENTROPY_COEF = 0.001  # learner.grpo.entropy_coef's default: the entropy's gradient flows too, as in the learner

QWEN25_15B = Architecture(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936,
                          tie_embeddings=True)
TINY = Architecture(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, tie_embeddings=True)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (no fp32 copy of a 1.5B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(arch: Architecture, dtype: torch.dtype, device: torch.device) -> Qwen2ForCausalLM:
    """A random-weight Qwen2ForCausalLM of `arch` on `device`, SDPA attention, gradient checkpointing on."""
    config = Qwen2Config(
        vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        tie_word_embeddings=arch.tie_embeddings, max_position_embeddings=32768, use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with default_dtype(dtype), device:
        model = Qwen2ForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def grpo_surrogate(logprobs: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """Token-mean clipped-ratio objective (the GRPO policy term without KL)."""
    ratio = torch.exp(logprobs - old)
    surrogate = torch.minimum(ratio * advantages[:, None], ratio.clamp(1 - clip, 1 + clip) * advantages[:, None])
    return -(surrogate * mask).sum() / mask.sum().clamp(min=1)


class MixedPrecisionAdamW:
    """AdamW on fp32 master copies of low-precision weights: fp32 gradient copy, step, weights copied back."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params = params
        self.mixed = params[0].dtype != torch.float32
        self.master = [p.detach().float().clone() for p in params] if self.mixed else params
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def step(self) -> None:
        """Clip, step and copy back; frees the gradients."""
        if self.mixed:
            for param, master in zip(self.params, self.master, strict=True):
                master.grad = param.grad.float() if param.grad is not None else None
                param.grad = None
        torch.nn.utils.clip_grad_norm_(self.master, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.mixed:
            with torch.no_grad():
                for param, master in zip(self.params, self.master, strict=True):
                    param.copy_(master)


def random_batch(micro_batch: int, prompt: int, response: int, vocab: int, device: torch.device) -> dict[str, Any]:
    """Random token rows of prompt + response, the last row a token short so the batch is padded."""
    generator = torch.Generator().manual_seed(0)
    length = prompt + response
    input_ids = torch.randint(10, vocab, (micro_batch, length), generator=generator)
    attention_mask = torch.ones(micro_batch, length, dtype=torch.long)
    if micro_batch > 1:
        attention_mask[-1, -1] = 0
    loss_mask = torch.zeros(micro_batch, length - 1)
    loss_mask[:, prompt - 1 :] = attention_mask[:, prompt:].float()
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "loss_mask": loss_mask.to(device),
        "old": torch.full((micro_batch, length - 1), -5.0, device=device),
        "advantages": torch.linspace(-1, 1, micro_batch, device=device),
    }


def _host_peak_bytes() -> float:
    """Peak RSS of this process (VmHWM), for CPU runs."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024.0
    return 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, step `args.steps` times, and return memory and throughput against the planner's estimate."""
    device = torch.device(args.device)
    arch = TINY if args.tiny else QWEN25_15B
    prompt, response = (16, 48) if args.tiny else (args.prompt_tokens, args.response_tokens)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = build_model(arch, dtype, device)
    batch = random_batch(args.micro_batch, prompt, response, arch.vocab, device)
    if args.deepspeed:
        step, backward, zero_stage = _deepspeed_step(model, dtype, args)
    else:
        optimizer = MixedPrecisionAdamW(list(model.parameters()), lr=1e-6)
        step, backward, zero_stage = optimizer.step, (lambda loss: loss.backward()), 0
    tokens = args.micro_batch * (prompt + response)
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        logprobs, entropy = token_logprobs(model, batch["input_ids"], batch["attention_mask"], with_entropy=True,
                                           chunk_tokens=args.chunk_tokens, entropy_grad=True)
        mask = batch["loss_mask"]
        loss = grpo_surrogate(logprobs, batch["old"], batch["advantages"], mask)
        loss = loss - ENTROPY_COEF * (entropy * mask).sum() / mask.sum().clamp(min=1)
        backward(loss)
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    shape = LearnerShape(arch=arch, seq_len=prompt + response, zero_stage=zero_stage, world_size=1,
                         p=2 if dtype == torch.bfloat16 else 4, checkpointing=True, reference=False,
                         chunk_tokens=args.chunk_tokens)
    parts, estimate, _ = learner_breakdown(shape, args.micro_batch)
    steady = seconds[1:] or seconds
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "planned_parameters": arch.params,
        "dtype": str(dtype).removeprefix("torch."),
        "micro_batch": args.micro_batch,
        "seq_len": prompt + response,
        "chunk_tokens": args.chunk_tokens,
        "deepspeed_zero_stage": zero_stage if args.deepspeed else None,
        "step_seconds": [round(s, 3) for s in seconds],
        "tokens_per_second": round(tokens / (sum(steady) / len(steady)), 1),
        "estimate_gib": round(estimate / GIB, 3),
        "estimate_without_runtime_gib": round((estimate - RUNTIME_BYTES) / GIB, 3),
        "estimate_breakdown_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
        "loss": float(loss.detach()),
    }
    if device.type == "cuda":
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
        result["ratio_estimate_to_reserved"] = round((estimate - RUNTIME_BYTES) / torch.cuda.max_memory_reserved(device), 3)
    else:
        result["peak_rss_gib"] = round(_host_peak_bytes() / GIB, 3)
    return result


def _deepspeed_step(model: torch.nn.Module, dtype: torch.dtype, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(step, backward, stage) of a one-process DeepSpeed engine at --zero-stage (DeepSpeed must be installed)."""
    import os
    import socket

    import deepspeed

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:  # a one-process group still listens on a port: take a free one
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    on_cuda = args.device.startswith("cuda")
    if not on_cuda:  # skip the ~25 s JIT build of DeepSpeed's shared-memory CPU collectives (one process needs none)
        importlib.import_module("deepspeed.ops").__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero_stage},
        "zero_allow_untested_optimizer": True,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine.step, engine.backward, args.zero_stage


def main(argv: list[str] | None = None) -> int:
    """Run the check and print its figures (one JSON object with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and 64 tokens: a smoke run in seconds")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=8192)
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="positions whose logits exist at once")
    parser.add_argument("--steps", type=int, default=3, help="steps (the first warms up; tokens/s is over the rest)")
    parser.add_argument("--deepspeed", action="store_true", help="DeepSpeed engine instead of the plain loop")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--json", action="store_true", help="one JSON line (the default; kept for scripts)")
    parser.add_argument("--table", action="store_true", help="one 'key: value' line per figure instead of JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --tiny for the smoke run)", file=sys.stderr)
        return 2
    result = run(args)
    if not args.table:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key:>30}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
