"""The driver's view of the rollout actors: dispatch with admission control, death detection, scaling, weight sync.

Membership changes (an actor added, removed or replaced) mark the weight group stale; the next sync rebuilds it with
every live engine before broadcasting, so an actor never generates before it holds the current weights.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from actors.prompts import Question
from actors.rollout import RolloutFailed
from cluster.data_stream import PromptItem

log = logging.getLogger(__name__)
ACTOR_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


def stop_actors(handles: list[Any], timeout: float = 120.0) -> None:
    """Stop rollout actors: engines shut down cleanly first (that frees their shared memory), then every actor is
    killed, a dead or stuck one included."""
    try:
        ray.get([handle.aclose.remote() for handle in handles], timeout=timeout)
    except Exception:  # noqa: BLE001 - a dead or stuck actor is killed below all the same
        log.warning("not every rollout actor shut down cleanly; killing them")
    for handle in handles:
        ray.kill(handle)


@dataclass
class RolloutSlot:
    """One rollout actor as the driver tracks it."""

    actor_id: int
    handle: Any
    workers: int
    retiring: bool = False
    ready: bool = False
    """Its engine is built and it has read the run_dir marker (set by the first sync after it started)."""
    in_flight: dict[int, PromptItem] = field(default_factory=dict)


@dataclass
class Finished:
    """The outcome of one dispatched group: its batch, or why there is none (its actor died, or vLLM cut a
    generation short); either way the prompt is requeued."""

    item: PromptItem
    actor_id: int
    batch: pa.RecordBatch | None
    error: BaseException | None = None

    @property
    def actor_died(self) -> bool:
        """Whether the actor is gone (and must be replaced), rather than one rollout having failed."""
        return isinstance(self.error, ACTOR_GONE)


class RolloutPool:
    """Starts, replaces and retires rollout actors and routes prompt groups to the least-loaded one."""

    def __init__(self, make_actor: Any, learner: Any, sync_timeout_s: float = 600.0, setup_timeout_s: float = 900.0,
                 log_every_s: float = 30.0, run_dir_marker: tuple[str, str] | None = None) -> None:
        self._make_actor = make_actor
        self.learner = learner
        self.setup_timeout_s = setup_timeout_s
        self.log_every_s = log_every_s
        self.run_dir_marker = run_dir_marker
        self.slots: dict[int, RolloutSlot] = {}
        self._ids = itertools.count()
        self._tickets = itertools.count()
        self.group_stale = True
        self.sync_timeout_s = sync_timeout_s
        self.replaced = 0
        self.failed = 0
        """Groups not trained on and requeued: vLLM cut a generation short, or a search failed through an outage."""
        self.policy_version = 0
        """The policy version every engine holds (what dispatched work is stamped with)."""

    # ---- membership -------------------------------------------------------------------------------------------
    def add(self, count: int = 1) -> None:
        """Start `count` actors; they receive weights at the next sync, before any dispatch."""
        for _ in range(count):
            handle, workers = self._make_actor()
            slot = RolloutSlot(next(self._ids), handle, workers)
            self.slots[slot.actor_id] = slot
        self.group_stale = True

    @property
    def active(self) -> list[RolloutSlot]:
        """Actors that accept new work."""
        return [s for s in self.slots.values() if not s.retiring]

    def scale_to(self, target: int) -> None:
        """Grow or shrink to `target` active actors; shrinking retires the least-loaded ones (they finish first)."""
        active = self.active
        if target > len(active):
            self.add(target - len(active))
        for slot in sorted(active, key=lambda s: len(s.in_flight))[: max(len(active) - target, 0)]:
            slot.retiring = True

    def reap_retired(self) -> int:
        """Kill retiring actors whose work is done; returns how many went."""
        done = [s for s in self.slots.values() if s.retiring and not s.in_flight]
        for slot in done:
            ray.kill(slot.handle)
            del self.slots[slot.actor_id]
            self.group_stale = True
        return len(done)

    def replace_dead(self, actor_id: int) -> None:
        """Drop a dead actor and start a replacement (unless it was retiring). Its in-flight groups are not returned
        here: each one's future resolves with the actor's death and the driver requeues that prompt."""
        slot = self.slots.pop(actor_id, None)
        if slot is None:
            return
        log.warning("rollout actor %d died with %d groups in flight; starting a replacement",
                    actor_id, len(slot.in_flight))
        self.replaced += 1
        if not slot.retiring:
            self.add(1)
        self.group_stale = True

    # ---- work ---------------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Groups dispatched and not yet returned."""
        return sum(len(s.in_flight) for s in self.slots.values())

    def dispatch(self, item: PromptItem, question: Question, sampling: dict | None = None,
                 group_size: int | None = None) -> asyncio.Future:
        """Send one prompt group to the least-loaded active actor; the future resolves to a Finished."""
        slot = min(self.active, key=lambda s: (len(s.in_flight), s.actor_id))
        ticket = next(self._tickets)
        slot.in_flight[ticket] = item
        ref = slot.handle.generate_group.remote(question, self.policy_version, sampling=sampling,
                                                group_size=group_size)
        return asyncio.ensure_future(self._collect(slot, ticket, item, ref))

    async def _collect(self, slot: RolloutSlot, ticket: int, item: PromptItem, ref: Any) -> Finished:
        try:
            batch = await ref
            return Finished(item, slot.actor_id, batch)
        except ACTOR_GONE as error:
            return Finished(item, slot.actor_id, None, error)
        except RayTaskError as error:
            if not isinstance(error.cause, RolloutFailed):
                raise
            log.warning("requeueing prompt %d: %s", item.index, error.cause)
            self.failed += 1
            return Finished(item, slot.actor_id, None, error.cause)
        finally:
            slot.in_flight.pop(ticket, None)

    # ---- weights ------------------------------------------------------------------------------------------------
    def sync_weights(self) -> dict[str, Any]:
        """Put the learner's current weights into every engine: the driver asks, the learner sends, engines load.

        One control call per engine; learner ranks and engine workers meet inside the same broadcasts. Engines hold
        the new policy version only once every load has returned, so dispatch stamps work with the old one until then.
        """
        self._replace_dead_members()
        self._await_new_actors()
        if self.group_stale:
            self._rebuild_group()
        slots = list(self.slots.values())
        manifest = self.learner.weight_manifest()
        sends = self.learner.send_weights(manifest)
        loads = [slot.handle.load_weights.remote(manifest) for slot in slots]
        sent = ray.get(sends, timeout=self.sync_timeout_s)[0]
        loaded = ray.get(loads, timeout=self.sync_timeout_s)
        self.policy_version = int(manifest["policy_version"])
        return {"policy_version": self.policy_version, "sender": sent, "receivers": loaded}

    def _rebuild_group(self) -> None:
        """A new weight group of learner rank 0 + every worker of every live engine (after any membership change)."""
        slots = list(self.slots.values())
        world_size = 1 + sum(s.workers for s in slots)
        host, port, backend = self.learner.open_weight_group(world_size, self.sync_timeout_s)
        log.info("weight group at %s:%d over %s: learner rank 0 + %d engine workers", host, port, backend,
                 world_size - 1)
        joins, offset = [], 1
        for slot in slots:
            joins.append(slot.handle.join_weight_group.remote(host, port, world_size, offset, backend))
            offset += slot.workers
        ray.get([self.learner.connect_weight_group(), *joins], timeout=self.sync_timeout_s)
        self.group_stale = False

    def _await_new_actors(self) -> None:
        """Wait (rollout.setup_timeout_s, logging) until actors started since the last sync have built their engines
        and read the run_dir marker; one that dies meanwhile is replaced, and its replacement awaited in turn."""
        import time

        from cluster.waiting import SetupTimeout, wait_logged

        deadline = time.monotonic() + self.setup_timeout_s  # replacements share it: a crash loop cannot run forever
        while fresh := [s for s in self.slots.values() if not s.ready]:
            refs = [s.handle.check_run_dir.remote(*self.run_dir_marker) if self.run_dir_marker
                    else s.handle.pid.remote() for s in fresh]
            left = deadline - time.monotonic()
            if left <= 0:
                raise SetupTimeout(f"rollout actors not ready after {self.setup_timeout_s:.0f} s (replacements "
                                   "included; raise rollout.setup_timeout_s)")
            wait_logged(refs, "rollout actors to build their vLLM engines", left, self.log_every_s,
                        "rollout.setup_timeout_s", fetch=False)
            for slot, ref in zip(fresh, refs, strict=True):
                try:
                    ray.get(ref)
                    slot.ready = True
                except ACTOR_GONE:
                    self.replace_dead(slot.actor_id)

    def _replace_dead_members(self) -> None:
        """Replace actors that died, so a collective never waits on a dead member. An actor still building its
        engine answers late, not never: only Ray's word that the actor is gone counts as death."""
        for slot in [s for s in self.slots.values() if s.ready]:
            try:
                ray.get(slot.handle.pid.remote(), timeout=self.sync_timeout_s)
            except ACTOR_GONE:
                self.replace_dead(slot.actor_id)
