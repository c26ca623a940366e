"""Learner step time: LearnerEngine (DeepSpeed ZeRO-0/2/3, one rank) vs a plain torch loop on the same model and batch.

(Run it with -m from the repository root: as a file, its name would shadow the `learner` package.)
Both sides do the same work per step: micro-batched forward/backward of the GRPO loss (learner.grpo.policy_loss on
learner.logprobs.token_logprobs), gradient clipping and one AdamW step. Goal: DeepSpeed <= 1.3x the plain loop.

    python -m bench.learner_step [--layers 4] [--hidden 256] [--batch 8] [--seq 256] [--micro 4] [--steps 5]

`--mfu` instead measures the learner's model FLOP utilisation on this CPU: LearnerEngine (ZeRO-2, one rank) steps on
the policy named by --policy (default the demo's SmolLM2-135M-Instruct), for each `learner.autocast` setting,
against this CPU's matrix-multiply peak measured in the same run with the same torch threads and dtype (a square
matmul of --peak-size, best of several). Counted FLOPs per step (flops_per_step below): for every non-padding
token 6 x (non-embedding parameters) for forward and backward of the body, 2 x 4 x vocab x hidden for the LM head
(forward, the chunked backward's recomputation, and the two gradient products), and causal attention
2 x 2 x layers x hidden x (length / 2) per token for QK^T and AV, tripled for backward. AdamW, norms and
activations are not counted (as in the usual MFU definition). Goal: mfu >= 0.35.

    python -m bench.learner_step --mfu [--policy smollm2-135m-instruct] [--batch 4] [--seq 512] [--steps 3]
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


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """This CPU's matrix-multiply FLOP/s in `dtype` with the current torch threads: best of `repeats` square products."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # first call: oneDNN/BLAS kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flops_per_step(model_config: object, batch: TrainBatch, recompute: bool = False) -> float:
    """Model FLOPs of one learner step on `batch` (see the module docstring); `recompute` adds the old-logprob
    forward (2 x params per token, and one head product)."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    vocab = model_config.vocab_size
    inter = model_config.intermediate_size
    kv = hidden * model_config.num_key_value_heads // model_config.num_attention_heads
    body = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)  # q,o + k,v + gate,up,down
    lengths = batch.attention_mask.sum(dim=1).double()
    tokens = float(lengths.sum())
    attention_pairs = float((lengths * (lengths + 1) / 2).sum())  # causal (query, key) pairs
    flops = 6 * body * tokens + 2 * 4 * vocab * hidden * tokens + 3 * 4 * layers * hidden * attention_pairs
    if recompute:
        flops += 2 * body * tokens + 2 * vocab * hidden * tokens + 4 * layers * hidden * attention_pairs
    return flops


def mfu_main(args: argparse.Namespace) -> None:
    """Learner steps per autocast setting; achieved FLOP/s and mfu against the measured peak of the same dtype."""
    from transformers import AutoConfig

    from cluster.models import resolve_policy

    policy = resolve_policy(args.policy)
    model_config = AutoConfig.from_pretrained(policy)
    batch = make_batch(args.batch, args.seq)
    batch.input_ids.clamp_(max=model_config.vocab_size - 1)
    threads = torch.get_num_threads()
    peaks = {"off": matmul_peak(torch.float32, args.peak_size), "bf16": matmul_peak(torch.bfloat16, args.peak_size)}
    print(f"policy {policy}: {model_config.num_hidden_layers} layers, hidden {model_config.hidden_size}, vocab "
          f"{model_config.vocab_size}; batch {args.batch} x {args.seq} tokens, micro-batch {args.micro}; torch "
          f"threads {threads}; matmul peak fp32 {peaks['off'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    flops = flops_per_step(model_config, batch)
    from learner.learner_actor import learner_autocast

    for autocast in args.autocast:
        config = LearnerConfig(lr=1e-6, micro_batch_size=args.micro, autocast=autocast,
                               grpo=GRPOConfig(kl_coef=0.0, entropy_coef=0.0, old_logprobs="behaviour"))
        engine = LearnerEngine(config, policy)
        times = []
        for _ in range(args.steps + 1):
            with learner_autocast(config):
                times.append(engine.train_step(batch)["step_seconds"])
        engine.engine.optimizer.zero_grad()  # one process group for every engine: close only at the end
        seconds = statistics.median(times[1:])
        achieved = flops / seconds
        print(f"autocast {autocast:>4}: {seconds:6.2f} s/step, {flops / 1e12:.3f} TFLOP/step, "
              f"{achieved / 1e9:6.1f} GFLOP/s, mfu {achieved / peaks[autocast]:.3f} "
              f"(of the {'bf16' if autocast == 'bf16' else 'fp32'} peak; goal >= 0.35)")
    destroy_distributed()


def main() -> None:
    """Print per-step medians and the DeepSpeed / plain ratio for each ZeRO stage (or, with --mfu, the mfu)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", action="store_true", help="measure model FLOP utilisation instead")
    parser.add_argument("--policy", default="smollm2-135m-instruct", help="--mfu: policy name or directory")
    parser.add_argument("--autocast", nargs="+", default=["off", "bf16"], help="--mfu: learner.autocast settings")
    parser.add_argument("--peak-size", type=int, default=2048, help="--mfu: side of the peak-measuring matmul")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    args = parser.parse_args()
    if args.mfu:
        mfu_main(args)
        return

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
