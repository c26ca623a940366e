"""The learner as Ray actors: one `Learner` per DeepSpeed rank in a placement group, driven by a `LearnerGroup`.

The driver calls the group; the group fans every call out to all ranks (DeepSpeed steps, checkpoints, exports and
ZeRO-3 gathers are collectives) and returns rank 0's answer. A batch of trajectories is put into the object store
once and every rank reads the same global batch: each takes its own rows inside `LearnerEngine.train_step`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.config import LearnerConfig


class Learner:
    """One DeepSpeed rank: owns a LearnerEngine, its checkpoints and (rank 0) the weight broadcaster."""

    def __init__(self, config: dict[str, Any], model_path: str, rank: int, world_size: int) -> None:
        self.config = LearnerConfig.model_validate(config)
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self.engine = None
        self.broadcaster = None

    def node_address(self) -> tuple[str, int]:
        """(node IP, a free port) for the rank-0 rendezvous."""
        from learner.engine import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the DeepSpeed process group and build the engine (and the reference when kl_coef > 0)."""
        from learner.engine import LearnerEngine, init_distributed

        os.environ.setdefault("LOCAL_RANK", "0")
        init_distributed(self.rank, self.world_size, master_addr, master_port)
        self.engine = LearnerEngine(self.config, self.model_path)
        return self.engine.rank

    def train_step(self, groups: Sequence[pa.RecordBatch] | pa.Table) -> dict[str, float]:
        """One GRPO update on the global batch of trajectory groups."""
        from learner.batch import collate

        return self.engine.train_step(collate(groups, self.engine.pad_token_id))

    def compute_logprobs(self, groups: Sequence[pa.RecordBatch] | pa.Table) -> Any:
        """Current-policy next-token logprobs of the batch as a (B, T-1) numpy array."""
        from learner.batch import collate

        return self.engine.compute_logprobs(collate(groups, self.engine.pad_token_id)).numpy()

    def full_parameters(self) -> dict[str, Any] | None:
        """Rank 0: {name: numpy array} of the full weights (a collective under ZeRO-3); None elsewhere."""
        weights = {}
        for name, tensor in self.engine.full_parameters():
            if self.rank == 0:
                weights[name] = tensor.detach().float().cpu().numpy().copy()
        return weights if self.rank == 0 else None

    def save(self, root: str, policy_version: int, data_position: dict[str, Any] | None = None) -> str:
        """Write a resumable checkpoint (collective); returns its directory."""
        from learner.checkpoint import save_checkpoint

        return str(save_checkpoint(self.engine, root, policy_version, data_position))

    def load(self, root: str, tag: str | None = None) -> dict[str, Any]:
        """Restore the newest (or the named) checkpoint; returns the driver state saved with it."""
        from learner.checkpoint import load_checkpoint

        return load_checkpoint(self.engine, root, tag)

    def export_hf(self, directory: str, tokenizer_path: str | None = None) -> str | None:
        """Write a Hugging Face directory vLLM can load (rank 0 writes; collective)."""
        from learner.checkpoint import export_hf

        path = export_hf(self.engine, directory, tokenizer_path or self.model_path)
        return str(path) if path is not None else None

    def open_weight_group(self, world_size: int, host: str) -> tuple[str, int] | None:
        """Build the broadcaster; rank 0 also starts the weight group's TCPStore and returns its address."""
        from learner.broadcast import WeightBroadcaster

        self.broadcaster = WeightBroadcaster(self.engine, self.config.weight_sync_bucket_mb, host)
        return self.broadcaster.open(world_size) if self.rank == 0 else None

    def connect_weight_group(self) -> None:
        """Rank 0: join the weight group (returns once every engine worker has joined)."""
        if self.rank == 0:
            self.broadcaster.connect()

    def weight_manifest(self, policy_version: int) -> dict[str, Any]:
        """The control message of the next sync."""
        return self.broadcaster.manifest(policy_version)

    def broadcast_weights(self, manifest: dict[str, Any]) -> dict[str, float]:
        """Send the weights as `manifest` describes (every rank joins the ZeRO-3 gathers)."""
        return self.broadcaster.broadcast(manifest)

    def close(self) -> None:
        """Leave the weight group and the DeepSpeed process group."""
        if self.broadcaster is not None:
            self.broadcaster.close()
        if self.engine is not None:
            self.engine.close()


