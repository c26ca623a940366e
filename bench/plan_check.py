"""`research plan`'s learner estimate against the measured peak RSS of real learner steps on CPU.

(Run it with -m from the repository root: as a file, its name would shadow the `learner` package.)
One process, one rank: build the LearnerEngine of a config (DeepSpeed at the config's ZeRO stage, fp32 on CPU, the
reference policy when kl_coef > 0), then run `--steps` GRPO steps on one micro-batch of the config's longest
trajectories (max_prompt_tokens + max_response_tokens, one row a token shorter so the batch is padded as real ones
are). The first step allocates AdamW's moments, so the peak comes from the second. The peak is VmHWM (reset through
/proc/self/clear_refs after imports and the batch are built) minus the RSS at that moment; it is compared with the
planner's estimate minus its constant 1 GiB runtime term, which the subtraction of the baseline leaves out.

    python -m bench.plan_check test-tiny [key=value ...] [--steps 2] [--json]
    python -m bench.plan_check demo-cpu
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

GIB = float(2**30)


def _status_kib(key: str) -> int:
    """A VmRSS/VmHWM-style field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def model_type(model_path: str) -> str:
    """The transformers model_type of a local policy directory (qwen2, llama)."""
    return json.loads((Path(model_path) / "config.json").read_text())["model_type"]


def longest_batch(rows: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int = 0) -> Any:
    """`rows` trajectories (one group) of prompt_tokens + response_tokens random tokens, the last one a token short."""
    import pyarrow as pa
    import torch

    from learner.batch import collate
    from learner.grpo import with_advantages

    generator = torch.Generator().manual_seed(seed)
    columns: dict[str, list] = {"prompt_ids": [], "response_ids": [], "loss_mask": [], "behaviour_logprobs": [],
                                "reward": []}
    for i in range(rows):
        length = response_tokens - (1 if i == rows - 1 and rows > 1 else 0)
        columns["prompt_ids"].append(torch.randint(10, vocab, (prompt_tokens,), generator=generator).tolist())
        columns["response_ids"].append(torch.randint(10, vocab, (length,), generator=generator).tolist())
        columns["loss_mask"].append([1] * length)
        columns["behaviour_logprobs"].append([-6.9] * length)
        columns["reward"].append(float(i % 2))
    return collate(with_advantages([pa.RecordBatch.from_pydict(columns)]), pad_token_id=0)


def measure(config_name: str, overrides: list[str], steps: int = 2) -> dict[str, Any]:
    """Build the config's learner, run `steps` steps on one longest micro-batch, return peaks and the estimate."""
    import torch

    from cluster.config import load_config
    from cluster.models import resolve_policy
    from cluster.plan import RUNTIME_BYTES, plan_learner, resolve_architecture
    from learner.engine import LearnerEngine

    config = load_config(config_name, overrides)
    if config.learner.world_size != 1:
        config = load_config(config_name, [*overrides, "learner.world_size=1"])
    learner_config = config.resolved_learner()
    model_path = resolve_policy(config.policy.name_or_path)
    arch = resolve_architecture(config.policy.name_or_path)
    planned = plan_learner(config, arch)
    seq_len = planned.extra["seq_len"]
    prompt = min(config.rollout.max_prompt_tokens, seq_len // 2)
    batch = longest_batch(learner_config.micro_batch_size, prompt, seq_len - prompt, min(arch.vocab, 1000))

    # The libraries an engine pulls in on first use belong to the planner's runtime term, not to the step: import
    # them before the baseline.
    importlib.import_module(f"transformers.models.{model_type(model_path)}.modeling_{model_type(model_path)}")
    importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
    importlib.import_module("deepspeed.runtime.zero.stage3")
    gc.collect()
    baseline = _status_kib("VmRSS") * 1024.0
    reset_peak()
    started = time.perf_counter()
    engine = LearnerEngine(learner_config, model_path, device="cpu")
    init_peak = _status_kib("VmHWM") * 1024.0 - baseline
    step_peaks, step_seconds = [], []
    for _ in range(steps):
        reset_peak()
        tick = time.perf_counter()
        engine.train_step(batch)
        step_seconds.append(time.perf_counter() - tick)
        step_peaks.append(_status_kib("VmHWM") * 1024.0 - baseline)
    engine.close()
    measured = max([init_peak, *step_peaks])
    # Like with like: the measured process is a LearnerEngine alone, without the weight sender whose buffers and
    # communicator the plan counts on rank 0.
    sync = sum(v for k, v in planned.breakdown.items() if k.startswith("weight-sync"))
    estimate = planned.estimate - RUNTIME_BYTES - sync
    return {
        "config": config.name,
        "overrides": overrides,
        "torch": torch.__version__,
        "parameters": arch.params,
        "micro_batch_size": learner_config.micro_batch_size,
        "seq_len": seq_len,
        "zero_stage": learner_config.zero_stage,
        "baseline_rss_gib": round(baseline / GIB, 3),
        "init_peak_gib": round(init_peak / GIB, 3),
        "step_peaks_gib": [round(p / GIB, 3) for p in step_peaks],
        "step_seconds": [round(s, 1) for s in step_seconds],
        "measured_peak_gib": round(measured / GIB, 3),
        "estimate_gib": round(estimate / GIB, 3),
        "estimate_breakdown_gib": {k: round(v / GIB, 3) for k, v in planned.breakdown.items() if k != "runtime"},
        "ratio": round(estimate / measured, 3),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the measured peak, the estimate and their ratio (goal: within 30 %)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a CPU preset (test-tiny, demo-cpu) or YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--steps", type=int, default=2, help="train steps (>= 2: the first allocates Adam's moments)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    result = measure(args.config, args.overrides, args.steps)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['config']}: {result['parameters'] / 1e6:.1f}M parameters, ZeRO-{result['zero_stage']}, "
          f"micro-batch {result['micro_batch_size']} x {result['seq_len']} tokens, torch {result['torch']}")
    print(f"  RSS before the engine   {result['baseline_rss_gib']:.3f} GiB")
    print(f"  peak growth: init {result['init_peak_gib']:.3f} GiB, steps "
          f"{', '.join(f'{p:.3f}' for p in result['step_peaks_gib'])} GiB ({result['step_seconds']} s)")
    print(f"  measured peak growth    {result['measured_peak_gib']:.3f} GiB")
    print(f"  planner estimate        {result['estimate_gib']:.3f} GiB (without its 1 GiB runtime term)")
    for part, value in result["estimate_breakdown_gib"].items():
        print(f"    {part:<40} {value:.3f}")
    verdict = "within" if abs(result["ratio"] - 1) <= 0.3 else "OUTSIDE"
    print(f"  estimate / measured     {result['ratio']:.3f} ({verdict} 30 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
