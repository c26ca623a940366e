"""The format warm start: expert trajectories tokenised as the rollout does, held-out questions never used, and the
supervised step through the GRPO learner equal to a plain NLL step."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from actors.prompts import RESULT_TEMPLATE, build_prompt_ids, format_passages
from actors.research_grammar import format_problem
from actors.reward import reward_fn
from cluster import warm_start
from cluster.config import load_config
from cluster.models import tiny_policy_dir
from cluster.warm_start import (
    ExpertQuestion,
    as_training_table,
    cache_key,
    expert_pieces,
    expert_query,
    expert_trajectory,
    masked_nll,
    should_stop,
    split_held_out,
    supervised_learner_config,
    training_questions,
)
from learner.grpo import policy_loss
from learner.logprobs import token_logprobs
from qa.world import generate_world
from retrieval_service.client import Passage
from retrieval_service.corpus import split_contents


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's and learn-cpu's synthetic world (seed 0, 1,000 passages), without an index."""
    out = tmp_path_factory.mktemp("warm-world")
    generate_world(out, seed=0, num_passages=1000)
    return out


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_dir())


def passages_of(world: Path, question: dict) -> list[Passage]:
    """The question's supporting passages from the corpus, in hop order, as the service would return them."""
    wanted = question["metadata"]["supporting_ids"]
    found = {}
    for line in (world / "corpus.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["id"] in wanted:
            title, text = split_contents(row["contents"])
            found[row["id"]] = Passage(row["id"], title, text, 1.0)
    return [found[i] for i in wanted]


def first_one_hop(world: Path) -> tuple[dict, ExpertQuestion]:
    row = next(json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()
               if json.loads(line)["metadata"]["hops"] == 1)
    return row, ExpertQuestion(row["id"], row["question"], row["golden_answers"], row["metadata"]["answer_type"])


def test_expert_trajectory_is_tokenised_as_the_rollout_does(world: Path, tokenizer) -> None:  # noqa: ANN001
    row, question = first_one_hop(world)
    block = format_passages(passages_of(world, row))
    expert = expert_trajectory(question, [block], tokenizer, "instruct", random.Random(0), reward_fn("research"))
    t = expert.trajectory
    assert t.prompt_ids == build_prompt_ids(question.text, "instruct", tokenizer)
    inserted = tokenizer.encode(RESULT_TEMPLATE.format(block), add_special_tokens=False)
    # Loss mask: generated piece (1), the inserted block exactly as the rollout encodes it (0), generated piece (1).
    start = t.loss_mask.index(0)
    assert t.response_ids[start:start + len(inserted)] == inserted
    assert t.loss_mask == [1] * start + [0] * len(inserted) + [1] * (len(t.loss_mask) - start - len(inserted))
    assert tokenizer.decode(t.response_ids[:start]).endswith("</search>")  # where vLLM's stop string ends a turn
    assert t.response_ids[-1] == tokenizer.eos_token_id
    assert t.inserted_tokens == len(inserted) and t.generated_tokens == len(t.response_ids) - len(inserted)
    assert f"<search> {expert_query(question)} </search>" in t.response_text
    assert format_problem(t.response_text) is None
    assert (t.reward, t.f1, t.format_valid, t.num_searches) == (1.0, 1.0, True, 1)


def test_two_hop_expert_searches_the_question_then_the_bridge(world: Path, tokenizer) -> None:  # noqa: ANN001
    """A 2-hop expert: search the question, think, search the bridge entity by name, answer; both blocks masked."""
    question = training_questions(world / "train.jsonl", hops=2)[0]
    row = next(json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()
               if json.loads(line)["id"] == question.id)
    first, second = passages_of(world, row)[0], passages_of(world, row)[-1]
    assert question.bridge == second.title and question.subject == first.title and question.bridge in first.text
    blocks = [format_passages([first]), format_passages([second])]
    expert = expert_trajectory(question, blocks, tokenizer, "instruct", random.Random(0), reward_fn("research"))
    t = expert.trajectory
    assert expert.queries == [expert_query(question), question.bridge]
    assert t.response_text.count("<search>") == 2 and f"<search> {question.bridge} </search>" in t.response_text
    inserted = [tokenizer.encode(RESULT_TEMPLATE.format(b), add_special_tokens=False) for b in blocks]
    assert t.inserted_tokens == sum(map(len, inserted)) == t.loss_mask.count(0)
    runs = [k for k in range(1, len(t.loss_mask)) if t.loss_mask[k] != t.loss_mask[k - 1]]
    assert len(runs) == 4  # generated, block, generated, block, generated
    assert t.response_ids[runs[0]:runs[1]] == inserted[0] and t.response_ids[runs[2]:runs[3]] == inserted[1]
    assert (t.reward, t.format_valid, t.num_searches) == (1.0, True, 2)
    with pytest.raises(ValueError, match="2 searches need as many result blocks"):
        expert_trajectory(question, blocks[:1], tokenizer, "instruct", random.Random(0), reward_fn("research"))


def test_each_thought_after_a_result_names_which_result_it_is(world: Path) -> None:
    """The thought after the first result opens with "The first result" and after the second with "The second
    result", in every variant: the choice to answer after two searches is cued by a token the policy can copy, and
    after the first result the word that follows tells the 1-hop answer from the 2-hop bridge search."""
    one_hop = training_questions(world / "train.jsonl")[0]
    two_hop = training_questions(world / "train.jsonl", hops=2)[0]
    after_first: dict[str, set[str]] = {"answer": set(), "bridge": set()}
    for seed in range(30):
        single = expert_pieces(one_hop, random.Random(seed))
        double = expert_pieces(two_hop, random.Random(seed))
        assert single[1].startswith("\n<think> The first result ") and "<answer>" in single[1]
        assert double[1].startswith("\n<think> The first result") and "<search>" in double[1]
        assert double[2].startswith("\n<think> The second result ") and "<answer>" in double[2]
        after_first["answer"].add(single[1].split()[4])
        after_first["bridge"].add(double[1].split()[4])
    assert len(after_first["answer"]) == len(after_first["bridge"]) == 3
    assert not after_first["answer"] & after_first["bridge"]


def test_held_out_experts_are_drawn_across_hops_and_stop_the_warm_start(world: Path, tokenizer) -> None:  # noqa: ANN001
    """warm_start.held_out experts are kept out of training (seeded, from 1-hop and 2-hop alike); the held-out NLL
    floor stops the warm start, and 0 means no floor."""
    reward = reward_fn("research")
    experts = [expert_trajectory(q, [format_passages([])] * (2 if q.bridge else 1), tokenizer, "instruct",
                                 random.Random(0), reward)
               for q in training_questions(world / "train.jsonl")[:6] + training_questions(world / "train.jsonl", hops=2)[:6]]
    trained, held = split_held_out(experts, 4, seed=0)
    assert len(trained) == 8 and len(held) == 4 and not {id(e) for e in trained} & {id(e) for e in held}
    assert [e.question.id for e in held] == [e.question.id for e in split_held_out(experts, 4, seed=0)[1]]
    assert {bool(e.question.bridge) for e in split_held_out(experts, 8, seed=0)[1]} == {True, False}
    assert split_held_out(experts, 0, seed=0) == (experts, [])
    with pytest.raises(ValueError, match="leaves none"):
        split_held_out(experts, 12, seed=0)
    assert should_stop(0.29, 0.3) and not should_stop(0.31, 0.3)
    assert not should_stop(0.01, 0.0) and not should_stop(None, 0.3)


def test_warm_start_questions_are_one_hop_training_questions_disjoint_from_held_out(world: Path) -> None:
    train = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (world / "dev.jsonl").read_text().splitlines()]
    dev_texts = {q["question"] for q in dev}
    # The world draws dev first, without replacement: no held-out question is a training question (warm start or RL).
    assert not dev_texts & {q["question"] for q in train}
    assert not {q["id"] for q in dev} & {q["id"] for q in train}
    chosen = training_questions(world / "train.jsonl", exclude=[train[0]["question"]])
    assert chosen and all(q.id.startswith("train_") for q in chosen)
    assert {q.text for q in chosen} <= {q["question"] for q in train if q["metadata"]["hops"] == 1}
    assert train[0]["question"] not in {q.text for q in chosen}
    assert not dev_texts & {q.text for q in chosen}


