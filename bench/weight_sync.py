"""Weight sync seconds from a DeepSpeed learner to 2 receivers, against the floor and a per-parameter sync.

Receivers are Ray actors running the real receiver of actors/weight_sync.py (WeightReceiver); the vLLM worker it
is normally mixed into is replaced by a host whose `reload_weights` copies each tensor into its own preallocated
copy of the model (the memory traffic of loading in place). Three ways to move the same bytes over the same gloo group:

- bucketed (ours): the training path, Learner.weight_manifest + Learner.send_weights (rank 0's WeightSender), one
  control call per receiver per sync, flat buckets;
- floor: one control call per receiver and one broadcast of all the bytes as a single flat tensor;
- per-parameter (the OpenRLHF way): per tensor, one control call per receiver and one broadcast.

Goals: bucketed <= 1.5x the floor; per-parameter / bucketed >= 3x on a model with hundreds of tensors.

    python -m bench.weight_sync [--layers 24] [--hidden 256] [--bucket-mb 256 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Any

import ray
import torch
from torch.distributed.elastic.utils.distributed import get_free_port

from actors.weight_receiver import WeightReceiver
from cluster.models import build_tiny_policy
from learner.config import GRPOConfig, LearnerConfig
from learner.distributed import destroy_distributed
from learner.learner_actor import Learner
from weight_transfer.wire import make_manifest

RECEIVERS = 2


class LoadingHost(WeightReceiver):
    """Stands in for the vLLM worker: `reload_weights` copies every received tensor into a preallocated model copy."""

    def __init__(self, shapes: dict[str, tuple[list[int], str]]) -> None:
        self.weights = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, (shape, dtype) in shapes.items()}
        self.weights["flat"] = torch.empty(0)
        # The receiver re-ties a tied lm_head of the worker's model after loading; this host has no model to re-tie.
        self.model_runner = SimpleNamespace(get_model=lambda: None)

    def reload_weights(self, weights_iterator: Any) -> None:
        """Copy each (name, tensor) into place, the way a loader fills existing parameters."""
        for name, tensor in weights_iterator:
            if name == "flat" and self.weights["flat"].numel() != tensor.numel():
                self.weights["flat"] = torch.empty_like(tensor)
            self.weights[name].copy_(tensor)


def sync_bucketed(learner: Learner, receivers: list, version: int) -> float:
    """Ours: one manifest, one control call per receiver, the bucketed broadcast of the training path."""
    started = time.perf_counter()
    learner.policy_version = version
    manifest = learner.weight_manifest()
    loads = [r.research_load_weights.remote(manifest) for r in receivers]
    learner.send_weights(manifest)
    ray.get(loads)
    return time.perf_counter() - started


def sync_floor(learner: Learner, receivers: list, flat: torch.Tensor, version: int) -> float:
    """The floor: every byte as one flat tensor in one broadcast, one control call per receiver."""
    started = time.perf_counter()
    manifest = make_manifest([("flat", flat)], version, float("inf"), learner.sender.backend)
    loads = [r.research_load_weights.remote(manifest) for r in receivers]
    learner.sender.send(manifest, [[flat]])
    ray.get(loads)
    return time.perf_counter() - started


def sync_per_parameter(learner: Learner, receivers: list, version: int) -> float:
    """OpenRLHF-style: for each tensor a control call to every receiver, then that tensor's broadcast."""
    started = time.perf_counter()
    for name, tensor in learner.engine.full_parameters():
        manifest = make_manifest([(name, tensor)], version, float("inf"), learner.sender.backend)
        loads = [r.research_load_weights.remote(manifest) for r in receivers]
        learner.sender.send(manifest, [[tensor]])
        ray.get(loads)
    return time.perf_counter() - started


def main() -> None:
    """Print the median seconds, bytes/s and ratios of the three ways, for each bucket size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[256.0, 16.0])
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model_dir = tempfile.mkdtemp(prefix="bench-sync-")
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, _temp_dir=ray_dir)
    try:
        model_path = str(build_tiny_policy(model_dir, hidden_size=args.hidden, num_layers=args.layers))
        config = LearnerConfig(zero_stage=args.zero_stage, grpo=GRPOConfig(kl_coef=0.0))
        learner = Learner(config.model_dump(), model_path, rank=0, world_size=1)
        learner.setup("127.0.0.1", get_free_port())
        specs = [(name, t.detach().clone()) for name, t in learner.engine.full_parameters()]
        shapes = {name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in specs}
        total_bytes = sum(t.numel() * t.element_size() for _, t in specs)
        flat = torch.cat([t.reshape(-1) for _, t in specs])
        host = ray.remote(LoadingHost)
        receivers = [host.options(num_cpus=0.5).remote(shapes) for _ in range(RECEIVERS)]

        rows = []
        for bucket_mb in args.bucket_mb:
            learner.config = config.model_copy(update={"weight_sync_bucket_mb": bucket_mb})
            host_addr, port, backend = learner.open_weight_group(1 + RECEIVERS, 300.0)
            joins = [r.research_join_weight_group.remote(host_addr, port, 1 + RECEIVERS, 1 + i, backend)
                     for i, r in enumerate(receivers)]
            learner.connect_weight_group()
            ray.get(joins)
            buckets = len(learner.weight_manifest()["buckets"])
            times: dict[str, list[float]] = {"bucketed": [], "floor": [], "per-parameter": []}
            for repeat in range(args.repeats + 1):  # the first round warms sockets and allocators up
                round_times = {
                    "floor": sync_floor(learner, receivers, flat, repeat),
                    "bucketed": sync_bucketed(learner, receivers, repeat),
                    "per-parameter": sync_per_parameter(learner, receivers, repeat),
                }
                if repeat:
                    for name, seconds in round_times.items():
                        times[name].append(seconds)
            rows.append((bucket_mb, buckets, {name: statistics.median(t) for name, t in times.items()}))
        learner.close()
    finally:
        destroy_distributed()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)

    print(
        f"model: Qwen2 {args.layers} layers, hidden {args.hidden}: {len(specs)} tensors, {total_bytes / 2**20:.1f} MiB; "
        f"ZeRO-{args.zero_stage} learner -> {RECEIVERS} receivers over gloo on loopback; median of {args.repeats}"
    )
    for bucket_mb, buckets, medians in rows:
        print(f"bucket {bucket_mb:g} MiB ({buckets} buckets):")
        for name, seconds in medians.items():
            print(f"  {name:>14}: {seconds:7.3f} s  {total_bytes / seconds / 2**20:8.1f} MiB/s")
        vs_floor = medians["bucketed"] / medians["floor"]
        speedup = medians["per-parameter"] / medians["bucketed"]
        print(f"  bucketed / floor = {vs_floor:.2f}x (goal <= 1.5x) -> {'PASS' if vs_floor <= 1.5 else 'FAIL'}")
        print(f"  per-parameter / bucketed = {speedup:.1f}x (goal >= 3x) -> {'PASS' if speedup >= 3 else 'FAIL'}")


if __name__ == "__main__":
    main()
