"""The DeepSpeed learner: token logprobs in micro-batches and the GRPO train step.

One LearnerEngine lives in each learner rank. `train_step` takes the *global* batch (every rank gets the same
one), computes group advantages over all of it, and then works on this rank's rows: recompute current (and
reference) logprobs micro-batch by micro-batch, apply the GRPO loss with the loss mask, accumulate gradients,
and step once per mini-batch. Each micro-batch's loss is weighted by its share of the global normaliser (tokens
for token-mean, sequences otherwise), so any world size and micro-batch size gives the update of the whole batch.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.grpo import group_advantages, policy_loss
from learner.logprobs import DEFAULT_CHUNK_TOKENS, token_logprobs

# Token-weighted metrics summed over micro-batches and ranks, then divided by the token count.
_TOKEN_METRICS = ("clip_fraction", "approx_kl", "ref_kl", "entropy")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def disable_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling deepspeed_shm_comm at init (~25 s, 66 MB of /dev/shm per rank)."""
    # importlib, not `import deepspeed.ops`: Ray actors cannot cloudpickle a module bound at import time.
    ops = importlib.import_module("deepspeed.ops")
    ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(
    rank: int | None = None, world_size: int | None = None, master_addr: str | None = None, master_port: int | None = None
) -> None:
    """Join (or create) DeepSpeed's default process group: gloo on CPU, NCCL on GPU; a no-op if one exists.

    Arguments left None come from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), else a
    one-process group on 127.0.0.1 and a free port.
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    disable_shm_comm()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = master_port or int(os.environ.get("MASTER_PORT", 0)) or free_port()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=world_size, verbose=False)
    # Single-process ZeRO-3 aborts at interpreter exit while a process group is still alive.
    atexit.register(destroy_distributed)


def destroy_distributed() -> None:
    """Destroy the default process group if one is alive (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_dtype(config: LearnerConfig) -> torch.dtype:
    """The training dtype: bf16 on GPU and fp32 on CPU unless the config names one."""
    if config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    micro_batch_size: int,
    device: torch.device,
    temperature: float = 1.0,
    rows: Sequence[tuple[int, int]] | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Next-token logprobs of a batch, (B, T-1), micro-batch by micro-batch; 0 on padding and on rows not asked for.

    `rows` lists [start, stop) ranges to compute (default: the whole batch); `chunk_tokens` as in token_logprobs.
    """
    out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
    for first, last in rows if rows is not None else [(0, batch.size)]:
        for start in range(first, last, micro_batch_size):
            micro = batch.rows(start, min(start + micro_batch_size, last)).to(device)
            logprobs, _ = token_logprobs(
                model, micro.input_ids, micro.attention_mask, temperature=temperature, chunk_tokens=chunk_tokens
            )
            out[start : start + micro.size, : logprobs.shape[1]] = logprobs.float().cpu()
    return out


def lr_lambda(config: LearnerConfig):  # noqa: ANN201 - a LambdaLR multiplier
    """LR multiplier per optimizer step: constant, or linear warm-up over `warmup_steps` then constant."""
    if config.lr_schedule == "constant" or config.warmup_steps == 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / config.warmup_steps)


def deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the learner config."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        # Accumulation boundaries are set by hand in train_step; the batch size here is only bookkeeping.
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if resolve_dtype(config) == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
        if config.zero_stage > 0:
            # Without it DeepSpeed 0.19.8 sums micro-batch gradients in bf16. With it, stage 1 becomes the
            # BF16_Optimizer (fp32 gradient buffers) and stages 2-3 keep fp32 gradient partitions. Stage 0 raises
            # NotImplementedError on this mix, so there bf16 accumulation stays (use stage >= 1 to avoid it).
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if config.zero_stage == 3:
        # Gather whole layers at once on small models; big models still prefetch in bounded buckets.
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
    return ds


@contextmanager
def partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` inside this block builds the model under deepspeed.zero.Init: each rank
    materialises only its 1/world share of every weight, so a 32B policy never has to fit whole on one rank.
    Scoped, because transformers reads it from a process-wide reference."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


class LearnerEngine:
    """A policy under DeepSpeed (ZeRO 0-3) with AdamW, LR schedule, clipping and the GRPO train step."""

    def __init__(self, config: LearnerConfig, model_path: str, device: str | torch.device | None = None) -> None:
        import deepspeed

        self.config = config
        init_distributed()  # single-process use; Learner actors have already joined their group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config)
        ds_config = deepspeed_config(config)
        with partitioned_loading(ds_config):
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        schedule = lr_lambda(config)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config,
        )
        self.reference = None
        if config.grpo.kl_coef > 0:
            from learner.reference import ReferencePolicy

            self.reference = ReferencePolicy(config, model_path, self.device)
        self.step = 0

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (partitioned placeholders under ZeRO-3)."""
        return self.engine.module

    def compute_logprobs(self, batch: TrainBatch, rows: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Current-policy logprobs of the batch (or of `rows`), (B, T-1) on CPU, 0 on padding; no gradient."""
        self.engine.eval()
        temperature = self.config.grpo.logit_temperature
        return batch_logprobs(
            self.engine, batch, self.config.micro_batch_size, self.device, temperature, rows,
            self.config.logprob_chunk_tokens,
        )

    def _rank_rows(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous share of rows [start, stop)."""
        share = (stop - start) // self.world_size
        return start + self.rank * share, start + (self.rank + 1) * share

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on the global `batch` (ppo_epochs x mini_batches optimizer steps); returns metrics."""
        config, grpo = self.config, self.config.grpo
        started = time.perf_counter()
        steps_per_batch = config.mini_batches * self.world_size
        if batch.size % steps_per_batch:
            raise ValueError(
                f"batch of {batch.size} trajectories does not split into {config.mini_batches} mini-batches "
                f"x {self.world_size} ranks"
            )
        advantages = group_advantages(batch.rewards, batch.group_size, grpo.eps, grpo.scale_by_std)
        max_length = batch.max_response_length
        mini_size = batch.size // config.mini_batches
        old_logprobs = batch.behaviour_logprobs
        if grpo.recompute_old_logprobs:
            # This rank's rows of every mini-batch, scored before the first update of the step (verl's old_log_prob).
            mine = [self._rank_rows(start, start + mini_size) for start in range(0, batch.size, mini_size)]
            old_logprobs = self.compute_logprobs(batch, mine)
        totals: dict[str, float] = {}
        self.engine.train()
        for _ in range(config.ppo_epochs):
            for mini_start in range(0, batch.size, mini_size):
                lr = self.engine.get_lr()[0]
                sums = self._accumulate(batch, advantages, old_logprobs, mini_start, mini_start + mini_size, max_length)
                self.engine.step()
                self.step += 1
                sums["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
                sums["lr"] = lr
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
        updates = config.ppo_epochs * config.mini_batches
        metrics = {key: value / updates for key, value in totals.items()}
        metrics["reward_mean"] = float(batch.rewards.mean())
        metrics["advantage_abs_mean"] = float(advantages.abs().mean())
        metrics["response_tokens_mean"] = float(batch.loss_mask.sum(dim=1).mean())
        metrics["step_seconds"] = time.perf_counter() - started
        return metrics

    def _accumulate(
        self,
        batch: TrainBatch,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor,
        start: int,
        stop: int,
        max_length: int,
    ) -> dict[str, float]:
        """Forward/backward this rank's rows of one mini-batch in micro-batches; return the mini-batch metrics."""
        config, grpo = self.config, self.config.grpo
        token_level = grpo.agg == "token-mean"
        # The normaliser of the whole mini-batch across all ranks, known locally since every rank has the batch.
        global_tokens = float(batch.loss_mask[start:stop].sum())
        normaliser = max(global_tokens, 1.0) if token_level else float(stop - start)
        rank_start, rank_stop = self._rank_rows(start, stop)
        local = torch.zeros(2 + len(_TOKEN_METRICS), dtype=torch.float64)  # loss, kl_loss, token metrics
        micro_starts = list(range(rank_start, rank_stop, config.micro_batch_size))
        for index, micro_start in enumerate(micro_starts):
            micro_stop = min(micro_start + config.micro_batch_size, rank_stop)
            micro = batch.rows(micro_start, micro_stop).to(self.device)
            ref_logprobs = None
            if self.reference is not None:
                ref_logprobs = self.reference.logprobs(micro)
            logprobs, entropy = token_logprobs(
                self.engine,
                micro.input_ids,
                micro.attention_mask,
                with_entropy=True,
                temperature=grpo.logit_temperature,
                chunk_tokens=config.logprob_chunk_tokens,
            )
            loss, metrics = policy_loss(
                logprobs,
                old_logprobs[micro_start:micro_stop, : logprobs.shape[1]].to(self.device),
                advantages[micro_start:micro_stop].to(self.device),
                micro.loss_mask,
                clip=grpo.clip,
                agg=grpo.agg,
                ref_logprobs=ref_logprobs,
                kl_coef=grpo.kl_coef,
                clip_high=grpo.clip_high,
                kl_estimator=grpo.kl_estimator,
                entropy=entropy,
                max_length=max_length,
            )
            tokens = float(micro.loss_mask.sum())
            share = (tokens if token_level else float(micro.size)) / normaliser
            self.engine.set_gradient_accumulation_boundary(index == len(micro_starts) - 1)
            # DeepSpeed averages gradients over ranks; scaling by the world size turns that into the global sum.
            self.engine.backward(loss * (share * self.world_size), scale_wrt_gas=False)
            local[0] += float(loss.detach()) * share
            local[1] += metrics["kl_loss"] * share
            for i, name in enumerate(_TOKEN_METRICS, start=2):
                local[i] += metrics.get(name, 0.0) * tokens
        if self.world_size > 1:
            dist.all_reduce(local)
        result = {"loss": float(local[0]), "policy_loss": float(local[0] - local[1]), "kl_loss": float(local[1])}
        for i, name in enumerate(_TOKEN_METRICS, start=2):
            if name != "ref_kl" or self.reference is not None:
                result[name] = float(local[i]) / max(global_tokens, 1.0)
        return result

    @contextmanager
    def _gathered(self, parameter: torch.nn.Parameter) -> Iterator[torch.Tensor]:
        """The full tensor of one parameter (gathered across ranks under ZeRO-3) for the duration of the block."""
        if self.config.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                yield parameter.data
        else:
            yield parameter.data

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one parameter at a time; every rank must iterate (a collective under ZeRO-3).

        The yielded tensor is valid only until the next item: copy it out if it must outlive the iteration.
        """
        for name, parameter in self.module.named_parameters():
            with self._gathered(parameter) as full:
                yield name, full

    def close(self) -> None:
        """Tear down the process group (single-process ZeRO-3 otherwise aborts at interpreter exit)."""
        if dist.is_initialized():
            dist.barrier()
        destroy_distributed()
