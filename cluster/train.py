"""`python -m cluster.train CONFIG [key=value ...] [--resume]`: the job `ray job submit` runs.

One step: dispatch questions to rollout actors (admission: at most max_staleness + 1 policy versions of work in
flight), collect finished groups as they stream in, compute advantages (learner.grpo) and train the learner on
the oldest `batch_size` groups, sync the new weights into every engine (RolloutPool.sync_weights), log. With max_staleness = 0 this is the synchronous on-policy loop; with >= 1 generation runs ahead while
the learner trains, and every group carries the policy version that produced it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from cluster.config import ConfigError, JobConfig, load_config
from cluster.data_stream import PromptItem, PromptStream
from cluster.metrics import MetricsLogger, batch_metrics, plot_curves, portable, validation_metrics
from cluster.progress import ProgressLine, total_steps
from cluster.rollout_pool import ACTOR_GONE, Finished, LearnerFailed, RolloutPool, overlapping, stop_actors
from cluster.samples import ValidationSamples, question_hops
from cluster.scale import requested_actors
from cluster.train_pool import training_pool
from cluster.validation import ValidationLog

log = logging.getLogger("research.train")


def connect_ray(address: str | None, quiet: bool = False) -> None:
    """Join the cluster `ray job submit` runs us in (or the given address), else start a local one on 127.0.0.1;
    `quiet` keeps the actors' logs (vLLM, DeepSpeed) in the session's log files instead of the terminal."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
        return
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; unless it was 0 then, ray.init replaces
    # 127.0.0.1 by the machine's routable address (ray._private.services.resolve_ip_for_localhost) and every server
    # of the job (retrieval replicas, weight group, rendezvous) would listen there. The raylet and workers started
    # here inherit the variable; this process imported ray before it could be set, hence the constant.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=max(os.cpu_count() or 2, 4),
             log_to_driver=not quiet)


def local_session_dir() -> str | None:
    """The session directory of the local Ray cluster this process started, None when it joined one."""
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None and node.head else None


def stop_session_processes(session_dir: str) -> list[int]:
    """SIGKILL what is left of a local Ray cluster this driver started: every process naming its session directory."""
    killed = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if session_dir.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
                killed.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return killed