def test_supervised_config_is_the_nll_special_case() -> None:
    config = load_config("learn-cpu", [])
    learner = supervised_learner_config(config)
    assert config.warm_start.enabled
    assert (learner.grpo.kl_coef, learner.grpo.entropy_coef, learner.grpo.old_logprobs) == (0.0, 0.0, "recompute")
    assert (learner.mini_batches, learner.ppo_epochs, learner.lr) == (1, 1, config.warm_start.lr)
    assert not load_config("qwen2.5-7b-instruct", []).warm_start.enabled


def test_the_warm_start_cache_key_ignores_what_only_the_rl_steps_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Changing the RL steps (their lr, the GRPO objective, dynamic sampling, sampling, step count, engine) must not
    rebuild the warm start; its own settings and the retrieval its experts read must."""
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    base = cache_key(load_config("learn-cpu", []), "smollm2", train)
    for override in ("learner.lr=1e-4", "learner.grpo.clip=0.3", "learner.grpo.kl_coef=0.01",
                     "learner.grpo.dynamic_sampling=false", "learner.grpo.dynamic_sampling_max_draws=7",
                     "learner.grpo.dynamic_sampling_metric=reward", "rollout.sampling.max_turns=4",
                     "trainer.max_steps=3", "rollout.engine.cpu_kvcache_gb=2", "learner.lr_schedule=warmup",
                     "learner.warmup_steps=3"):
        assert cache_key(load_config("learn-cpu", [override]), "smollm2", train) == base, override
    for override in ("warm_start.lr=1e-4", "warm_start.batch_size=8", "retrieval.topk=3"):
        assert cache_key(load_config("learn-cpu", [override]), "smollm2", train) != base, override
    # the experts' wording is an input too: a cached warm start of older thoughts is not reused
    monkeypatch.setattr(warm_start, "ANSWER_THOUGHTS", ("The {nth} result: {answer}.",))
    reworded = cache_key(load_config("learn-cpu", []), "smollm2", train)
    assert reworded != base
    monkeypatch.setattr(warm_start, "NEEDS", {**warm_start.NEEDS, "city": "the town"})
    assert cache_key(load_config("learn-cpu", []), "smollm2", train) not in (base, reworded)


def test_grpo_surrogate_with_unit_advantage_has_the_nll_gradient(world: Path, tokenizer) -> None:  # noqa: ANN001
    """Advantage 1, old logprobs = the current ones (recomputed), no KL/entropy: grad == grad of token-mean NLL."""
    from transformers import AutoModelForCausalLM

    from learner.batch import collate

    row, question = first_one_hop(world)
    expert = expert_trajectory(question, [format_passages(passages_of(world, row))], tokenizer, "instruct",
                               random.Random(0), reward_fn("research"))
    batch = collate(as_training_table([expert, expert]), tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir(), dtype=torch.float32)

    def gradient(loss_of) -> list[torch.Tensor]:  # noqa: ANN001
        model.zero_grad(set_to_none=True)
        logprobs, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, chunk_tokens=64)
        loss_of(logprobs).backward()
        return [p.grad.clone() for p in model.parameters()]

    mask = batch.loss_mask

    def grpo(logprobs: torch.Tensor) -> torch.Tensor:
        return policy_loss(logprobs, logprobs.detach(), batch.advantages, mask, clip=0.2, agg="token-mean")[0]

    def nll(logprobs: torch.Tensor) -> torch.Tensor:
        return -(logprobs * mask).sum() / mask.sum()

    assert torch.equal(batch.advantages, torch.ones(2))
    for got, want in zip(gradient(grpo), gradient(nll), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        logprobs, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)
    assert masked_nll(logprobs.numpy(), as_training_table([expert, expert])) == pytest.approx(
        float(nll(logprobs)), rel=1e-5)


def test_one_learner_step_equals_a_plain_nll_adamw_step(world: Path, tokenizer) -> None:  # noqa: ANN001
    """LearnerEngine.train_step with the warm start's config moves the weights as torch AdamW on the NLL does."""
    from transformers import AutoModelForCausalLM

    from learner.batch import collate
    from learner.engine import LearnerEngine

    row, question = first_one_hop(world)
    expert = expert_trajectory(question, [format_passages(passages_of(world, row))], tokenizer, "instruct",
                               random.Random(0), reward_fn("research"))
    config = load_config("test-tiny", ["warm_start.enabled=true", "learner.zero_stage=0", "warm_start.lr=1e-3"])
    learner_config = supervised_learner_config(config)
    table = as_training_table([expert, expert])
    batch = collate(table, tokenizer.pad_token_id)

    plain = AutoModelForCausalLM.from_pretrained(tiny_policy_dir(), dtype=torch.float32)
    start = copy.deepcopy(plain.state_dict())
    optimizer = torch.optim.AdamW(plain.parameters(), lr=learner_config.lr, betas=learner_config.adam_betas,
                                  weight_decay=learner_config.weight_decay)
    logprobs, _ = token_logprobs(plain, batch.input_ids, batch.attention_mask)
    (-(logprobs * batch.loss_mask).sum() / batch.loss_mask.sum()).backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), learner_config.grad_clip)
    optimizer.step()

    engine = LearnerEngine(learner_config, str(tiny_policy_dir()))
    try:
        engine.train_step(batch)
        learned = dict(engine.module.named_parameters())
        moved = 0
        for name, want in plain.named_parameters():
            got = learned[name].detach()
            # AdamW's first step is lr * sign-like(g): equal where the gradients agree, which they do to float noise.
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=learner_config.lr * 1e-2)
            moved += int(not torch.equal(got, start[name]))
        assert moved > 0
    finally:
        engine.close()
