"""Learner step time: LearnerEngine (DeepSpeed ZeRO-0/2/3, one rank) vs a plain torch loop on the same model and batch.

(Run it with -m from the repository root: as a file, its name would shadow the `learner` package.)
Both sides do the same work per step: micro-batched forward/backward of the GRPO loss (learner.grpo.policy_loss on
learner.logprobs.token_logprobs), gradient clipping and one AdamW step. Goal: DeepSpeed <= 1.3x the plain loop.

    python -m bench.learner_step [--layers 4] [--hidden 256] [--batch 8] [--seq 256] [--micro 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import pyarrow as pa
import torch

from cluster.models import build_tiny_policy
from learner.batch import TrainBatch, collate
from learner.config import GRPOConfig, LearnerConfig
from learner.distributed import destroy_distributed
from learner.engine import LearnerEngine
from learner.grpo import policy_loss, with_advantages
from learner.logprobs import token_logprobs


def make_batch(batch: int, seq: int, group_size: int = 4, seed: int = 0) -> TrainBatch:
    """`batch` trajectories of `seq` tokens (a quarter prompt), all response tokens in the loss."""
    generator = torch.Generator().manual_seed(seed)
    prompt_len = seq // 4
    groups = []
    for g in range(batch // group_size):
        rows = {"prompt_ids": [], "response_ids": [], "loss_mask": [], "behaviour_logprobs": [], "reward": []}
        for i in range(group_size):
            rows["prompt_ids"].append(torch.randint(10, 1000, (prompt_len,), generator=generator).tolist())
            rows["response_ids"].append(torch.randint(10, 1000, (seq - prompt_len,), generator=generator).tolist())
            rows["loss_mask"].append([1] * (seq - prompt_len))
            rows["behaviour_logprobs"].append([-6.9] * (seq - prompt_len))
            rows["reward"].append(float((i + g) % 2))
        groups.append(pa.RecordBatch.from_pydict(rows))
    return collate(with_advantages(groups), pad_token_id=0)


class PlainTorchLoop:
    """The same GRPO update written as a plain torch loop: micro-batches, clip, AdamW."""

    def __init__(self, model_path: str, config: LearnerConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.config = config
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.config.use_cache = False
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=config.adam_betas)

    def train_step(self, batch: TrainBatch) -> float:
        """One update; returns its seconds."""
        config, grpo = self.config, self.config.grpo
        started = time.perf_counter()
        total_tokens = float(batch.loss_mask.sum())
        for start in range(0, batch.size, config.micro_batch_size):
            micro = batch.rows(start, min(start + config.micro_batch_size, batch.size))
            logprobs, entropy = token_logprobs(self.model, micro.input_ids, micro.attention_mask, with_entropy=True)
            loss, _ = policy_loss(
                logprobs, micro.behaviour_logprobs, micro.advantages, micro.loss_mask,
                clip=grpo.clip, entropy=entropy,
            )
            (loss * float(micro.loss_mask.sum()) / total_tokens).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def main() -> None:
    """Print per-step medians and the DeepSpeed / plain ratio for each ZeRO stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-learner-") as directory:
        model_path = str(build_tiny_policy(directory, hidden_size=args.hidden, num_layers=args.layers))
        batch = make_batch(args.batch, args.seq)
        warmup = 2
        base = LearnerConfig(lr=1e-5, micro_batch_size=args.micro, grpo=GRPOConfig(kl_coef=0.0))
        runners = {"plain torch": PlainTorchLoop(model_path, base)}
        for stage in args.stages:
            engine = LearnerEngine(base.model_copy(update={"zero_stage": stage}), model_path)
            runners[f"deepspeed zero-{stage}"] = engine
        # Interleaved, one step of each per round: load from other processes on a shared machine hits all alike.
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.steps + warmup):
            for name, runner in runners.items():
                if isinstance(runner, LearnerEngine):
                    samples[name].append(runner.train_step(batch)["step_seconds"])
                else:
                    samples[name].append(runner.train_step(batch))
        results = {name: statistics.median(times[warmup:]) for name, times in samples.items()}
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(model_path)
    print(
        f"model: Qwen2 {args.layers} layers, hidden {args.hidden}, vocab {model_config.vocab_size}; "
        f"batch {args.batch} x {args.seq} tokens, micro-batch {args.micro}; median of {args.steps} steps "
        f"after {warmup} warm-up; torch threads {torch.get_num_threads()}"
    )
    plain = results["plain torch"]
    for name, seconds in results.items():
        print(f"{name:>18}: {seconds * 1000:8.1f} ms/step   ratio {seconds / plain:5.2f}x")
    worst = max(v for k, v in results.items() if k != "plain torch") / plain
    print(f"worst DeepSpeed / plain ratio: {worst:.2f}x (goal <= 1.3x) -> {'PASS' if worst <= 1.3 else 'FAIL'}")
    destroy_distributed()


if __name__ == "__main__":
    main()