class Trainer:
    """Owns the job's actors and runs the step loop; see the module docstring for one step."""

    def __init__(self, config: JobConfig, run_dir: Path, resume: bool) -> None:
        from transformers import AutoTokenizer

        from actors.rollout_actor import remote_rollout_actor
        from cluster.job_setup import data_files, ensure_index, load_questions
        from cluster.models import resolve_policy
        from cluster.retrieval_replicas import start_replicas
        from cluster.storage import write_marker
        from cluster.warm_start import warm_start_policy
        from retrieval_service.config import TOKEN_ENV

        self.config, self.run_dir = config, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
        self.marker = write_marker(run_dir)
        log_every = config.trainer.wait_log_every_s
        # The driver's token reaches the replicas and rollout actors it starts, wherever Ray places them.
        token = os.environ.get(TOKEN_ENV)
        env_vars = {TOKEN_ENV: token} if token else None
        self.policy_path = resolve_policy(config.policy.name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(config.policy.tokenizer or self.policy_path)
        train_files, val_files = data_files(config)
        rollout = config.rollout
        self.train_questions = load_questions(train_files, tokenizer, rollout.prompt_template,
                                              rollout.max_prompt_tokens, config.data.max_train_questions)
        self.val_questions = load_questions(val_files, tokenizer, rollout.prompt_template, rollout.max_prompt_tokens,
                                            config.data.val_size or None, sample_seed=config.seed,
                                            per_hop=config.data.val_per_hop)

        retrieval = config.retrieval
        self.replicas: list[Any] = []
        if retrieval.urls:
            urls = list(retrieval.urls)
        else:
            index = ensure_index(config)
            self.replicas, urls = start_replicas(retrieval.model_copy(update={"index_dir": str(index)}),
                                                 retrieval.replicas, env_vars=env_vars, log_every_s=log_every)
        log.info("retrieval service at %s", ", ".join(urls))
        self.retrieval_urls = urls

        # Our addition (off in the paper presets): supervised format warm start, cached; RL starts from its weights.
        self.policy_path = warm_start_policy(config, self.policy_path, urls, tokenizer,
                                             held_out=[q.text for q in self.val_questions])
        # data.pool: which questions RL samples, filtered through the service (run_dir/pool.json)
        self.train_questions = training_pool(config, self.train_questions, train_files, urls, self.policy_path, run_dir)
        self.stream = PromptStream.for_job(len(self.train_questions), config)
        self.learner = self._start_learner()
        self.learner_restarts = 0
        self.stopping: str | None = None
        """Why the run stops early (SIGTERM, SIGINT), once asked to."""
        self.updating = False
        """The learner is in an update (and the sync after it): a stop waits up to trainer.stop_grace_s for it."""
        make_actor = remote_rollout_actor(self.policy_path, config.rollout, retrieval.model_copy(update={"urls": urls}),
                                          config.seed, env_vars=env_vars)
        self.pool = RolloutPool(make_actor, self.learner, config.rollout.weight_sync_timeout_s,
                                setup_timeout_s=config.rollout.setup_timeout_s,
                                log_every_s=log_every, run_dir_marker=(str(run_dir), self.marker))
        self.pool.add(config.rollout.num_actors)
        self.step = 0
        if resume:
            self._resume()
        self.metrics = MetricsLogger(run_dir, config.logging.tensorboard, config.logging.wandb_project,
                                     run_name=config.name, config=config.model_dump(mode="json"))
        hops = question_hops(val_files)
        self.samples = ValidationSamples(run_dir, self.val_questions, tokenizer, rollout.prompt_template,
                                         config.logging.samples, hops)
        self.validation = ValidationLog(run_dir, hops)
        self.progress = ProgressLine(total_steps(config.trainer, len(self.train_questions)), config.logging.progress)
        self.pool.sync_weights()

    def _start_learner(self) -> Any:
        """The learner group (its ranks placed per learner.resources), checked to read run_dir's marker."""
        from cluster.learner_group import LearnerGroup

        learner = LearnerGroup(self.config.resolved_learner(), self.policy_path,
                               log_every_s=self.config.trainer.wait_log_every_s)
        nodes = learner.check_run_dir(str(self.run_dir), self.marker)
        log.info("learner ranks on %s read run_dir %s", ", ".join(nodes), self.run_dir)
        return learner

    # ---- the loop -----------------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """The supervisor: validate, then run the step loop; a learner that fails is restored from the newest complete
        checkpoint and the loop re-entered; SIGTERM/SIGINT stop it at a step boundary. Returns a summary."""
        stop = self._stop_on_signals()
        first_val = await self.validate()
        self.metrics.log(self.step, first_val)
        while True:
            producer = asyncio.ensure_future(self.pool.produce(
                self.stream, self.train_questions, self.config.trainer.batch_size, self.config.trainer.max_staleness,
                self._dynamic_sampling_draws(), self.config.learner.grpo.dynamic_sampling_metric))
            loop = asyncio.ensure_future(self._step_loop())
            await asyncio.wait({loop, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not loop.done() and self.updating:  # a step boundary comes first: the update may finish in the grace
                await asyncio.wait({loop}, timeout=self.config.trainer.stop_grace_s)
            clean = loop.done() and loop.exception() is None
            for task in (loop, producer):
                task.cancel()
            self.pool.discard_work()
            if self.stopping:
                return self._stopped(clean or not self.updating)
            try:
                loop.result()
            except LearnerFailed as error:
                await self._restart_learner(error)
                continue
            stop.cancel()
            return await self._finished(first_val)

    async def _step_loop(self) -> None:
        """The method, one step per round: a batch of fresh-enough groups -> advantages -> update -> weight sync ->
        log, validate, checkpoint, scale. Returns when the data or max_steps run out, or a stop is asked for."""
        from learner.grpo import with_advantages

        trainer, grpo = self.config.trainer, self.config.learner.grpo
        while self.step < (trainer.max_steps or 10**12) and not self.stopping:
            waited = time.perf_counter()
            taken = await self.pool.take(trainer.batch_size, self.learner.policy_version - trainer.max_staleness,
                                         self.stream)
            if taken is None:
                return  # every prompt of every epoch is trained
            groups = [finished.batch for finished in taken]
            scalars = batch_metrics(groups, self.learner.policy_version)
            scalars["time/wait_for_rollouts"] = time.perf_counter() - waited
            self.updating = True
            scalars.update(await asyncio.to_thread(self._update, with_advantages(groups, grpo.advantage, grpo.eps)))
            self.updating = False
            dropped = self.pool.trained(taken, self.stream)
            self.step += 1
            self._audit(taken, dropped)
            self._log_step(scalars, dropped, time.perf_counter() - waited)
            await self._between_steps()

    def _update(self, trajectories: pa.Table) -> dict[str, float]:
        """The learner's update and the weight sync that follows it (worker thread); LearnerFailed if a rank died."""
        started = time.perf_counter()
        try:
            learner_metrics = self.learner.train_step(trajectories)
            learner_seconds = time.perf_counter() - started
            self.pool.sync_weights()
        except ACTOR_GONE as error:
            if not self.learner.any_dead():
                raise
            raise LearnerFailed(str(error)) from error
        return {**{f"learner/{k}": v for k, v in learner_metrics.items()}, "time/learner": learner_seconds,
                "time/weight_sync": time.perf_counter() - started - learner_seconds}

    def _dynamic_sampling_draws(self) -> int:
        """Batches' worth of groups a step may draw with DAPO's dynamic sampling; 0 when it is off."""
        grpo = self.config.learner.grpo
        return grpo.dynamic_sampling_max_draws if grpo.dynamic_sampling else 0

    def _audit(self, taken: list[Finished], dropped: list[PromptItem]) -> None:
        """trained.jsonl: which prompts each step trained on (and which dynamic sampling dropped): exactly-once."""
        entry = {"step": self.step, "prompts": [[f.item.epoch, f.item.index] for f in taken]}
        if dropped:
            entry["dropped"] = [[item.epoch, item.index] for item in dropped]
        with open(self.run_dir / "trained.jsonl", "a", encoding="utf-8") as audit:
            audit.write(json.dumps(entry) + "\n")

    def _log_step(self, scalars: dict[str, float], dropped: list[PromptItem], step_seconds: float) -> None:
        """Metrics of the step just trained: rollout, learner, timing, data position, actors."""
        scalars.update({
            "time/step": step_seconds,
            "throughput/generated_tokens_per_s": scalars["rollout/generated_tokens"] / step_seconds,
            "policy_version": float(self.learner.policy_version), "rollout/actors": float(len(self.pool.active)),
            "rollout/failed": float(self.pool.failed), "data/epoch": float(self.stream.epoch),
            "data/consumed_in_epoch": float(self.stream.consumed_in_epoch),
        })
        if self.config.learner.grpo.dynamic_sampling:
            scalars["dynamic_sampling/dropped_groups"] = float(len(dropped))
        self.metrics.log(self.step, scalars)
        self.progress.step(self.step, scalars)
        log.info("step %d: reward %.3f, length %.1f, searches %.2f, learner %.2fs, sync %.2fs", self.step,
                 scalars["reward/mean"], scalars["rollout/response_length"], scalars["rollout/searches"],
                 scalars["time/learner"], scalars["time/weight_sync"])

    def _stopped(self, clean: bool) -> dict[str, Any]:
        """The summary of a run stopped by a signal; a checkpoint (with curves and an HF export) when the learner is
        at a step boundary, else the last periodic one is where --resume starts."""
        checkpoint = None
        if clean:
            checkpoint = self.save()
        else:
            log.warning("the step in progress did not finish within %.0f s; stopping without it, so the last "
                        "periodic checkpoint is where --resume starts", self.config.trainer.stop_grace_s)
        self.metrics.close()
        log.info("stopped on %s at step %d; `--resume` continues from %s", self.stopping, self.step, checkpoint)
        return {"steps": self.step, "stopped": self.stopping, "checkpoint": checkpoint,
                "policy_version": self.learner.policy_version, "learner_restarts": self.learner_restarts,
                **self._sync_summary()}

    async def _finished(self, first_val: dict[str, float]) -> dict[str, Any]:
        """Final validation, checkpoint, HF export and curves; the summary of a run that used up its steps or data."""
        last_val = await self.validate()
        self.metrics.log(self.step, last_val)
        checkpoint = self.save()
        self.metrics.close()
        return {"steps": self.step, "learning": self.validation.learning(),
                "policy_version": self.learner.policy_version, "checkpoint": checkpoint,
                "hf_export": self.hf_export, "curves": str(self.curves), "val_before": first_val, "val_after": last_val,
                "rollout_actors_replaced": self.pool.replaced, "rollouts_failed": self.pool.failed,
                "learner_restarts": self.learner_restarts, **self._sync_summary()}

    def _sync_summary(self) -> dict[str, int]:
        """Weight syncs of the run, how many had to wait for another, and how many overlapped one (must be 0)."""
        return {"weight_syncs": len(self.pool.syncs), "weight_syncs_waited": self.pool.syncs_waited,
                "weight_syncs_overlapping": overlapping(self.pool.syncs)}

    def _stop_on_signals(self) -> asyncio.Future:
        """SIGTERM (what `ray job stop` and Kubernetes send) and SIGINT end the run at the next step boundary with a
        checkpoint; the returned future resolves when one arrives."""
        loop, stop = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()

        def request(sig: signal.Signals) -> None:
            if self.stopping is None:
                log.warning("%s: checkpointing at the next step boundary, then stopping", sig.name)
                self.stopping = sig.name
            if not stop.done():
                stop.set_result(sig.name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request, sig)
        return stop

    async def _restart_learner(self, error: BaseException) -> None:
        """A learner rank died: rebuild the learner group from the last checkpoint (or the initial policy) with the
        data position saved with it, so every prompt is trained exactly once counting from that checkpoint."""
        self.learner_restarts += 1
        self.updating = False
        limit = self.config.trainer.max_learner_restarts
        if self.learner_restarts > limit:
            raise RuntimeError(f"a learner rank died and trainer.max_learner_restarts={limit} is used up") from error
        log.warning("a learner rank died (%s); restart %d of %d from the last checkpoint", error,
                    self.learner_restarts, limit)
        self.learner.shutdown()
        self.learner = self._start_learner()
        self.pool.learner, self.pool.group_stale = self.learner, True
        from learner.checkpoint import newest_complete_tag

        tag = newest_complete_tag(self.run_dir / "checkpoints")
        if tag is not None:
            self._resume(tag)
        else:
            self.step = 0
            self.stream = PromptStream.for_job(len(self.train_questions), self.config)
        self._roll_back_audit()
        await asyncio.to_thread(self.pool.sync_weights)

    def _roll_back_audit(self) -> None:
        """trained.jsonl keeps the steps of the learner's lineage only; later ones move to trained-rolled-back.jsonl."""
        path = self.run_dir / "trained.jsonl"
        if not path.is_file():
            return
        kept, dropped = [], []
        for line in path.read_text().splitlines():
            (kept if json.loads(line)["step"] <= self.step else dropped).append(line + "\n")
        with open(self.run_dir / "trained-rolled-back.jsonl", "a", encoding="utf-8") as rolled_back:
            rolled_back.writelines(dropped)
        partial = path.with_suffix(".tmp")
        partial.write_text("".join(kept))
        partial.replace(path)

    async def _between_steps(self) -> None:
        """Validation, checkpoints and scaling happen at step boundaries."""
        trainer = self.config.trainer
        if trainer.val_every and self.step % trainer.val_every == 0:
            self.metrics.log(self.step, await self.validate())
        if trainer.save_every and self.step % trainer.save_every == 0:
            try:
                self.save()
            except ACTOR_GONE as error:
                raise LearnerFailed(str(error)) from error
        target = requested_actors(self.run_dir)
        if target is not None and target != len(self.pool.active):
            log.info("scaling rollout actors %d -> %d", len(self.pool.active), target)
            self.pool.scale_to(target)
        if self.pool.reap_retired() or self.pool.group_stale:
            await asyncio.to_thread(self._sync_or_fail)
        self._write_actors()

    def _sync_or_fail(self) -> None:
        """A weight sync outside an update (membership changed); a learner rank found dead is LearnerFailed."""
        try:
            self.pool.sync_weights()
        except ACTOR_GONE as error:
            raise LearnerFailed(str(error)) from error

    # ---- validation ---------------------------------------------------------------------------------------------
    async def validate(self) -> dict[str, float]:
        """Greedy rollouts of the held-out questions with the current policy; mean reward and answer quality."""
        if not self.val_questions:
            return {}
        futures = [self.pool.dispatch(PromptItem(i, -1), q, sampling={"temperature": 0.0}, group_size=1)
                   for i, q in enumerate(self.val_questions)]
        samples = self.config.trainer.val_samples  # and sampled at the training temperature (cluster/validation.py)
        futures += [self.pool.dispatch(PromptItem(i, -1), q, group_size=samples)
                    for i, q in enumerate(self.val_questions) if samples]
        results = await asyncio.gather(*futures)
        batches = [r.batch for r in results[:len(self.val_questions)] if r.batch is not None]
        sampled = [r.batch for r in results[len(self.val_questions):] if r.batch is not None]
        self.samples.observe(self.step, batches, self.metrics)  # sample trajectories: samples.jsonl, TensorBoard text
        # per-question results to validation.jsonl; means overall and per hop (val/searches_2hop ...), greedy and sampled
        return {**validation_metrics(batches), **self.validation.observe(self.step, batches, sampled)}

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def _resume(self, tag: str | None = None) -> None:
        """Restore the learner and the data position from the newest (or the given) checkpoint."""
        state = self.learner.load(str(self.run_dir / "checkpoints"), tag)
        position = state.get("data_position") or {}
        self.step = int(position.get("step", 0))
        self.stream.load_state_dict(position["stream"])
        log.info("resumed at step %d, policy version %d, epoch %d with %d prompts consumed",
                 self.step, self.learner.policy_version, self.stream.epoch, self.stream.consumed_in_epoch)

    def save(self) -> str:
        """Checkpoint the learner with the driver's data position; the HF export (run_dir/hf) and curves.png are
        refreshed with it, so a run that dies later still leaves a loadable policy and its curves."""
        checkpoint = self.learner.save(str(self.run_dir / "checkpoints"),
                                       {"step": self.step, "stream": self.stream.state_dict()},
                                       keep=self.config.trainer.keep_checkpoints)
        self.hf_export = self.learner.export_hf(str(self.run_dir / "hf"), self.policy_path)
        self.curves = plot_curves(self.run_dir)
        return checkpoint

    def _write_actors(self) -> None:
        """run_dir/actors.json: PIDs of the job's processes by role (operators and the fault-injection tests use it)."""
        def answers(calls: list[Any]) -> list[Any]:
            found = []
            for call in calls:
                try:
                    found.append(ray.get(call, timeout=60))
                except Exception:  # noqa: BLE001 - a dying actor is found and replaced by the dispatch path
                    continue
            return found

        handles = [slot.handle for slot in list(self.pool.slots.values())]
        state = {
            "step": self.step,
            "rollout_pids": answers([h.pid.remote() for h in handles]),
            "engine_pids": [pid for pids in answers([h.engine_pids.remote() for h in handles]) for pid in pids],
            "learner_pids": answers([rank.pid.remote() for rank in self.learner.actors]),
            "retrieval_pids": answers([replica.pid.remote() for replica in self.replicas]),
        }
        partial = self.run_dir / "actors.json.tmp"
        partial.write_text(json.dumps(state))
        partial.replace(self.run_dir / "actors.json")

    def shutdown(self) -> None:
        """Stop every actor this job started; engines shut down cleanly first (that frees their shared memory)."""
        stop_actors([slot.handle for slot in self.pool.slots.values()])
        self.learner.shutdown()
        for replica in self.replicas:
            ray.kill(replica)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `research train` and `python -m cluster.train`."""
    from cluster.cli import CommandParser, fail, log_progress
    from cluster.config import check_paths

    parser = CommandParser("research train", "Run a training job (GRPO with search) on a local Ray cluster, or on "
                           "$RAY_ADDRESS; this is the job that ray job submit runs.", config_help=True)
    parser.add_argument("config", help="YAML file or preset name under configs/")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. learner.lr=5e-7")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run_dir")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_paths(config)
    except ConfigError as error:
        return fail(parser.prog, error)
    run_dir = config.resolved_run_dir()
    if args.resume and not (run_dir / "checkpoints").is_dir():
        return fail(parser.prog, f"--resume needs checkpoints under {run_dir}")
    log_progress("%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        connect_ray(args.address)
    except ConnectionError as error:  # no Ray cluster at --address / $RAY_ADDRESS
        return fail(parser.prog, error)
    from cluster.storage import RunDirError, check_run_dir_setting

    try:
        check_run_dir_setting(config.run_dir, len([node for node in ray.nodes() if node["Alive"]]))
    except RunDirError as error:
        return fail(parser.prog, error)
    from cluster.retrieval_replicas import IndexDoesNotFit
    from cluster.waiting import SetupTimeout

    try:
        trainer = Trainer(config, run_dir, args.resume)
    except (RunDirError, SetupTimeout, IndexDoesNotFit) as error:  # also as the cause of an actor's error
        return fail(parser.prog, getattr(error, "cause", None) or error)
    try:
        summary = asyncio.run(trainer.run())
    finally:
        trainer.shutdown()
        # Disconnects from a cluster, or stops the local one this driver started, whose dashboard and runtime-env
        # agents ray.shutdown leaves running; then segments of engines that were killed rather than shut down go too.
        session = local_session_dir()
        ray.shutdown()
        if session:
            stop_session_processes(session)
        from actors.engine import free_orphaned_shm

        for _ in range(5):  # engine processes of stopped actors exit a moment after them, unmapping their segments
            free_orphaned_shm(min_age_s=2.0)
            time.sleep(1.0)
    summary = portable(summary, run_dir)  # paths relative to run_dir: a committed summary names no machine's paths
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
