"""The learner as Ray actors: one `Learner` per DeepSpeed rank, driven by the driver's `cluster.learner_group`.

Every call reaches every rank at once (DeepSpeed steps, checkpoints, exports and ZeRO-3 gathers are collectives). A
batch of trajectories is put into the object store once and every rank reads the same global batch: each takes its
own rows inside `LearnerEngine.train_step`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pyarrow as pa
import ray
import torch

from learner.config import LearnerConfig


def learner_autocast(config: LearnerConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast around a whole train step when `learner.autocast` asks for it (recomputed old logprobs and the
    reference run under it too, so an unchanged policy's ratio stays exactly 1); a no-op context otherwise."""
    if config.autocast == "off":
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


def by_length(trajectories: pa.Table, config: LearnerConfig) -> pa.Table:
    """Rows sorted by prompt + response length when the whole batch is one mini-batch: micro-batches then hold rows
    of similar length, so little of their (rows x longest row) forward is padding. The update is the same (every
    row's loss is weighted by its share of the mini-batch), so only with several mini-batches is the order kept."""
    if isinstance(trajectories, list | tuple):
        trajectories = pa.Table.from_batches(list(trajectories))
    if config.mini_batches != 1 or trajectories.num_rows < 2:
        return trajectories
    lengths = [len(p) + len(r) for p, r in zip(trajectories.column("prompt_ids").to_pylist(),
                                               trajectories.column("response_ids").to_pylist(), strict=True)]
    return trajectories.take(sorted(range(len(lengths)), key=lengths.__getitem__))


class Learner:
    """One DeepSpeed rank: owns a LearnerEngine, its checkpoints and (rank 0) the weight sender."""

    def __init__(self, config: dict[str, Any], model_path: str, rank: int, world_size: int) -> None:
        self.config = LearnerConfig.model_validate(config)
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self.engine = None
        self.sender = None
        self.policy_version = 0
        """Updates these weights have had: the one count of the policy version (checkpointed, stamped on syncs)."""
        self._listener = None

    def node_address(self) -> tuple[str, int]:
        """(node IP, port) of the rank-0 rendezvous: a socket bound to this node's address only, kept open until
        setup hands it to the store (so no other process can take the port in between)."""
        from weight_transfer.transport import bind_listener

        host = ray.util.get_node_ip_address()
        self._listener = bind_listener(host)
        return host, int(self._listener.getsockname()[1])

    def pid(self) -> int:
        """This rank's process id (the fault-injection tests kill it)."""
        return os.getpid()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the DeepSpeed process group and build the engine (and the reference when kl_coef > 0)."""
        from learner.distributed import init_distributed
        from learner.engine import LearnerEngine

        os.environ.setdefault("LOCAL_RANK", "0")
        listener, self._listener = self._listener, None
        init_distributed(self.rank, self.world_size, master_addr, master_port, listener=listener,
                         node_ip=ray.util.get_node_ip_address())
        self.engine = LearnerEngine(self.config, self.model_path)
        return self.engine.rank

    def node_id(self) -> str:
        """The Ray node this rank runs on (the driver checks run_dir's marker there)."""
        return ray.get_runtime_context().get_node_id()

    def train_step(self, trajectories: pa.Table) -> dict[str, float]:
        """One GRPO update on the global batch (trajectories with their `advantage` column)."""
        from learner.batch import collate

        with learner_autocast(self.config):
            metrics = self.engine.train_step(collate(by_length(trajectories, self.config), self.engine.pad_token_id))
        self.policy_version += 1
        return {**metrics, "policy_version": float(self.policy_version)}

    def compute_logprobs(self, trajectories: pa.Table) -> Any:
        """Current-policy next-token logprobs of the batch as a (B, T-1) numpy array."""
        from learner.batch import collate

        batch = collate(trajectories, self.engine.pad_token_id, scoring_only=True)
        with learner_autocast(self.config):
            return self.engine.compute_logprobs(batch).numpy()

    def full_parameters(self) -> dict[str, Any] | None:
        """Rank 0: {name: numpy array} of the full weights (a collective under ZeRO-3); None elsewhere."""
        weights = {}
        for name, tensor in self.engine.full_parameters():
            if self.rank == 0:
                weights[name] = tensor.detach().float().cpu().numpy().copy()
        return weights if self.rank == 0 else None

    def save(self, root: str, data_position: dict[str, Any] | None = None, keep: int | None = None) -> str:
        """Write a resumable checkpoint (collective); rank 0 then deletes all but the newest `keep`; returns its
        directory."""
        from learner.checkpoint import prune_checkpoints, save_checkpoint

        directory = save_checkpoint(self.engine, root, self.policy_version, data_position)
        if keep is not None and self.rank == 0:
            prune_checkpoints(root, keep)
        return str(directory)

    def load(self, root: str, tag: str | None = None) -> dict[str, Any]:
        """Restore the newest (or the named) checkpoint; returns the driver state saved with it."""
        from learner.checkpoint import load_checkpoint

        state = load_checkpoint(self.engine, root, tag)
        self.policy_version = int(state["policy_version"])
        return state

    def export_hf(self, directory: str, tokenizer_path: str | None = None) -> str | None:
        """Write a Hugging Face directory vLLM can load (rank 0 writes; collective)."""
        from learner.checkpoint import export_hf

        path = export_hf(self.engine, directory, tokenizer_path or self.model_path)
        return str(path) if path is not None else None

    def open_weight_group(self, world_size: int, timeout_s: float) -> tuple[str, int, str] | None:
        """Rank 0: serve a new weight group for `world_size` members on this node's address; returns (host, port,
        backend)."""
        from learner.weight_sender import WeightSender

        if self.rank != 0:
            return None
        if self.sender is not None:
            self.sender.close()
        self.sender = WeightSender(ray.util.get_node_ip_address(), world_size, self.engine.device, timeout_s)
        return self.sender.address

    def connect_weight_group(self) -> None:
        """Rank 0: join the weight group (returns once every engine worker has joined)."""
        if self.rank == 0:
            self.sender.connect()

    def weight_manifest(self) -> dict[str, Any]:
        """The control message of the next sync: every parameter's full shape (ZeRO-3's ds_shape) and the buckets."""
        from weight_transfer.transport import backend_for
        from weight_transfer.wire import make_manifest

        specs = [(name, torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype, device="meta"))
                 for name, p in self.engine.module.named_parameters()]
        return make_manifest(specs, self.policy_version, self.config.weight_sync_bucket_mb, backend_for(self.engine.device))

    def send_weights(self, manifest: dict[str, Any]) -> dict[str, float]:
        """Rank 0 broadcasts every bucket of `manifest`; under ZeRO-3 every rank joins each bucket's gather."""
        from learner.distributed import gathered

        zero3 = self.config.zero_stage == 3
        if self.rank != 0 and not zero3:
            return {}
        parameters = [p for _, p in self.engine.module.named_parameters()]

        def buckets() -> Any:
            for start, end, _, _ in manifest["buckets"]:
                with gathered(parameters[start:end], zero3):  # released once rank 0 has packed the bucket
                    yield [p.data for p in parameters[start:end]]

        if self.rank == 0:
            return self.sender.send(manifest, buckets())
        for _ in buckets():
            pass
        return {}

    def close(self) -> None:
        """Leave the weight group and the DeepSpeed process group."""
        if self.sender is not None:
            self.sender.close()
        if self.engine is not None:
            self.engine.close()
