"""Format warm start (our addition, not in ReSearch): teach a small policy the tag format before GRPO.

SmolLM2-135M-Instruct never writes `<search>` or `<answer>` with the paper's prompt, so every reward of Eq. 2 is 0 and
GRPO has nothing to learn from. DeepSeek-R1 opens with a "cold start" of supervised trajectories for the same reason;
the paper's 7B/32B models do not need one. This module builds such trajectories from the synthetic world's facts
and trains on them with the job's own learner:

    expert_trajectory -> <think> ... </think> <search> question </search> + the real service's result block for that
                         query + <think> ... </think> <answer> The final answer is \\[ \\boxed{answer} \\] </answer> EOS,
                         tokenised as the rollout tokenises (prompt via build_prompt_ids, each generated piece on its own,
                         the inserted block on its own, loss mask 0 on it), kept only when the block holds the answer;
                         for the few 2-hop questions of `warm_start.two_hop_questions`, a second search in between
                         for the entity the first result names (the bridge), kept only when the first block names it
                         and the second holds the answer
    warm_start_policy -> cached HF directory under $RESEARCH_CACHE/warm/<hash of the inputs>, else build it:
                         LearnerGroup.train_step on the expert trajectories with advantage 1, then export_hf

Why LearnerGroup.train_step and no separate SFT loop: with advantage 1 on every row, kl_coef 0, entropy_coef 0, old
logprobs recomputed just before the update, one mini-batch and one PPO epoch, the GRPO surrogate is
-mean_tokens(ratio) with ratio = exp(logp - logp_old) = 1 in value, so its gradient is -mean_tokens(grad logp): exactly
the gradient of the token-mean negative log-likelihood of the masked-in tokens (the clip is inactive at ratio 1).
tests/unit/test_warm_start.py checks this against a plain NLL step. The same engine, loss mask and tokenisation
are then used for warm start and RL, so nothing differs between what was imitated and what is sampled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from actors.prompts import RESULT_TEMPLATE, build_prompt_ids
from actors.trajectory import Trajectory, to_record_batch
from cluster.config import JobConfig
from learner.config import GRPOConfig, LearnerConfig

log = logging.getLogger("research.warm_start")
WARM_DIR = "warm"
MANIFEST = "warm_start.json"
FIRST_THOUGHTS = (
    "I need to find {need}. I will search for it.",
    "To answer this I have to look up {need}.",
    "I do not know {need}, so I will search.",
)
# Every thought after a result opens by naming that result ("The first result", "The second result"), so that the
# choice after the second one (answer) is cued by a token the policy copies from its own context, not by counting
# <result> blocks. Without it the experts' 24:40 mix of answering and searching after a first result carried over to
# the second: at T=1 on the RL pool the earlier warm start searched a third time after 40 of 71 second results
# (bench/RESULTS.md, "Turn cap"), and under max_turns such a trajectory ends unanswered with reward 0, below a wrong
# one-search answer's 0.1, which pushes GRPO away from the second search it should learn.
ANSWER_THOUGHTS = (
    "The {nth} result says that the answer is {answer}.",
    "The {nth} result gives the answer: {answer}.",
    "The {nth} result states it: {answer}.",
)
BRIDGE_THOUGHTS = (
    "The first result, about {subject}, names {bridge}. I still need {need}, so I will search for {bridge}.",
    "The first result leads from {subject} to {bridge}. To find {need} I have to look up {bridge}.",
    "The first result names {bridge}, but not {need} yet. I will search for {bridge}.",
)
NEEDS = {"city": "the city", "year": "the year", "organisation": "the organisation", "country": "the country",
         "person": "the person", "river": "the river"}


@dataclass(frozen=True)
class ExpertQuestion:
    """A 1-hop training question with what the expert needs: its id, text, answers and answer type."""

    id: str
    text: str
    golden_answers: list[str]
    answer_type: str
    bridge: str = ""
    """2-hop questions: the entity the first hop leads to (the title of the passage that holds the answer)."""
    subject: str = ""
    """2-hop questions: the entity the question names (the title of the first hop's passage)."""


@dataclass
class ExpertTrajectory:
    """One expert trajectory: the trajectory record (tokens, mask, text, reward) and the query it searched."""

    trajectory: Trajectory
    question: ExpertQuestion
    queries: list[str]
    blocks: list[str]


def training_questions(train_file: Path, exclude: Sequence[str] = (), hops: int = 1) -> list[ExpertQuestion]:
    """The `hops`-hop questions of a synthetic-world train file, minus any whose text is in `exclude` (held-out
    ones); 2-hop questions carry their bridge entity, read from the world's corpus.jsonl beside the train file."""
    excluded = set(exclude)
    rows = []
    for line in train_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if (row.get("metadata") or {}).get("hops") == hops and row["question"] not in excluded:
            rows.append(row)
    if hops == 1:
        return [ExpertQuestion(str(row["id"]), row["question"], list(row["golden_answers"]),
                               str(row["metadata"].get("answer_type", ""))) for row in rows]
    titles = _passage_titles(train_file.parent / "corpus.jsonl",
                             {i for row in rows for i in row["metadata"]["supporting_ids"]})
    return [ExpertQuestion(str(row["id"]), row["question"], list(row["golden_answers"]),
                           str(row["metadata"].get("answer_type", "")), titles[row["metadata"]["supporting_ids"][-1]],
                           titles[row["metadata"]["supporting_ids"][0]]) for row in rows]


def _passage_titles(corpus_file: Path, ids: set[str]) -> dict[str, str]:
    """Titles of the corpus passages `ids` (the synthetic world writes each passage as '"Title"\\ntext')."""
    from retrieval_service.corpus import split_contents

    if not corpus_file.exists():
        raise FileNotFoundError(f"2-hop warm start needs the synthetic world's corpus, not found: {corpus_file}")
    titles = {}
    with open(corpus_file, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if str(row["id"]) in ids:
                titles[str(row["id"])] = split_contents(row["contents"])[0]
    return titles


def expert_query(question: ExpertQuestion) -> str:
    """The query the expert searches: the question without its question mark (it names the entity and the relation,
    which is what the MiniLM index matches best, and a policy learns it by copying)."""
    return question.text.rstrip("?").strip()


def expert_queries(question: ExpertQuestion) -> list[str]:
    """What the expert searches, in order: the question, then (2-hop) the bridge entity by name."""
    return [expert_query(question), question.bridge] if question.bridge else [expert_query(question)]


def expert_pieces(question: ExpertQuestion, rng: random.Random) -> list[str]:
    """The generated pieces, one more than the searches: each ends with a `</search>`, the last with `</answer>`."""
    need = NEEDS.get(question.answer_type, "the answer")
    answer = question.golden_answers[0]
    first = rng.choice(FIRST_THOUGHTS).format(need=need)
    pieces = [f"<think> {first} </think>\n<search> {expert_query(question)} </search>"]
    if question.bridge:
        bridge = rng.choice(BRIDGE_THOUGHTS).format(bridge=question.bridge, need=need, subject=question.subject)
        pieces.append(f"\n<think> {bridge} </think>\n<search> {question.bridge} </search>")
    nth = "second" if question.bridge else "first"
    second = rng.choice(ANSWER_THOUGHTS).format(nth=nth, answer=answer)
    pieces.append(f"\n<think> {second} </think>\n<answer> The final answer is \\[ \\boxed{{{answer}}} \\] </answer>")
    return pieces


def expert_trajectory(question: ExpertQuestion, blocks: Sequence[str], tokenizer: Any, template: str,
                      rng: random.Random, reward: Any) -> ExpertTrajectory:
    """Token-level expert trajectory of `question` with the service's result text `blocks` (one per search of
    expert_queries), scored by `reward`.

    Tokenised the way the rollout builds one: prompt ids from build_prompt_ids, each generated piece encoded on its
    own (vLLM's ids end where the stop string `</search>` ends), the inserted block encoded on its own with loss mask
    0, and the EOS id the engine returns when the policy stops.
    """
    pieces = expert_pieces(question, rng)
    inserted = [RESULT_TEMPLATE.format(block) for block in blocks]
    if len(inserted) != len(pieces) - 1:
        raise ValueError(f"{len(pieces) - 1} searches need as many result blocks, got {len(inserted)}")
    trajectory = Trajectory(prompt_id=f"warm:{question.id}", group_index=0, policy_version=0,
                            prompt_ids=build_prompt_ids(question.text, template, tokenizer))
    parts = [(piece, True) for piece in pieces]
    for k, block in enumerate(inserted):
        parts.insert(2 * k + 1, (block, False))
    for k, (text, generated) in enumerate(parts):
        ends = k == len(parts) - 1
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if ends:
            ids.append(tokenizer.eos_token_id)  # vLLM's last generated id when the policy stops at EOS
        trajectory.response_ids.extend(ids)
        trajectory.loss_mask.extend([int(generated)] * len(ids))
        trajectory.behaviour_logprobs.extend([0.0] * len(ids))
        if generated:
            trajectory.generated_tokens += len(ids)
            trajectory.num_turns += 1
        else:
            trajectory.inserted_tokens += len(ids)
    trajectory.num_searches = len(inserted)
    trajectory.end_reason, trajectory.finished = "eos", True
    trajectory.response_text = "".join(text for text, _ in parts)
    reward(trajectory, question.golden_answers)
    return ExpertTrajectory(trajectory, question, expert_queries(question), list(blocks))


async def search_blocks(urls: list[str], queries: list[str], topk: int, style: str) -> list[str]:
    """The result text the real retrieval service gives each query, formatted exactly as the rollout's SearchTool."""
    from actors.rollout import SearchTool
    from retrieval_service.client import RetrievalClient

    client = RetrievalClient(urls)
    try:
        tool = SearchTool(client, topk, style)  # type: ignore[arg-type]
        results = await asyncio.gather(*(tool(query) for query in queries))
    finally:
        await client.aclose()
    failed = sum(failed for _, failed in results)
    if failed:
        raise RuntimeError(f"{failed} of {len(queries)} warm-start searches failed: the retrieval service did not answer")
    return [block for block, _ in results]


def build_expert_trajectories(config: JobConfig, questions: list[ExpertQuestion], urls: list[str], tokenizer: Any,
                              wanted: int) -> tuple[list[ExpertTrajectory], int]:
    """Expert trajectories for up to `wanted` of `questions` whose searches find what they look for (the bridge in
    the first block of a 2-hop question, the answer in the last block); others are skipped, since imitating a guess
    would teach answering without evidence. Also returns how many were skipped."""
    from actors.reward import reward_fn

    rng = random.Random(config.seed)
    pool = list(questions)
    rng.shuffle(pool)
    candidates = pool[: wanted * 3]  # room for the ones whose search misses
    hops = len(expert_queries(candidates[0])) if candidates else 1
    found = asyncio.run(search_blocks(urls, [query for q in candidates for query in expert_queries(q)],
                                      config.retrieval.topk, config.retrieval.result_format))
    reward = reward_fn(config.rollout.reward_fn)
    experts, skipped = [], 0
    for k, question in enumerate(candidates):
        if len(experts) == wanted:
            break
        blocks = found[k * hops:(k + 1) * hops]
        if not (any(answer.lower() in blocks[-1].lower() for answer in question.golden_answers)
                and question.bridge.lower() in blocks[0].lower()):
            skipped += 1
            continue
        expert = expert_trajectory(question, blocks, tokenizer, config.rollout.prompt_template, rng, reward)
        if expert.trajectory.reward < 1.0:
            raise AssertionError(f"expert trajectory of {question.id} scored {expert.trajectory.reward}, not 1: "
                                 f"{expert.trajectory.response_text!r}")
        experts.append(expert)
    return experts, skipped


def supervised_learner_config(config: JobConfig) -> LearnerConfig:
    """The job's learner turned into the NLL step described in the module docstring (advantage 1 is in the data)."""
    warm = config.warm_start
    # A fresh objective, not the job's: nothing of the RL step's (clip, KL, dynamic sampling ...) changes this NLL
    # step, so none of it may change the warm start's cache key either (a rebuild costs ~8 minutes on learn-cpu).
    grpo = GRPOConfig(
        kl_coef=0.0, entropy_coef=0.0, old_logprobs="recompute", decoupled=False, temperature=1.0,
        agg="token-mean", micro_batch_weight="tokens",  # the NLL of the whole batch, whatever the micro-batches
    )
    return config.learner.model_copy(update={
        "world_size": 1, "cpus_per_rank": warm.cpus, "lr": warm.lr, "lr_schedule": "constant", "warmup_steps": 0,
        "mini_batches": 1, "ppo_epochs": 1, "grpo": grpo,
    })


def as_training_table(experts: Sequence[ExpertTrajectory]) -> pa.Table:
    """The expert trajectories with advantage 1 on every row: the learner's input for one supervised step."""
    table = pa.Table.from_batches([to_record_batch([e.trajectory for e in experts])])
    return table.append_column("advantage", pa.array([1.0] * table.num_rows, type=pa.float32()))


def masked_nll(logprobs: Any, table: pa.Table) -> float:
    """Token-mean negative log-likelihood of the masked-in response tokens, from the learner's (B, T-1) logprobs."""
    total, count = 0.0, 0
    for row, (prompt, mask) in enumerate(zip(table.column("prompt_ids").to_pylist(),
                                             table.column("loss_mask").to_pylist(), strict=True)):
        start = len(prompt) - 1
        for k, m in enumerate(mask):
            if m:
                total -= float(logprobs[row, start + k])
                count += 1
    return total / max(count, 1)


def split_held_out(experts: list[ExpertTrajectory], count: int,
                   seed: int) -> tuple[list[ExpertTrajectory], list[ExpertTrajectory]]:
    """(trained, held out): `count` experts, drawn seeded across 1-hop and 2-hop ones, kept out of training to
    measure the held-out NLL that stops the warm start; at least one expert is always trained on."""
    if count <= 0:
        return experts, []
    if count >= len(experts):
        raise ValueError(f"warm_start.held_out={count} leaves none of the {len(experts)} expert trajectories to train on")
    order = list(range(len(experts)))
    random.Random(seed + 1).shuffle(order)
    held = set(order[:count])
    return ([e for k, e in enumerate(experts) if k not in held], [e for k, e in enumerate(experts) if k in held])


def should_stop(held_out_nll: float | None, stop_nll: float) -> bool:
    """Whether the warm start stops now: the held-out experts' NLL reached the floor (no floor when 0)."""
    return stop_nll > 0 and held_out_nll is not None and held_out_nll <= stop_nll


def cache_key(config: JobConfig, policy_path: str, train_file: Path, excluded: Sequence[str] = ()) -> str:
    """Hash of everything the warm-started weights depend on; `excluded` are the held-out questions that were in
    the training pool (none for the synthetic world, whose dev and train splits are disjoint)."""
    policy = Path(policy_path)
    weights = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in policy.glob("*.safetensors")) \
        if policy.is_dir() else []
    inputs = {
        "version": 3, "policy": str(policy_path), "weights": weights, "train_file": str(train_file),
        "train_size": train_file.stat().st_size, "warm_start": config.warm_start.model_dump(),
        "seed": config.seed, "template": config.rollout.prompt_template, "reward": config.rollout.reward_fn,
        "retrieval": {"topk": config.retrieval.topk, "format": config.retrieval.result_format,
                      "encoder": config.retrieval.encoder.model_dump(mode="json"), "index": config.retrieval.index_dir},
        "learner": supervised_learner_config(config).model_dump(mode="json"), "excluded": sorted(excluded),
        "thoughts": [FIRST_THOUGHTS, BRIDGE_THOUGHTS, ANSWER_THOUGHTS, NEEDS],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_start_policy(config: JobConfig, policy_path: str, urls: list[str], tokenizer: Any,
                      held_out: Sequence[str] = ()) -> str:
    """The policy the job starts from: `policy_path` when the warm start is off, else the cached warm-started copy
    (built now if missing). `held_out` are validation question texts, which must never be trained on."""
    if not config.warm_start.enabled:
        return policy_path
    from cluster.job_setup import data_files
    from cluster.models import _exclusive, _publish, cache_root

    train_file = data_files(config)[0][0]
    excluded = {q.text for hops in (1, 2) for q in training_questions(train_file, hops=hops)} & set(held_out)
    target = cache_root() / WARM_DIR / cache_key(config, policy_path, train_file, sorted(excluded))
    if (target / ".complete").exists():
        log.info("warm start: reusing %s", target)
        return str(target)
    with _exclusive(target):
        if (target / ".complete").exists():
            return str(target)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        manifest = run_warm_start(config, policy_path, urls, tokenizer, train_file, held_out, build)
        (build / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publish(build, target)
    return str(target)


def run_warm_start(config: JobConfig, policy_path: str, urls: list[str], tokenizer: Any, train_file: Path,
                   held_out: Sequence[str], out_dir: Path) -> dict[str, Any]:
    """Build the expert trajectories, train on them through a LearnerGroup, export the policy to `out_dir`."""
    from cluster.learner_group import LearnerGroup

    warm = config.warm_start
    started = time.perf_counter()
    experts, skipped = build_expert_trajectories(config, training_questions(train_file, held_out), urls, tokenizer,
                                                 warm.questions)
    if not experts:
        raise RuntimeError("warm start: no 1-hop question's search returned its answer")
    if warm.two_hop_questions:
        two_hop, skipped_two_hop = build_expert_trajectories(config, training_questions(train_file, held_out, hops=2),
                                                             urls, tokenizer, warm.two_hop_questions)
        experts, skipped = experts + two_hop, skipped + skipped_two_hop
    overlap = {e.question.text for e in experts} & set(held_out)
    assert not overlap, f"warm start would train on held-out questions {sorted(overlap)}"
    experts, probe_experts = split_held_out(experts, warm.held_out, config.seed)
    build_seconds = time.perf_counter() - started
    log.info("warm start: %d expert trajectories (%d questions skipped: answer not retrieved), %.1f tokens each",
             len(experts), skipped, sum(len(e.trajectory.response_ids) + len(e.trajectory.prompt_ids)
                                        for e in experts) / len(experts))
    group = LearnerGroup(supervised_learner_config(config), policy_path)
    rng = random.Random(config.seed)
    steps: list[dict[str, float]] = []
    stopped = ""
    try:
        probe = as_training_table(experts[: warm.batch_size])
        held = as_training_table(probe_experts) if probe_experts else None
        nll_before = masked_nll(group.compute_logprobs(probe), probe)
        held_before = masked_nll(group.compute_logprobs(held), held) if held is not None else None
        for epoch in range(warm.epochs):
            order = list(experts)
            rng.shuffle(order)
            for start in range(0, len(order), warm.batch_size):
                step_started = time.perf_counter()
                metrics = group.train_step(as_training_table(order[start:start + warm.batch_size]))
                steps.append({"epoch": epoch, "seconds": time.perf_counter() - step_started,
                              "grad_norm": metrics.get("grad_norm", 0.0), "entropy": metrics.get("entropy", 0.0)})
                if held is not None:
                    steps[-1]["held_out_nll"] = masked_nll(group.compute_logprobs(held), held)
                nll = f"{steps[-1]['held_out_nll']:.3f}" if held is not None else "-"
                log.info("warm start step %d (epoch %d): %.1f s, grad norm %.2f, held-out NLL %s", len(steps), epoch,
                         steps[-1]["seconds"], steps[-1]["grad_norm"], nll)
                if should_stop(steps[-1].get("held_out_nll"), warm.stop_nll):
                    stopped = f"held-out NLL {steps[-1]['held_out_nll']:.3f} <= stop_nll {warm.stop_nll}"
                    break
            if stopped:
                break
        nll_after = masked_nll(group.compute_logprobs(probe), probe)
        group.export_hf(str(out_dir), policy_path)
    finally:
        group.shutdown()
    manifest = {
        "policy": policy_path, "trajectories": len(experts), "skipped_questions": skipped, "steps": len(steps),
        "nll_before": nll_before, "nll_after": nll_after, "build_seconds": build_seconds,
        "held_out_trajectories": len(probe_experts), "held_out_nll_before": held_before,
        "held_out_nll": [s.get("held_out_nll") for s in steps], "entropy": [s["entropy"] for s in steps],
        "stopped_early": stopped,
        "seconds": time.perf_counter() - started, "step_seconds": [s["seconds"] for s in steps],
        "question_ids": [e.question.id for e in experts],
        "held_out_question_ids": [e.question.id for e in probe_experts],
        "two_hop_trajectories": sum(bool(e.question.bridge) for e in experts),
        "example": experts[0].trajectory.response_text,
    }
    log.info("warm start: %d steps in %.0f s, NLL of the expert tokens %.3f -> %.3f", len(steps),
             manifest["seconds"], nll_before, nll_after)
    return manifest
