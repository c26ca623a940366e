"""The driver's handle of the learner: `world_size` Learner actors (learner/learner_actor.py) in one placement group.

Every call goes to all ranks at once (they are collectives) and returns rank 0's answer. The policy version is
counted by the ranks (learner_actor.Learner.policy_version: checkpointed, stamped on every weight manifest); the group
keeps rank 0's last answer for the driver to read.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.rollout_pool import ACTOR_GONE
from cluster.storage import check_marker_on_nodes
from cluster.waiting import wait_logged
from learner.config import LearnerConfig
from learner.learner_actor import Learner


class LearnerGroup:
    """Driver-side handle of `world_size` Learner actors placed by one placement group."""

    def __init__(self, config: LearnerConfig, model_path: str, strategy: str = "PACK",
                 log_every_s: float = 30.0) -> None:
        self.config = config
        self.policy_version = 0
        """Rank 0's policy version as of its last answer (train_step, load)."""
        bundle = {"CPU": config.cpus_per_rank, **config.resources}
        if config.gpus_per_rank:
            bundle["GPU"] = config.gpus_per_rank
        self.placement_group = placement_group([dict(bundle) for _ in range(config.world_size)], strategy=strategy)
        self.actors: list[Any] = []
        timeout, key = config.setup_timeout_s, "learner.setup_timeout_s"
        try:
            wait_logged([self.placement_group.ready()], f"the learner placement group ({config.world_size} x "
                        f"{bundle})", timeout, log_every_s, key)
            remote = ray.remote(Learner)
            for rank in range(config.world_size):
                strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)
                self.actors.append(
                    remote.options(
                        num_cpus=config.cpus_per_rank, num_gpus=config.gpus_per_rank,
                        resources=dict(config.resources), scheduling_strategy=strategy,
                    ).remote(config.model_dump(), model_path, rank, config.world_size)
                )
            master_addr, master_port = wait_logged([self.actors[0].node_address.remote()], "learner rank 0 to start",
                                                   timeout, log_every_s, key)[0]
            wait_logged([actor.setup.remote(master_addr, master_port) for actor in self.actors],
                        "learner ranks to join the process group and build policy and reference", timeout,
                        log_every_s, key)
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> Any:
        """Call `method` on every rank at once (a collective) and return rank 0's answer."""
        return ray.get([getattr(actor, method).remote(*args) for actor in self.actors])[0]

    def any_dead(self, timeout_s: float = 30.0) -> bool:
        """Whether Ray reports any rank gone (a rank busy in a collective still answers once it is free)."""
        for actor in self.actors:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=timeout_s)
            except ACTOR_GONE:
                return True
            except ray.exceptions.GetTimeoutError:
                continue
        return False

    def check_run_dir(self, run_dir: str, token: str) -> list[str]:
        """The driver reads its marker in run_dir on every node a rank runs on; returns those nodes' IPs."""
        return check_marker_on_nodes(run_dir, token, ray.get([a.node_id.remote() for a in self.actors]))

    def train_step(self, trajectories: pa.Table) -> dict[str, float]:
        """One GRPO update (rank 0's metrics: they are global already); the learner's weights become the next
        policy version, which engines hold once the driver has synced them."""
        metrics = self._all("train_step", ray.put(trajectories))
        self.policy_version = int(metrics.pop("policy_version"))
        return metrics

    def compute_logprobs(self, trajectories: pa.Table) -> Any:
        """Current-policy logprobs of the batch, (B, T-1)."""
        return self._all("compute_logprobs", ray.put(trajectories))

    def full_parameters(self) -> dict[str, Any]:
        """{name: numpy array} of the full current weights."""
        return self._all("full_parameters")

    def save(self, root: str, data_position: dict[str, Any] | None = None, keep: int | None = None) -> str:
        """Checkpoint every rank plus the driver state (step, policy version, data position); keeps the newest
        `keep` checkpoints (None = all)."""
        return self._all("save", root, data_position, keep)

    def load(self, root: str, tag: str | None = None) -> dict[str, Any]:
        """Resume from a checkpoint; restores the policy version and returns the driver state."""
        state = self._all("load", root, tag)
        self.policy_version = int(state["policy_version"])
        return state

    def export_hf(self, directory: str, tokenizer_path: str | None = None) -> str:
        """Hugging Face export of the current weights."""
        return self._all("export_hf", directory, tokenizer_path)

    # ---- the weight sync (driven by cluster.rollout_pool.RolloutPool.sync_weights) ---------------------------------
    def open_weight_group(self, world_size: int, timeout_s: float = 300.0) -> tuple[str, int, str]:
        """Start a weight group for `world_size` members (1 learner + engine workers) on rank 0's node."""
        return self._all("open_weight_group", world_size, timeout_s)

    def connect_weight_group(self) -> ray.ObjectRef:
        """Start rank 0's join; the caller makes every engine join too, then waits on the returned ref."""
        return self.actors[0].connect_weight_group.remote()

    def weight_manifest(self) -> dict[str, Any]:
        """The manifest of a sync of the learner's current weights (stamped with its policy version)."""
        return ray.get(self.actors[0].weight_manifest.remote())

    def send_weights(self, manifest: dict[str, Any]) -> list[ray.ObjectRef]:
        """Start the broadcast on every rank; the caller starts the engines' loads and waits on both."""
        return [actor.send_weights.remote(manifest) for actor in self.actors]

    def shutdown(self) -> None:
        """Stop every rank and release the placement group."""
        try:
            ray.get([actor.close.remote() for actor in self.actors], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or unready rank must not keep the others alive
            pass
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement_group)
