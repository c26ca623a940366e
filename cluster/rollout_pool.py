"""The producer side of the driver: rollout actors, a bounded buffer of scored groups, and the one weight sync.

`RolloutPool.produce` keeps the actors busy with prompts of the stream while at most `(max_staleness + 1) x
batch_size` groups are generated, buffered or being trained on (admission control); failed rollouts are requeued,
dead actors replaced, and with dynamic sampling (DAPO) groups whose rewards do not vary are dropped and replaced by
fresh prompts, a bounded number of times per step. The trainer `take`s the oldest fresh-enough groups and reports
them `trained`. `sync_weights` is the only way weights reach engines; a lock makes syncs one at a time, whoever asks
(the trainer after an update, the producer after replacing a dead actor).

Membership changes (an actor added, removed or replaced) mark the weight group stale; the next sync rebuilds it with
every live engine before broadcasting, so an actor never generates before it holds the current weights. A sync that
does not complete within `weight_sync_timeout_s` (every member's broadcast gives up by then, NCCL's included:
weight_transfer.transport) is classified by `sync_outcome`: engines that failed are killed and replaced, the group
is rebuilt and the sync retried; a learner rank that died or hangs is the trainer's LearnerFailed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
)

from actors.prompts import Question
from actors.rollout import RolloutFailed
from cluster.data_stream import PromptItem, PromptStream
from cluster.storage import check_marker_on_nodes
from cluster.waiting import SetupTimeout, wait_logged

log = logging.getLogger(__name__)
ACTOR_GONE = (RayActorError, ActorDiedError, ActorUnavailableError, OutOfMemoryError)
"""What a call raises when its actor is gone. OutOfMemoryError is not a RayActorError, but Ray's memory monitor raises it
for a call whose worker process it killed, and that process was the actor (a learner rank killed this way mid-update
once escaped the supervisor as a traceback instead of being restored)."""


class LearnerFailed(RuntimeError):
    """A learner rank died or hangs (in an update, a checkpoint or a weight sync): the trainer restores it."""


class WeightSyncFailed(RuntimeError):
    """A weight sync did not complete after its retries."""


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


    @property
    def version(self) -> int:
        """The policy version that produced the group."""
        return int(self.batch.column("policy_version")[0].as_py())


def zero_variance(batch: pa.RecordBatch, metric: str = "reward") -> bool:
    """Whether every trajectory of the group has the same `metric`: "reward" (its GRPO advantages are all 0) or "f1"
    (every answer equally right: the rewards may still differ, but only by format)."""
    values = batch.column(metric).to_pylist()
    return max(values) - min(values) < 1e-12


def sync_outcome(sends: dict[str, str], loads: dict[int, str]) -> tuple[bool, list[int]]:
    """Decide what a weight sync's answers mean, whatever the transport. Each answer is "ok", "failed" (the member
    raised: its broadcast gave up at the deadline, or it hit an error, and it is alive and can rejoin), "gone" (Ray
    reports it dead) or "stuck" (no answer by the driver's deadline). Returns (learner_failed, engines to kill and
    replace): a learner rank gone or stuck fails the learner (restored from a checkpoint); engines gone or stuck are
    replaced; engines that merely failed rejoin the rebuilt group."""
    learner_failed = any(state in ("gone", "stuck") for state in sends.values())
    return learner_failed, sorted(actor for actor, state in loads.items() if state in ("gone", "stuck"))


class RolloutPool:
    """Starts, replaces and retires rollout actors, produces scored groups into a bounded buffer, syncs weights."""

    def __init__(self, make_actor: Any, learner: Any, weight_sync_timeout_s: float = 300.0,
                 setup_timeout_s: float = 900.0, log_every_s: float = 30.0,
                 run_dir_marker: tuple[str, str] | None = None) -> None:
        self._make_actor = make_actor
        self.learner = learner
        self.weight_sync_timeout_s = weight_sync_timeout_s
        self.setup_timeout_s = setup_timeout_s
        self.log_every_s = log_every_s
        self.run_dir_marker = run_dir_marker
        self.slots: dict[int, RolloutSlot] = {}
        self._ids = itertools.count()
        self._tickets = itertools.count()
        self.group_stale = True
        self.replaced = 0
        self.failed = 0
        """Groups not trained on and requeued: vLLM cut a generation short, or a search failed through an outage."""
        self.engine_version = 0
        """The policy version every engine holds: the manifest of the last completed sync (dispatch stamps it)."""
        self._sync_lock = threading.Lock()
        self.syncs: list[tuple[float, float]] = []
        """(start, end) of every sync, monotonic seconds: syncs never overlap (the lock; the chaos test checks it)."""
        self.syncs_waited = 0
        """Syncs asked for while another was running (they waited for it)."""
        self._checked_nodes: set[str] = set()
        # the producer (see `produce`)
        self.buffer: list[Finished] = []
        self._pending: set[asyncio.Future] = set()
        self._training = 0
        self._changed = asyncio.Event()
        self.dropped: list[PromptItem] = []
        """Prompts dropped by dynamic sampling since the last `take` (their groups' rewards did not vary)."""
        self._drops_this_step = 0
        self.error: BaseException | None = None
        """What ended the producer, if it failed."""

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
        """Actors that are not retiring (some may still be building their engine)."""
        return [s for s in self.slots.values() if not s.retiring]

    @property
    def dispatchable(self) -> list[RolloutSlot]:
        """Active actors that hold the current weights: the ones new work goes to."""
        return [s for s in self.active if s.ready]

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
        here: each one's future resolves with the actor's death and the producer requeues that prompt."""
        slot = self.slots.pop(actor_id, None)
        if slot is None:
            return
        log.warning("rollout actor %d died with %d groups in flight; starting a replacement",
                    actor_id, len(slot.in_flight))
        self.replaced += 1
        if not slot.retiring:
            self.add(1)
        self.group_stale = True

    # ---- one group ----------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Groups dispatched and not yet returned."""
        return sum(len(s.in_flight) for s in self.slots.values())

    def dispatch(self, item: PromptItem, question: Question, sampling: dict | None = None,
                 group_size: int | None = None) -> asyncio.Future:
        """Send one prompt group to the least-loaded active actor; the future resolves to a Finished."""
        slot = min(self.dispatchable, key=lambda s: (len(s.in_flight), s.actor_id))
        ticket = next(self._tickets)
        slot.in_flight[ticket] = item
        ref = slot.handle.generate_group.remote(question, self.engine_version, sampling=sampling,
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

    # ---- the producer -------------------------------------------------------------------------------------------
    async def produce(self, stream: PromptStream, questions: list[Question], batch_size: int, max_staleness: int,
                      dynamic_sampling_draws: int = 0, dynamic_sampling_metric: str = "reward") -> None:
        """Keep generating groups for `stream` into `buffer` until the stream runs dry; cancel to stop.

        Admission: groups in flight + buffered + being trained stay within (max_staleness + 1) x batch_size.
        `dynamic_sampling_draws` > 0 drops groups whose `dynamic_sampling_metric` does not vary (their prompts count
        as used) until (draws - 1) x batch_size of them went in one step; past that they are kept, so a step always
        completes.
        """
        window = (max_staleness + 1) * batch_size
        self.error = None
        try:
            while True:
                while len(self.buffer) + len(self._pending) + self._training < window and self.dispatchable:
                    item = stream.next()
                    if item is None:
                        break  # until a failed prompt is requeued or the epoch's last batch is trained
                    self._pending.add(self.dispatch(item, questions[item.index]))
                self._changed.clear()
                wake = asyncio.ensure_future(self._changed.wait())
                done, _ = await asyncio.wait(self._pending | {wake}, return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                for future in done & self._pending:
                    self._pending.discard(future)
                    await self._receive(future.result(), stream, batch_size, dynamic_sampling_draws,
                                        dynamic_sampling_metric)
                self._changed.set()  # wakes a `take` waiting for groups
        except BaseException as error:
            self.error = error  # `take` raises it: a learner that failed in a sync the producer asked for, say
            self._changed.set()
            raise

    async def _receive(self, finished: Finished, stream: PromptStream, batch_size: int, draws: int,
                       metric: str = "reward") -> None:
        if finished.batch is None:
            stream.requeue(finished.item)  # its rollout failed: the prompt goes round again
            if finished.actor_died:
                self.replace_dead(finished.actor_id)
                await asyncio.to_thread(self.sync_weights)  # the replacement gets weights before any work
            return
        if draws > 0 and zero_variance(finished.batch, metric) and self._drops_this_step < (draws - 1) * batch_size:
            stream.consume(finished.item)
            self.dropped.append(finished.item)
            self._drops_this_step += 1
            return
        self.buffer.append(finished)

    async def take(self, batch_size: int, oldest_version: int, stream: PromptStream) -> list[Finished] | None:
        """The `batch_size` oldest buffered groups generated by `oldest_version` or later (older ones are requeued),
        once that many are there, or what is left when the stream has run dry; None when nothing is left."""
        while True:
            stale = [f for f in self.buffer if f.version < oldest_version]
            for finished in stale:  # admission keeps this from happening; this is the guard
                log.warning("requeueing prompt %d: generated by policy %d, oldest allowed %d", finished.item.index,
                            finished.version, oldest_version)
                stream.requeue(finished.item)
            self.buffer = sorted((f for f in self.buffer if f not in stale), key=lambda f: f.version)
            if self.error is not None and not isinstance(self.error, asyncio.CancelledError):
                raise self.error
            # The stream itself says whether more will come (the producer may not have run since the last step).
            dry = not self._pending and not stream.can_issue()
            if len(self.buffer) >= batch_size or (self.buffer and dry):
                taken, self.buffer = self.buffer[:batch_size], self.buffer[batch_size:]
                self._training, self._drops_this_step = len(taken), 0
                return taken
            if not self.buffer and dry:
                return None
            if stale:
                self._changed.set()  # requeued prompts: let the producer dispatch them
                await asyncio.sleep(0)
            self._changed.clear()
            await self._changed.wait()

    def trained(self, taken: list[Finished], stream: PromptStream) -> list[PromptItem]:
        """The learner trained on `taken`: their prompts are consumed and their room goes back to the producer;
        returns (and forgets) the prompts dynamic sampling dropped meanwhile."""
        for finished in taken:
            stream.consume(finished.item)
        self._training = 0
        self._changed.set()
        dropped, self.dropped = self.dropped, []
        return dropped

    def discard_work(self) -> None:
        """Forget every group in flight, buffered or being trained (the learner was restored to an older state,
        whose data position re-issues their prompts)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self.buffer, self.dropped, self._training, self._drops_this_step = [], [], 0, 0
        self._changed.set()

    # ---- weights ------------------------------------------------------------------------------------------------
    def sync_weights(self) -> dict[str, Any]:
        """Put the learner's current weights into every engine: the driver asks, the learner sends, engines load.

        The one entry point, one sync at a time. Engines that fail are replaced and the sync retried (twice);
        raises LearnerFailed when a learner rank is gone or hangs. Engines hold the new policy version, and dispatch
        stamps it, only once every load has returned.
        """
        if self._sync_lock.locked():
            self.syncs_waited += 1  # another sync is running (the producer's, or the trainer's): it goes after it
        with self._sync_lock:
            started = time.monotonic()
            try:
                for attempt in range(3):
                    self._replace_dead_members()
                    self._await_new_actors()
                    if self.group_stale and not self._rebuild_group():
                        continue
                    result = self._broadcast()
                    if result is not None:
                        return result
                    log.warning("weight sync attempt %d failed; rebuilding the weight group", attempt + 1)
                raise WeightSyncFailed("the weight sync failed three times with the learner alive")
            finally:
                self.syncs.append((started, time.monotonic()))

    def _broadcast(self) -> dict[str, Any] | None:
        """One sync over the current group; None when engines failed (see `_settle`)."""
        manifest = self.learner.weight_manifest()
        sends = self.learner.send_weights(manifest)
        loads = {slot.actor_id: slot.handle.load_weights.remote(manifest) for slot in self.slots.values()}
        answers = self._settle(sends, loads, "weight sync")
        if answers is None:
            return None
        self.engine_version = int(manifest["policy_version"])
        return {"policy_version": self.engine_version, "sender": answers[sends[0]],
                "receivers": [answers[ref] for ref in loads.values()]}

    def _rebuild_group(self) -> bool:
        """A new weight group of learner rank 0 + every worker of every live engine (after any membership change);
        each member closes its previous group first. False when engines failed to join (see `_settle`)."""
        slots = list(self.slots.values())
        world_size = 1 + sum(s.workers for s in slots)
        try:
            host, port, backend = self.learner.open_weight_group(world_size, self.weight_sync_timeout_s)
        except ACTOR_GONE as error:
            raise LearnerFailed(str(error)) from error
        log.info("weight group at %s:%d over %s: learner rank 0 + %d engine workers", host, port, backend,
                 world_size - 1)
        joins, offset = {}, 1
        for slot in slots:
            joins[slot.actor_id] = slot.handle.join_weight_group.remote(host, port, world_size, offset, backend,
                                                                        self.weight_sync_timeout_s)
            offset += slot.workers
        if self._settle([self.learner.connect_weight_group()], joins, "weight group join") is None:
            return False
        self.group_stale = False
        return True

    def _settle(self, learner_refs: list[Any], engine_refs: dict[int, Any], what: str) -> dict[Any, Any] | None:
        """Wait for a collective of the weight group and act on `sync_outcome`: LearnerFailed when a learner rank is
        gone or stuck; engines gone or stuck are killed and replaced, and engines that failed lose their readiness
        (their weights may be half loaded) until a later sync completes. Returns each ref's value, or None when any
        member did not succeed (the group is then stale and the caller retries)."""
        # every member gives up on a broadcast after weight_sync_timeout_s; what has not answered well after is stuck
        answers = wait_answers([*learner_refs, *engine_refs.values()], 2 * self.weight_sync_timeout_s + 30)
        learner_states = {f"rank{i}": answers[ref][0] for i, ref in enumerate(learner_refs)}
        engine_states = {actor: answers[ref][0] for actor, ref in engine_refs.items()}
        learner_failed, broken = sync_outcome(learner_states, engine_states)
        if learner_failed:
            raise LearnerFailed(f"a learner rank did not complete the {what}: {learner_states}")
        if all(state == "ok" for state in [*learner_states.values(), *engine_states.values()]):
            return {ref: value for ref, (_, value) in answers.items()}
        for actor, state in engine_states.items():
            if actor in broken:
                log.warning("rollout actor %d did not complete the %s (%s); killing and replacing it", actor, what,
                            state)
                ray.kill(self.slots[actor].handle)
                self.replace_dead(actor)
            elif state != "ok":
                self.slots[actor].ready = False
        self.group_stale = True
        return None

    def _await_new_actors(self) -> None:
        """Wait (setup_timeout_s, logging) until actors started since the last sync have built their engines, and
        check the run_dir marker on their nodes; one that dies meanwhile is replaced, and its replacement awaited."""
        deadline = time.monotonic() + self.setup_timeout_s  # replacements share it: a crash loop cannot run forever
        while fresh := [s for s in self.slots.values() if not s.ready]:
            refs = [s.handle.node_id.remote() for s in fresh]
            left = deadline - time.monotonic()
            if left <= 0:
                raise SetupTimeout(f"rollout actors not ready after {self.setup_timeout_s:.0f} s (replacements "
                                   "included; raise rollout.setup_timeout_s)")
            wait_logged(refs, "rollout actors to build their vLLM engines", left, self.log_every_s,
                        "rollout.setup_timeout_s", fetch=False)
            for slot, ref in zip(fresh, refs, strict=True):
                try:
                    node = ray.get(ref)
                except ACTOR_GONE:
                    self.replace_dead(slot.actor_id)
                    continue
                if self.run_dir_marker and node not in self._checked_nodes:
                    check_marker_on_nodes(*self.run_dir_marker, [node])
                    self._checked_nodes.add(node)
                slot.ready = True

    def _replace_dead_members(self) -> None:
        """Replace actors that died, so a collective never waits on a dead member. An actor still building its
        engine answers late, not never: only Ray's word that the actor is gone counts as death."""
        for slot in [s for s in self.slots.values() if s.ready]:
            try:
                ray.get(slot.handle.pid.remote(), timeout=self.weight_sync_timeout_s)
            except ACTOR_GONE:
                self.replace_dead(slot.actor_id)


def overlapping(intervals: list[tuple[float, float]]) -> int:
    """How many of these (start, end) intervals begin before the previous one (in start order) ended."""
    ordered = sorted(intervals)
    return sum(1 for before, after in itertools.pairwise(ordered) if after[0] < before[1])


def wait_answers(refs: list[Any], timeout_s: float) -> dict[Any, tuple[str, Any]]:
    """Each ref's (state, value) after waiting up to `timeout_s` for all: "ok" with its value, "gone" (actor died),
    "failed" (it raised) or "stuck" (no answer in time)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answers: dict[Any, tuple[str, Any]] = {ref: ("stuck", None) for ref in refs}
    for ref in ready:
        try:
            answers[ref] = ("ok", ray.get(ref))
        except ACTOR_GONE as error:
            answers[ref] = ("gone", error)
        except RayTaskError as error:
            log.warning("weight sync member failed: %s", error.cause if error.cause is not None else error)
            answers[ref] = ("failed", error)
    return answers