class LearnerGroup:
    """Driver-side handle of `world_size` Learner actors placed by one placement group."""

    def __init__(self, config: LearnerConfig, model_path: str, strategy: str = "PACK", timeout_s: float = 300.0) -> None:
        self.config = config
        self.policy_version = 0
        bundle = {"CPU": config.cpus_per_rank}
        if config.gpus_per_rank:
            bundle["GPU"] = config.gpus_per_rank
        self.placement_group = placement_group([dict(bundle) for _ in range(config.world_size)], strategy=strategy)
        self.actors: list[Any] = []
        try:
            ray.get(self.placement_group.ready(), timeout=timeout_s)
            remote = ray.remote(Learner)
            for rank in range(config.world_size):
                strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)
                self.actors.append(
                    remote.options(
                        num_cpus=config.cpus_per_rank, num_gpus=config.gpus_per_rank, scheduling_strategy=strategy
                    ).remote(config.model_dump(), model_path, rank, config.world_size)
                )
            master_addr, master_port = ray.get(self.actors[0].node_address.remote(), timeout=timeout_s)
            ray.get([actor.setup.remote(master_addr, master_port) for actor in self.actors], timeout=timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every rank at once (they are collectives) and wait for all answers."""
        return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])

    def train_step(self, groups: Sequence[pa.RecordBatch] | pa.Table) -> dict[str, float]:
        """One GRPO update on a batch of trajectory groups; rank 0's metrics (they are global already)."""
        batch_ref = ray.put(list(groups) if not isinstance(groups, pa.Table) else groups)
        return self._all("train_step", batch_ref)[0]

    def compute_logprobs(self, groups: Sequence[pa.RecordBatch] | pa.Table) -> Any:
        """Current-policy logprobs of the batch, (B, T-1)."""
        batch_ref = ray.put(list(groups) if not isinstance(groups, pa.Table) else groups)
        return self._all("compute_logprobs", batch_ref)[0]

    def full_parameters(self) -> dict[str, Any]:
        """{name: numpy array} of the full current weights."""
        return self._all("full_parameters")[0]

    def save(self, root: str, data_position: dict[str, Any] | None = None) -> str:
        """Checkpoint every rank plus the driver state (step, policy version, data position)."""
        return self._all("save", root, self.policy_version, data_position)[0]

    def load(self, root: str, tag: str | None = None) -> dict[str, Any]:
        """Resume from a checkpoint; restores the policy version and returns the driver state."""
        state = self._all("load", root, tag)[0]
        self.policy_version = int(state["policy_version"])
        return state

    def export_hf(self, directory: str, tokenizer_path: str | None = None) -> str:
        """Hugging Face export of the current weights."""
        return self._all("export_hf", directory, tokenizer_path)[0]

    def open_weight_group(self, world_size: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """Start the weight group for `world_size` members (1 learner + engine workers); returns (host, port)."""
        return self._all("open_weight_group", world_size, host)[0]

    def connect_weight_group(self) -> ray.ObjectRef:
        """Start rank 0's join; the caller makes every engine join too, then waits on the returned ref."""
        return self.actors[0].connect_weight_group.remote()

    def start_weight_sync(self, bump_version: bool = True) -> tuple[dict[str, Any], list[ray.ObjectRef]]:
        """Bump the policy version (unless re-sending the current weights to new engines) and start the broadcast on
        every rank; returns the manifest for the engines' one control call each, and the refs to wait on."""
        if bump_version:
            self.policy_version += 1
        manifest = ray.get(self.actors[0].weight_manifest.remote(self.policy_version))
        return manifest, [actor.broadcast_weights.remote(manifest) for actor in self.actors]

    def sync_weights(
        self, start_loads: Callable[[dict[str, Any]], list[ray.ObjectRef]], bump_version: bool = True
    ) -> dict[str, Any]:
        """A whole sync to Ray-hosted engines: `start_loads(manifest)` makes one control call per engine."""
        manifest, sends = self.start_weight_sync(bump_version)
        loads = start_loads(manifest)
        sent = ray.get(sends)[0]
        return {"policy_version": self.policy_version, "sender": sent, "receivers": ray.get(loads)}

    def shutdown(self) -> None:
        """Stop every rank and release the placement group."""
        try:
            ray.get([actor.close.remote() for actor in self.actors], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or unready rank must not keep the others alive
            pass
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)
