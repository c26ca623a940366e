"""The DeepSpeed learner in this process (one rank): logprobs with padding, mask correctness, training, export."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from actors.trajectory import Trajectory, to_record_batch
from learner.batch import TrainBatch, collate
from learner.checkpoint import export_hf
from learner.config import GRPOConfig, LearnerConfig
from learner.engine import LearnerEngine
from learner.grpo import policy_loss, with_advantages
from learner.logprobs import token_logprobs
from tests.trajectories import random_groups

pytestmark = pytest.mark.slow


def trajectory_groups(n_groups: int = 2, group_size: int = 4, seed: int = 0) -> list:
    """Fixed groups of random trajectories (tests/trajectories.py)."""
    return random_groups(n_groups, group_size, seed)


def training_batch(groups: list, pad_token_id: int) -> TrainBatch:
    """The groups collated for an update: GRPO advantages, then padded tensors."""
    return collate(with_advantages(groups), pad_token_id)


def with_behaviour_logprobs(groups: list, logprobs: torch.Tensor) -> list:
    """The same groups with behaviour logprobs replaced by `logprobs` (B, T-1) laid out as collate lays them."""
    out, row = [], 0
    for group in groups:
        trajectories = []
        for trajectory in [Trajectory(**r) for r in group.to_pylist()]:
            start = len(trajectory.prompt_ids) - 1
            values = logprobs[row, start : start + len(trajectory.response_ids)].tolist()
            trajectory.behaviour_logprobs = [v if m else 0.0 for v, m in zip(values, trajectory.loss_mask, strict=True)]
            trajectories.append(trajectory)
            row += 1
        out.append(to_record_batch(trajectories))
    return out


@pytest.fixture(scope="module")
def learner(policy_path: str) -> LearnerEngine:
    config = LearnerConfig(
        zero_stage=2, lr=1e-3, lr_schedule="warmup", warmup_steps=3, micro_batch_size=3, gradient_checkpointing=True
    )
    return LearnerEngine(config, policy_path)


def test_padded_and_unpadded_logprobs_agree(learner: LearnerEngine) -> None:
    groups = trajectory_groups()
    batch = training_batch(groups, learner.pad_token_id)
    padded = learner.compute_logprobs(batch)
    assert (padded[batch.attention_mask[:, 1:] == 0] == 0).all()
    for row in range(batch.size):
        alone = batch.rows(row, row + 1)
        single = learner.compute_logprobs(alone)
        width = single.shape[1]
        torch.testing.assert_close(padded[row, :width], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_masked_tokens_get_exactly_zero_gradient(policy_path: str, chunk_tokens: int | None) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    batch = training_batch(trajectory_groups(), model.config.pad_token_id)
    captured = {}

    def keep_hidden(_module, inputs):  # noqa: ANN001, ANN202 - a forward pre-hook on the LM head
        inputs[0].retain_grad()
        captured["hidden"] = inputs[0]

    with torch.no_grad():
        behaviour, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, chunk_tokens=chunk_tokens)
    model.lm_head.register_forward_pre_hook(keep_hidden)
    logprobs, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, chunk_tokens=chunk_tokens)
    advantages = torch.linspace(-1, 1, batch.size)
    # On-policy (ratio 1): no token is clipped, so every masked-in token must receive gradient.
    loss, _ = policy_loss(logprobs, behaviour, advantages, batch.loss_mask, kl_coef=0.0)
    loss.backward()
    # The LM head's input at position p predicts token p + 1: its gradient is that token's, laid out like loss_mask.
    per_position = captured["hidden"].grad[:, :-1].abs().sum(-1)
    masked_out = batch.loss_mask == 0
    assert (per_position[masked_out] == 0).all()
    assert (per_position[~masked_out] > 0).all()


def test_masked_out_tokens_do_not_change_the_update(policy_path: str) -> None:
    config = LearnerConfig(zero_stage=2, lr=1e-3, micro_batch_size=3, grpo=GRPOConfig(kl_coef=0.0))
    groups = trajectory_groups(seed=1)
    batch = training_batch(groups, 0)
    # Garbage behaviour logprobs where loss_mask is 0 (retrieved span, prompt and padding columns).
    garbage = batch.behaviour_logprobs.clone()
    garbage[batch.loss_mask == 0] = 5.0
    changed = dataclasses.replace(batch, behaviour_logprobs=garbage)
    updates = []
    for variant in (batch, changed):
        engine = LearnerEngine(config, policy_path)
        engine.train_step(variant)
        updates.append({name: tensor.clone() for name, tensor in engine.full_parameters()})
    for name, tensor in updates[0].items():
        assert torch.equal(tensor, updates[1][name]), name


@pytest.mark.parametrize(("agg", "weight"), [("token-mean", "sequences"), ("token-mean", "tokens"),
                                             ("seq-mean-token-mean", "sequences")])
def test_padding_rows_leave_loss_and_update_unchanged(policy_path: str, agg: str, weight: str) -> None:
    """An epoch's last batch need not split over ranks and mini-batches: the rows that pad it change nothing."""
    grpo = GRPOConfig(kl_coef=0.0, agg=agg, micro_batch_weight=weight)
    config = LearnerConfig(zero_stage=2, lr=1e-3, micro_batch_size=2, grpo=grpo)
    batch = training_batch(trajectory_groups(n_groups=1, group_size=5, seed=4), 0)
    padded = batch.padded(4)
    assert (padded.size, int(padded.real.sum()), float(padded.loss_mask[5:].sum())) == (8, 5, 0.0)
    results = []
    for variant in (batch, padded):
        engine = LearnerEngine(config, policy_path)
        metrics = engine.train_step(variant)
        results.append((metrics, {name: tensor.clone() for name, tensor in engine.full_parameters()}))
    (plain, plain_weights), (with_pad, pad_weights) = results
    assert with_pad["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=1e-9)
    assert with_pad["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(pad_weights[name], tensor, atol=1e-7, rtol=0)


def test_micro_batches_weigh_by_their_trajectories_as_the_reference(policy_path: str) -> None:
    """The default (the reference's verl dp_actor, ReCall branch re-search, src/verl/workers/actor/dp_actor.py:257-276)
    averages tokens within each micro-batch and weights micro-batches by their trajectories; `micro_batch_weight:
    tokens` is the exact token mean of the batch. Checked against policy_loss applied by hand to the same rows."""
    groups = trajectory_groups(n_groups=2, group_size=3, seed=6)  # 6 rows: micro-batches of 4 and 2
    batch = training_batch(groups, 0)
    losses = {}
    for weight in ("sequences", "tokens"):
        grpo = GRPOConfig(kl_coef=0.0, entropy_coef=0.0, micro_batch_weight=weight)
        engine = LearnerEngine(LearnerConfig(zero_stage=2, lr=1e-3, micro_batch_size=4, grpo=grpo), policy_path)
        current = engine.compute_logprobs(batch)  # the policy before the update: what the step's forward sees
        losses[weight] = engine.train_step(batch)["loss"]

    def micro_loss(start: int, stop: int) -> float:
        loss, _ = policy_loss(current[start:stop], batch.behaviour_logprobs[start:stop], batch.advantages[start:stop],
                              batch.loss_mask[start:stop])
        return float(loss)

    by_trajectories = 4 / 6 * micro_loss(0, 4) + 2 / 6 * micro_loss(4, 6)
    assert losses["sequences"] == pytest.approx(by_trajectories, rel=1e-5)
    assert losses["tokens"] == pytest.approx(micro_loss(0, 6), rel=1e-5)
    assert abs(by_trajectories - micro_loss(0, 6)) > 1e-3 * abs(micro_loss(0, 6))  # the two rules do differ here


def test_loss_goes_down_on_a_fixed_batch(learner: LearnerEngine, policy_path: str, tmp_path) -> None:
    groups = trajectory_groups(seed=2)
    # On-policy behaviour logprobs, as a fresh rollout would bring them: the first ratio is exactly 1.
    behaviour = learner.compute_logprobs(training_batch(groups, learner.pad_token_id))
    batch = training_batch(with_behaviour_logprobs(groups, behaviour), learner.pad_token_id)
    history = [learner.train_step(batch) for _ in range(5)]
    losses = [m["loss"] for m in history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert history[0]["clip_fraction_binding"] == 0.0 and abs(history[0]["approx_kl"]) < 1e-6
    assert history[0]["ref_kl"] < 1e-6 < history[-1]["ref_kl"]
    for key in ("grad_norm", "entropy", "kl_loss", "policy_loss", "reward_mean"):
        assert key in history[0]
    lrs = [m["lr"] for m in history]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])

    # The Hugging Face export computes the same logprobs as the learner.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = export_hf(learner, tmp_path / "hf", policy_path)
    assert (exported / "model.safetensors").exists() and AutoTokenizer.from_pretrained(exported) is not None
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    reloaded, _ = token_logprobs(model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(reloaded.detach(), learner.compute_logprobs(batch), atol=1e-5, rtol=0)


def test_sampling_temperature_scores_and_recomputed_old_logprobs(policy_path: str) -> None:
    from transformers import AutoModelForCausalLM

    grpo = GRPOConfig(temperature=0.7)  # old_logprobs auto -> recompute: vLLM's logprobs are at temperature 1
    assert grpo.recompute_old_logprobs
    config = LearnerConfig(zero_stage=2, lr=1e-3, micro_batch_size=3, mini_batches=2, grpo=grpo)
    engine = LearnerEngine(config, policy_path)
    # Behaviour logprobs of this batch are a constant -6.9, far from the policy: only recomputing makes ratio 1.
    batch = training_batch(trajectory_groups(seed=3), engine.pad_token_id)

    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / 0.7
        expected = torch.gather(logits.log_softmax(-1), -1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    expected = torch.where(batch.attention_mask[:, 1:].bool(), expected, 0.0)
    torch.testing.assert_close(engine.compute_logprobs(batch), expected, atol=1e-5, rtol=0)

    first = engine.train_step(batch)
    # Mini-batch 1 is exactly on-policy (ratio 1, the reference equals the policy); mini-batch 2 follows one update.
    assert first["clip_fraction_binding"] < 0.5
    behaviour_config = config.model_copy(update={"grpo": GRPOConfig(temperature=0.7, old_logprobs="behaviour")})
    stale = LearnerEngine(behaviour_config, policy_path).train_step(batch)
    assert stale["clip_fraction_binding"] > first["clip_fraction_binding"]

    single = LearnerEngine(config.model_copy(update={"mini_batches": 1}), policy_path).train_step(batch)
    assert single["clip_fraction_binding"] == 0.0 and abs(single["approx_kl"]) < 1e-6 and single["ref_kl"] < 1e-6


def test_zero3_builds_the_model_partitioned_and_only_inside_the_block(policy_path: str) -> None:
    from transformers import AutoModelForCausalLM

    from learner.distributed import deepspeed_config, init_distributed, partitioned_loading

    init_distributed()
    with partitioned_loading(deepspeed_config(LearnerConfig(zero_stage=3))):
        partitioned = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    # Built under zero.Init: every weight is a ZeRO-3 parameter from the start, never materialised whole by HF.
    assert all(hasattr(p, "ds_id") for p in partitioned.parameters())
    plain = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    with partitioned_loading(deepspeed_config(LearnerConfig(zero_stage=2))):
        assert not any(hasattr(p, "ds_id") for p in AutoModelForCausalLM.from_pretrained(policy_path).parameters())


def test_no_shared_memory_left_behind() -> None:
    leftovers = [name for name in os.listdir("/dev/shm") if "deepspeed" in name.lower() or "shm_comm" in name]
    assert leftovers == []
