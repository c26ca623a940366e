"""The RolloutActor: one vLLM engine and one retrieval client, turning prompt groups into scored Arrow batches.

A plain class, so it runs in-process (tests, the bench) and as a Ray actor (`remote_rollout_actor(config)` reserves
the CPUs/GPUs the config asks for, so the number of actors scales on its own). Its methods are coroutines: Ray runs
it as an async actor, and groups from many calls share the engine concurrently.

Weight updates may land while groups are in flight: vLLM applies them between engine steps, so a trajectory can hold
tokens of two consecutive versions. It is stamped with the version it started under, and its behaviour logprobs are
those of the weights that actually sampled each token, so the learner's importance ratio stays correct.

An engine process that dies (OOM kill, CUDA fault) takes the actor with it within about a second: the actor frees the
shared memory the engine left and exits, so Ray reports it dead and the driver replaces it and requeues its groups,
exactly as when the actor itself dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from actors.config import RolloutConfig, SamplingConfig
from actors.engine import RolloutEngine, descendant_pids, free_orphaned_shm
from actors.prompts import Question
from actors.reward import reward_fn
from actors.rollout import SearchTool, rollout_group

if TYPE_CHECKING:
    from retrieval_service.config import RetrievalConfig

log = logging.getLogger(__name__)


class RolloutActor:
    """Owns one RolloutEngine and one RetrievalClient; samples groups, loads broadcast weights, reports metrics."""

    def __init__(
        self, model: str, config: RolloutConfig | None = None, retrieval: RetrievalConfig | None = None,
        seed: int = 0, policy_version: int = 0,
    ) -> None:
        from retrieval_service.client import RetrievalClient
        from retrieval_service.config import RetrievalConfig

        self.config = config or RolloutConfig()
        retrieval = retrieval or RetrievalConfig()
        self.engine = RolloutEngine(model, self.config.engine, seed=seed)
        self.client = RetrievalClient.from_config(retrieval)
        self.search = SearchTool(self.client, retrieval.topk, retrieval.result_format, retrieval.outage_wait_s)
        self.keep_failed_searches = retrieval.failed_search == "keep"
        self.reward = reward_fn(self.config.reward_fn)  # the one place the reward is chosen
        self._policy_version = policy_version
        self._in_flight = 0
        self._totals: dict[str, float] = {}
        self._last_sync: dict[str, Any] = {}
        self._watchdog: asyncio.Task | None = None

    def _watch_engine(self) -> None:
        """Start (once, on the actor's event loop) the check that ends the actor when its engine dies."""
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while not self.engine.dead:
            await asyncio.sleep(0.5)
        self._die("its vLLM engine process died")

    def _die(self, why: str) -> None:
        """Leave no shared memory behind and exit, so Ray reports this actor dead and the driver replaces it."""
        freed = free_orphaned_shm()
        log.error("rollout actor %d exits: %s (freed %d shared-memory segments)", os.getpid(), why, len(freed))
        os._exit(1)

    async def generate_group(
        self, question: Question, policy_version: int | None = None, sampling: dict[str, Any] | None = None,
        group_size: int | None = None,
    ) -> pa.RecordBatch:
        """One question's scored group (the driver's call); `sampling` overrides configured SamplingConfig fields
        (e.g. greedy validation) and `group_size` the configured group size."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self._watch_engine()
        config = self.config.sampling
        if sampling:  # overrides are validated like the YAML
            config = SamplingConfig.model_validate({**config.model_dump(), **sampling})
        self._in_flight += 1
        try:
            version = self._policy_version if policy_version is None else policy_version
            batch = await rollout_group(self.engine, self.search, question, group_size or self.config.group_size,
                                        config, self.reward, version, self.keep_failed_searches)
        except EngineDeadError:
            self._die("its vLLM engine process died")
        finally:
            self._in_flight -= 1
        self._count(batch)
        return batch

    async def generate_groups(
        self, questions: Sequence[Question], policy_version: int | None = None
    ) -> list[pa.RecordBatch]:
        """One scored record batch per question (group_size samples each), in the order given."""
        return list(await asyncio.gather(*(self.generate_group(q, policy_version) for q in questions)))

    def _count(self, batch: pa.RecordBatch) -> None:
        totals = self._totals
        totals["groups"] = totals.get("groups", 0) + 1
        totals["trajectories"] = totals.get("trajectories", 0) + batch.num_rows
        for column in ("reward", "num_turns", "num_searches", "retrieval_errors", "generated_tokens",
                       "inserted_tokens", "generation_seconds", "retrieval_seconds", "finished", "truncated"):
            values = batch.column(column).to_pylist()
            totals[column] = totals.get(column, 0) + float(sum(values))

    async def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int,
                                backend: str, timeout_s: float = 300.0) -> list[int]:
        """Join the learner's weight group (collective: the learner's WeightSender.connect runs meanwhile); the
        engine's gloo devices bind this actor's node address (the learner's when not running under Ray)."""
        self._watch_engine()
        local_host = _node_ip() or host
        return await self.engine.collective_rpc(
            "research_join_weight_group", args=(host, port, world_size, rank_offset, backend, timeout_s, local_host)
        )

    def node_id(self) -> str:
        """The Ray node this actor runs on (the driver checks run_dir's marker there); answers once the engine is
        built, so it is also the readiness probe."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def load_weights(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Receive and load the weights the learner broadcasts for `manifest` (every worker of the engine); then
        drop prefix-cache KV computed with the old weights."""
        started = time.perf_counter()
        workers = await self.engine.collective_rpc("research_load_weights", args=(manifest,))
        await self.engine.reset_prefix_cache()
        self._policy_version = int(manifest["policy_version"])
        self._last_sync = {
            "policy_version": self._policy_version,
            "seconds": time.perf_counter() - started,
            "load_seconds": max(float(w["seconds"]) for w in workers),
            "bytes": int(workers[0]["bytes"]),
            "workers": len(workers),
        }
        return dict(self._last_sync)

    def pid(self) -> int:
        """This actor's process id (the driver uses it to kill one in fault-tolerance tests)."""
        return os.getpid()

    def engine_pids(self) -> list[int]:
        """The engine's processes below this actor (engine core, workers): what an OOM kill would hit."""
        return descendant_pids(os.getpid())

    def policy_version(self) -> int:
        """The policy version of the weights the engine holds."""
        return self._policy_version

    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Totals since the last call (groups, trajectories, tokens, searches, errors, seconds) and their means."""
        totals = dict(self._totals)
        trajectories = totals.get("trajectories", 0)
        for column in ("reward", "num_turns", "num_searches", "generated_tokens", "finished", "truncated"):
            if trajectories:
                totals[f"mean_{column}"] = totals[column] / trajectories
        totals["policy_version"] = self._policy_version
        totals["in_flight_groups"] = self._in_flight
        totals.update({f"last_sync_{k}": v for k, v in self._last_sync.items() if k != "policy_version"})
        if reset:
            self._totals = {}
        return totals

    async def health(self) -> dict[str, Any]:
        """Whether the engine answers, which weights it holds, and what is in flight."""
        workers = await self.engine.collective_rpc("research_policy_version")
        return {
            "ok": True,
            "policy_version": self._policy_version,
            "worker_policy_versions": list(workers),
            "in_flight_groups": self._in_flight,
            "engine_startup_seconds": self.engine.startup_seconds,
        }

    async def aclose(self) -> None:
        """Close the retrieval client and stop the engine (and the watch on it, first: a stopped engine is not dead)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.client.aclose()
        self.engine.shutdown()


def _node_ip() -> str | None:
    """This process's Ray node address, or None outside Ray."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else None


def remote_rollout_actor(
    model: str, config: RolloutConfig, retrieval: RetrievalConfig | None = None, seed: int = 0,
    env_vars: dict[str, str] | None = None,
) -> Callable[[], tuple[Any, int]]:
    """A factory of Ray RolloutActors reserving the CPUs/GPUs and extra resources `config` asks for (plus the
    environment in `env_vars`); each call starts one and returns (handle, engine workers in the weight group)."""
    import ray

    options: dict[str, Any] = {"num_cpus": config.cpus_per_actor, "num_gpus": config.gpus_per_actor}
    if config.resources:
        options["resources"] = dict(config.resources)
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    actor_class = ray.remote(**options)(RolloutActor)

    def make_actor() -> tuple[Any, int]:
        return actor_class.remote(model, config, retrieval, seed=seed), config.engine.tensor_parallel_size

    make_actor.actor_class = actor_class  # type: ignore[attr-defined]
    return make_actor
