"""The learner's training step: one GRPO update of a DeepSpeed policy on a batch of trajectories.

    train_step -> pad rows to split evenly over ranks and mini-batches; old logprobs (the sampler's, or recomputed);
                  per mini-batch: _update (forward, policy_loss, backward per micro-batch) and one optimizer step

Every rank gets the same global batch (token ids, loss mask, behaviour logprobs, advantages) and works on its own
contiguous rows of each mini-batch. Each micro-batch's loss is weighted by its share of the mini-batch
(learner.grpo.micro_batch_share): of its trajectories, as the reference, or of its tokens for token-mean with
`micro_batch_weight: tokens`, which makes any world size and micro-batch size give the update of the whole batch.
The learner knows nothing of search, tags or groups: advantages come computed (learner.grpo).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.distributed import (
    collective_device,
    deepspeed_config,
    destroy_distributed,
    gathered,
    init_distributed,
    load_model,
    resolve_dtype,
)
from learner.grpo import GRPOLoss
from learner.logprobs import batch_logprobs, token_logprobs

# Token-weighted metrics summed over micro-batches and ranks, then divided by the token count.
_TOKEN_METRICS = ("clip_fraction_binding", "clip_fraction_ratio", "approx_kl", "ref_kl", "entropy", "behaviour_weight")


class LearnerEngine:
    """A policy under DeepSpeed (ZeRO 0-3) with AdamW, LR schedule, clipping and the GRPO train step."""

    def __init__(self, config: LearnerConfig, model_path: str, device: str | torch.device | None = None) -> None:
        import deepspeed

        self.config = config
        init_distributed()  # single-process use; Learner actors have already joined their group
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config)
        model = load_model(config, model_path, trainable=True)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        warmup = config.warmup_steps if config.lr_schedule == "warmup" else 0
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0),
        )
        self.loss = GRPOLoss(config.grpo)
        self.reference = None
        if config.grpo.kl_coef > 0:
            from learner.reference import ReferencePolicy

            self.reference = ReferencePolicy(config, model_path, self.device)
        self.step = 0

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on the global `batch` (ppo_epochs x mini_batches optimizer steps); returns metrics."""
        config, grpo = self.config, self.config.grpo
        started = time.perf_counter()
        real_rows = batch.size
        # Rows that let the batch split over ranks and mini-batches carry no loss (an epoch's last batch is partial).
        batch = batch.padded(config.mini_batches * self.world_size)
        mini_size = batch.size // config.mini_batches
        batch = batch.dealt(self.world_size, mini_size)  # balanced ranks: ZeRO runs at the slowest rank's pace
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
                metrics = self._update(batch, old_logprobs, mini_start, mini_start + mini_size)
                self.engine.step()
                self.step += 1
                metrics.update(grad_norm=float(self.engine.get_global_grad_norm() or 0.0), lr=lr)
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
        updates = config.ppo_epochs * config.mini_batches
        metrics = {key: value / updates for key, value in totals.items()}
        real = batch.real.bool()
        metrics.update(
            reward_mean=float(batch.rewards[real].mean()), advantage_abs_mean=float(batch.advantages[real].abs().mean()),
            response_tokens_mean=float(batch.loss_mask[real].sum(dim=1).mean()), padding_rows=float(batch.size - real_rows),
            step_seconds=time.perf_counter() - started,
        )
        return metrics

    def _update(self, batch: TrainBatch, old_logprobs: torch.Tensor, start: int, stop: int) -> dict[str, float]:
        """Forward/backward this rank's rows of mini-batch [start, stop) in micro-batches; its metrics."""
        config, grpo = self.config, self.config.grpo
        global_tokens = float(batch.loss_mask[start:stop].sum())  # every rank has the whole batch
        rank_start, rank_stop = self._rank_rows(start, stop)
        local = torch.zeros(2 + len(_TOKEN_METRICS), dtype=torch.float64)  # loss, kl_loss, token metrics
        micro_starts = list(range(rank_start, rank_stop, config.micro_batch_size))
        for index, micro_start in enumerate(micro_starts):
            micro_stop = min(micro_start + config.micro_batch_size, rank_stop)
            micro = batch.rows(micro_start, micro_stop).to(self.device)
            ref_logprobs = self.reference.logprobs(micro) if self.reference is not None else None
            logprobs, entropy = token_logprobs(self.engine, micro.input_ids, micro.attention_mask, with_entropy=True,
                                               temperature=grpo.logit_temperature, entropy_grad=grpo.entropy_coef > 0,
                                               chunk_tokens=config.logprob_chunk_tokens)
            loss, metrics = self.loss(
                logprobs, old_logprobs[micro_start:micro_stop, : logprobs.shape[1]].to(self.device),
                micro.advantages, micro.loss_mask, ref_logprobs=ref_logprobs, entropy=entropy,
                max_length=batch.max_response_length, behaviour_logprobs=micro.behaviour_logprobs,
            )
            tokens = float(micro.loss_mask.sum())
            share = self.loss.share(micro.loss_mask, micro.real, batch.loss_mask[start:stop], batch.real[start:stop])
            self.engine.set_gradient_accumulation_boundary(index == len(micro_starts) - 1)
            # DeepSpeed averages gradients over ranks; scaling by the world size turns that into the global sum.
            self.engine.backward(loss * (share * self.world_size), scale_wrt_gas=False)
            local[0] += float(loss.detach()) * share
            local[1] += metrics["kl_loss"] * share
            for i, name in enumerate(_TOKEN_METRICS, start=2):
                local[i] += metrics.get(name, 0.0) * tokens
        if self.world_size > 1:
            # On GPUs the default group is NCCL, which reduces CUDA tensors only.
            reduced = local.to(collective_device())
            dist.all_reduce(reduced)
            local = reduced.cpu()
        result = {"loss": float(local[0]), "policy_loss": float(local[0] - local[1]), "kl_loss": float(local[1])}
        for i, name in enumerate(_TOKEN_METRICS, start=2):
            if (name != "ref_kl" or self.reference is not None) and (name != "behaviour_weight" or grpo.decoupled):
                result[name] = float(local[i]) / max(global_tokens, 1.0)
        return result

    def _rank_rows(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's contiguous share of rows [start, stop)."""
        share = (stop - start) // self.world_size
        return start + self.rank * share, start + (self.rank + 1) * share

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (partitioned placeholders under ZeRO-3)."""
        return self.engine.module

    def compute_logprobs(self, batch: TrainBatch, rows: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Current-policy logprobs of the batch (or of `rows`), (B, T-1) on CPU, 0 on padding; no gradient."""
        self.engine.eval()
        temperature = self.config.grpo.logit_temperature
        return batch_logprobs(self.engine, batch, self.config.micro_batch_size, self.device, temperature, rows,
                              self.config.logprob_chunk_tokens)

    def full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one parameter at a time; every rank must iterate (a collective under ZeRO-3).

        The yielded tensor is valid only until the next item: copy it out if it must outlive the iteration.
        """
        for name, parameter in self.module.named_parameters():
            with gathered([parameter], self.config.zero_stage == 3):
                yield name, parameter.data

    def close(self) -> None:
        """Tear down the process group (single-process ZeRO-3 otherwise aborts at interpreter exit)."""
        if dist.is_initialized():
            dist.barrier()
        destroy_distributed()
