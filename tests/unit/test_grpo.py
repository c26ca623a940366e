"""GRPO math on small hand-computed cases: advantages, KL estimators, aggregation, the clipped loss and its gradients."""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import AGGREGATIONS, aggregate, group_advantages, kl_penalty, masked_mean, policy_loss


def _close(actual: torch.Tensor | float, expected: list[float] | float, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# --- advantages -----------------------------------------------------------------------------------------------


def test_two_groups_of_two_by_hand() -> None:
    # Group 1: mean 0.5, unbiased std sqrt(0.5); group 2 has equal rewards, so no signal at all.
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2, eps=1e-12)
    _close(advantages, [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5), 0.0, 0.0])


def test_group_of_three_uses_unbiased_std() -> None:
    # [0, 1, 2]: mean 1, unbiased std 1 (the biased one would be sqrt(2/3)).
    _close(
        group_advantages(torch.tensor([0.0, 1.0, 2.0]), group_size=3), [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)]
    )


def test_dr_grpo_advantage_is_reward_minus_mean() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.1, 0.1, 0.3, 0.9])
    _close(group_advantages(rewards, group_size=2, scale_by_std=False), [0.5, -0.5, 0.0, 0.0, -0.3, 0.3])


def test_equal_rewards_give_zero_advantage_not_nan() -> None:
    advantages = group_advantages(torch.full((10,), 0.1), group_size=5)
    assert torch.equal(advantages, torch.zeros(10))


def test_group_of_one_has_zero_advantage() -> None:
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.2]), group_size=1), torch.zeros(2))


def test_integer_rewards_become_float() -> None:
    assert group_advantages(torch.tensor([1, 0]), group_size=2).is_floating_point()


@pytest.mark.parametrize(
    ("rewards", "group_size"), [(torch.zeros(5), 2), (torch.zeros(4), 0), (torch.zeros(2, 2), 2)]
)
def test_bad_layout_is_rejected(rewards: torch.Tensor, group_size: int) -> None:
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size)


# --- KL estimators --------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand() -> None:
    logprobs, ref_logprobs = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    _close(kl_penalty(logprobs, ref_logprobs, "k1"), [math.log(2)])
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + log 2 - 1
    _close(kl_penalty(logprobs, ref_logprobs, "k3"), [0.5 + math.log(2) - 1])


def test_k3_is_never_negative_and_zero_on_equal_policies() -> None:
    generator = torch.Generator().manual_seed(0)
    logprobs = -3 * torch.rand(50, generator=generator)
    ref_logprobs = -3 * torch.rand(50, generator=generator)
    assert (kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()
    assert torch.equal(kl_penalty(logprobs, logprobs, "k3"), torch.zeros(50))


def test_unknown_estimator_is_rejected() -> None:
    with pytest.raises(ValueError):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k9")


# --- aggregation ----------------------------------------------------------------------------------------------

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_aggregations_by_hand() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    _close(aggregate(LOSS_MAT, mask, "token-mean"), 7 / 3)
    _close(aggregate(LOSS_MAT, mask, "seq-mean-token-mean"), (1.5 + 4.0) / 2)
    _close(aggregate(LOSS_MAT, mask, "seq-mean-token-sum-norm"), (3.0 + 4.0) / 2 / 3)
    _close(aggregate(LOSS_MAT, mask, "seq-mean-token-sum-norm", max_length=10), (3.0 + 4.0) / 2 / 10)


def test_empty_row_counts_as_zero_loss_sequence() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    _close(aggregate(LOSS_MAT, mask, "token-mean"), 1.5)
    _close(aggregate(LOSS_MAT, mask, "seq-mean-token-mean"), 0.75)
    _close(aggregate(LOSS_MAT, mask, "seq-mean-token-sum-norm"), 0.5)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_masked_garbage_never_reaches_the_loss(agg: str) -> None:
    loss_mat = LOSS_MAT.clone()
    loss_mat[0, 2], loss_mat[1, 1] = float("nan"), float("inf")
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _close(aggregate(loss_mat, mask, agg), aggregate(LOSS_MAT, mask, agg).item())


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_all_masked_batch_is_zero_with_finite_gradient(agg: str) -> None:
    loss_mat = LOSS_MAT.clone().requires_grad_()
    loss = aggregate(loss_mat, torch.zeros(2, 3), agg)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(loss_mat.grad, torch.zeros(2, 3))


def test_masked_mean_is_exact_over_unmasked_tokens() -> None:
    values = torch.tensor([[1.0, 100.0], [3.0, -50.0]])
    _close(masked_mean(values, torch.tensor([[1, 0], [1, 0]])), 2.0)
    _close(masked_mean(values, torch.zeros(2, 2)), 0.0)


def test_unknown_aggregation_is_rejected() -> None:
    with pytest.raises(ValueError):
        aggregate(LOSS_MAT, torch.ones(2, 3), "seq-sum")
    with pytest.raises(ValueError):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), agg="seq-sum")


# --- the clipped surrogate ------------------------------------------------------------------------------------

# Row 0 has advantage +1 and ratios (1.5, 1.1); row 1 has advantage -1 and ratios (0.5, 0.9).
RATIOS = torch.tensor([[1.5, 1.1], [0.5, 0.9]])
ADVANTAGES = torch.tensor([1.0, -1.0])


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    old_logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    return old_logprobs + RATIOS.log(), old_logprobs


def test_clipped_surrogate_by_hand() -> None:
    logprobs, old_logprobs = _hand_case()
    loss, metrics = policy_loss(logprobs, old_logprobs, ADVANTAGES, torch.ones(2, 2), clip=0.2)
    # Per-token losses: max(-1.5, -1.2) = -1.2 (clipped), -1.1, max(0.5, 0.8) = 0.8 (clipped), 0.9.
    _close(loss, (-1.2 - 1.1 + 0.8 + 0.9) / 4)
    _close(metrics["clip_fraction_binding"], 0.5)
    _close(metrics["policy_loss"], loss.item())
    _close(metrics["kl_loss"], 0.0)
    approx_kl = sum(r - 1 - math.log(r) for r in (1.5, 1.1, 0.5, 0.9)) / 4
    _close(metrics["approx_kl"], approx_kl)
    assert "ref_kl" not in metrics and "entropy" not in metrics


def test_asymmetric_clip_high() -> None:
    logprobs, old_logprobs = _hand_case()
    loss, metrics = policy_loss(logprobs, old_logprobs, ADVANTAGES, torch.ones(2, 2), clip=0.2, clip_high=0.6)
    # 1.5 is inside [0.8, 1.6] now; 0.5 is still below 0.8.
    _close(loss, (-1.5 - 1.1 + 0.8 + 0.9) / 4)
    _close(metrics["clip_fraction_binding"], 0.25)


def test_clip_fraction_counts_only_the_pessimistic_side() -> None:
    # A ratio outside the band on the side that hurts the objective is not clipped (the surrogate is kept).
    old_logprobs = torch.zeros(1, 4)
    logprobs = torch.tensor([[1.5, 0.5, 1.0, 0.85]]).log()
    _, metrics = policy_loss(logprobs, old_logprobs, torch.tensor([1.0]), torch.ones(1, 4), clip=0.2)
    assert metrics["clip_fraction_binding"] == 0.25
    _, metrics = policy_loss(logprobs, old_logprobs, torch.tensor([-1.0]), torch.ones(1, 4), clip=0.2)
    assert metrics["clip_fraction_binding"] == 0.25
    _, metrics = policy_loss(logprobs, old_logprobs, torch.tensor([0.0]), torch.ones(1, 4), clip=0.2)
    assert metrics["clip_fraction_binding"] == 0.0
    # CleanRL's clipfrac counts every ratio outside [0.8, 1.2] whichever side binds: 1.5 and 0.5.
    assert metrics["clip_fraction_ratio"] == 0.5


def test_k3_is_clamped_like_the_reference() -> None:
    """verl clamps the low-variance KL per token to [-10, 10]; without it one token could dominate the KL term."""
    logprobs, ref = torch.tensor([[0.0, 0.0]]), torch.tensor([[-0.1, 20.0]])
    k3 = kl_penalty(logprobs, ref, "k3")
    _close(k3[0, 0], math.exp(-0.1) + 0.1 - 1)
    assert k3[0, 1].item() == 10.0


def test_entropy_bonus_lowers_the_loss_by_coef_times_entropy() -> None:
    logprobs, old_logprobs = _hand_case()
    entropy = torch.tensor([[2.0, 1.0], [0.5, 0.5]], requires_grad=True)
    plain, _ = policy_loss(logprobs, old_logprobs, ADVANTAGES, torch.ones(2, 2))
    loss, metrics = policy_loss(logprobs, old_logprobs, ADVANTAGES, torch.ones(2, 2), entropy=entropy,
                                entropy_coef=0.01)
    _close(loss, plain.item() - 0.01 * 1.0)  # token mean of the entropy is 1.0
    _close(metrics["entropy_loss"], -0.01)
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.full((2, 2), -0.01 / 4))
    with pytest.raises(ValueError, match="entropy with its gradient"):
        policy_loss(logprobs, old_logprobs, ADVANTAGES, torch.ones(2, 2), entropy=entropy.detach(), entropy_coef=0.01)


def test_decoupled_objective_by_hand() -> None:
    """AReaL's decoupled PPO: clip against the proximal policy, weight by pi_prox / pi_behaviour (no gradient)."""
    logprobs, proximal = _hand_case()  # ratios to the proximal policy: 1.5, 1.1 / 0.5, 0.9
    weights = torch.tensor([[2.0, 0.5], [1.0, 0.25]])
    behaviour = proximal - weights.log()
    logprobs.requires_grad_(True)
    loss, metrics = policy_loss(logprobs, proximal, ADVANTAGES, torch.ones(2, 2), behaviour_logprobs=behaviour)
    # The clipped per-token losses of the plain case, -1.2, -1.1, 0.8, 0.9, each times its behaviour weight.
    _close(loss, (-1.2 * 2.0 - 1.1 * 0.5 + 0.8 * 1.0 + 0.9 * 0.25) / 4)
    _close(metrics["behaviour_weight"], (2.0 + 0.5 + 1.0 + 0.25) / 4)
    loss.backward()
    # Clipped tokens get no gradient; an unclipped one gets -A * ratio * weight / 4 (d ratio / d logp = ratio).
    expected = torch.tensor([[0.0, -1.0 * 1.1 * 0.5 / 4], [0.0, 1.0 * 0.9 * 0.25 / 4]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_per_token_advantages_equal_broadcast_ones() -> None:
    logprobs, old_logprobs = _hand_case()
    mask = torch.tensor([[1, 1], [1, 0]])
    per_sequence, _ = policy_loss(logprobs, old_logprobs, ADVANTAGES, mask)
    per_token, _ = policy_loss(logprobs, old_logprobs, ADVANTAGES[:, None].expand(2, 2), mask)
    assert torch.equal(per_sequence, per_token)


def test_kl_term_only_with_reference_and_positive_coefficient() -> None:
    logprobs, old_logprobs = _hand_case()
    ref_logprobs = old_logprobs - 0.3
    mask = torch.tensor([[1, 1], [1, 0]])
    plain, _ = policy_loss(logprobs, old_logprobs, ADVANTAGES, mask)
    unweighted, metrics = policy_loss(logprobs, old_logprobs, ADVANTAGES, mask, ref_logprobs=ref_logprobs)
    assert torch.equal(plain, unweighted) and metrics["kl_loss"] == 0.0
    k3 = kl_penalty(logprobs, ref_logprobs, "k3")
    _close(metrics["ref_kl"], (k3[0, 0] + k3[0, 1] + k3[1, 0]).item() / 3)
    with_kl, metrics = policy_loss(
        logprobs, old_logprobs, ADVANTAGES, mask, ref_logprobs=ref_logprobs, kl_coef=0.1
    )
    _close(with_kl, plain.item() + 0.1 * metrics["ref_kl"])
    _close(metrics["kl_loss"], 0.1 * metrics["ref_kl"])
    _, metrics = policy_loss(
        logprobs, old_logprobs, ADVANTAGES, mask, ref_logprobs=ref_logprobs, kl_estimator="k1"
    )
    _close(metrics["ref_kl"], (logprobs - ref_logprobs)[mask.bool()].mean().item())


def test_entropy_metric_is_masked_mean() -> None:
    logprobs, old_logprobs = _hand_case()
    entropy = torch.tensor([[2.0, 4.0], [6.0, 1000.0]])
    _, metrics = policy_loss(
        logprobs, old_logprobs, ADVANTAGES, torch.tensor([[1, 1], [1, 0]]), entropy=entropy
    )
    _close(metrics["entropy"], 4.0)


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 3))


# --- gradients ------------------------------------------------------------------------------------------------


def _random_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(6, 5, generator=generator)
    old_logprobs = logprobs + 0.3 * torch.randn(6, 5, generator=generator)
    ref_logprobs = logprobs + 0.3 * torch.randn(6, 5, generator=generator)
    advantages = torch.randn(6, generator=generator)
    mask = torch.rand(6, 5, generator=generator) > 0.4
    mask[2] = False  # an empty row, e.g. a response that is all retrieved text
    mask[0, 0] = True
    return logprobs, old_logprobs, ref_logprobs, advantages, mask


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_masked_tokens_get_exactly_zero_gradient(agg: str) -> None:
    logprobs, old_logprobs, ref_logprobs, advantages, mask = _random_batch()
    logprobs.requires_grad_()
    loss, metrics = policy_loss(
        logprobs, old_logprobs, advantages, mask.float(), agg=agg, ref_logprobs=ref_logprobs, kl_coef=0.5
    )
    loss.backward()
    assert torch.equal(logprobs.grad[~mask], torch.zeros(int((~mask).sum())))
    assert (logprobs.grad[mask] != 0).all()
    assert math.isfinite(loss.item()) and all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_all_empty_rows_give_finite_zero_loss(agg: str) -> None:
    logprobs, old_logprobs, ref_logprobs, advantages, _ = _random_batch()
    logprobs.requires_grad_()
    loss, metrics = policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        torch.zeros(6, 5),
        agg=agg,
        ref_logprobs=ref_logprobs,
        kl_coef=0.5,
        entropy=torch.ones(6, 5),
    )
    loss.backward()
    assert loss.item() == 0.0
    assert all(value == 0.0 for value in metrics.values())
    assert torch.equal(logprobs.grad, torch.zeros(6, 5))


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_gradient_descent_moves_logprob_with_the_advantage_sign(advantage: float) -> None:
    old_logprobs = torch.tensor([[-1.0, -2.0]])
    logprobs = old_logprobs.clone().requires_grad_()
    loss, _ = policy_loss(logprobs, old_logprobs, torch.tensor([advantage]), torch.ones(1, 2))
    loss.backward()
    # On-policy the ratio is 1, so d loss / d logp = -A / number of tokens.
    _close(logprobs.grad, [[-advantage / 2, -advantage / 2]])
    stepped = logprobs.detach() - 0.1 * logprobs.grad
    assert ((stepped - old_logprobs) * advantage > 0).all()


def test_on_policy_step_has_no_clipping_and_no_kl() -> None:
    logprobs, _, _, advantages, mask = _random_batch(seed=1)
    _, metrics = policy_loss(logprobs, logprobs.clone(), advantages, mask)
    assert metrics["clip_fraction_binding"] == 0.0
    assert metrics["approx_kl"] == 0.0


def test_clipped_tokens_get_no_gradient() -> None:
    logprobs, old_logprobs = _hand_case()
    logprobs.requires_grad_()
    loss, _ = policy_loss(logprobs, old_logprobs, ADVANTAGES, torch.ones(2, 2), clip=0.2)
    loss.backward()
    assert logprobs.grad[0, 0] == 0.0 and logprobs.grad[1, 0] == 0.0
    assert logprobs.grad[0, 1] != 0.0 and logprobs.grad[1, 1] != 0.0


def test_advantage_estimators_by_hand() -> None:
    """grpo, dr-grpo and rloo on two groups of three, against values computed by hand."""
    from learner.grpo import ESTIMATORS

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.2])
    first = torch.tensor([0.5, -0.5, 0.0])  # r - mean of [1, 0, 0.5]; its std is 0.5
    torch.testing.assert_close(ESTIMATORS["dr-grpo"](rewards, 3, 1e-6)[:3], first)
    torch.testing.assert_close(ESTIMATORS["grpo"](rewards, 3, 1e-6)[:3], first / (0.5 + 1e-6))
    # rloo: 1 - mean(0, 0.5) = 0.75, 0 - mean(1, 0.5) = -0.75, 0.5 - mean(1, 0) = 0
    torch.testing.assert_close(ESTIMATORS["rloo"](rewards, 3, 1e-6)[:3], torch.tensor([0.75, -0.75, 0.0]))
    for name in ESTIMATORS:  # a group whose rewards are all equal teaches nothing
        assert ESTIMATORS[name](rewards, 3, 1e-6)[3:].abs().max() < 1e-6, name


def test_with_advantages_adds_the_column_group_by_group() -> None:
    import pyarrow as pa

    from learner.grpo import with_advantages

    groups = [pa.RecordBatch.from_pydict({"reward": [1.0, 0.0]}), pa.RecordBatch.from_pydict({"reward": [3.0, 3.0]})]
    table = with_advantages(groups, "dr-grpo")
    assert table.column("advantage").to_pylist() == [0.5, -0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        with_advantages(groups, "ppo")
    with pytest.raises(ValueError, match="equal size"):
        with_advantages([groups[0], pa.RecordBatch.from_pydict({"reward": [1.0]})])


# --- how micro-batches combine --------------------------------------------------------------------------------


def test_micro_batches_combine_as_the_reference_dp_actor() -> None:
    """The reference (ReCall, branch re-search, src/verl/workers/actor/dp_actor.py:257-276, use_dynamic_bsz as its
    scripts/train/train.sh:88 sets) takes each micro-batch's masked token mean and scales it by
    len(micro) / ppo_mini_batch_size: a micro-batch of one short response weighs as much per trajectory as one of a
    long response. `micro_batch_weight: tokens` is the exact token mean of the whole mini-batch instead."""
    from learner.grpo import micro_batch_share

    # 3 trajectories, micro-batches [row 0] and [rows 1, 2]; per-token losses 1 (1 token), 2 (3 tokens), 4 (2 tokens).
    loss = torch.tensor([[1.0, 0, 0], [2.0, 2, 2], [4.0, 4, 0]])
    mask = torch.tensor([[1.0, 0, 0], [1.0, 1, 1], [1.0, 1, 0]])
    real = torch.ones(3)
    micro = [(0, 1), (1, 3)]

    def combined(weight: str) -> float:
        return sum(
            float(aggregate(loss[a:b], mask[a:b], "token-mean"))
            * micro_batch_share("token-mean", weight, mask[a:b], real[a:b], mask, real)
            for a, b in micro
        )

    reference = 1 / 3 * 1.0 + 2 / 3 * (2 * 3 + 4 * 2) / 5  # token means 1.0 and 2.8, weighted 1/3 and 2/3
    assert combined("sequences") == pytest.approx(reference)
    assert combined("tokens") == pytest.approx(float(aggregate(loss, mask, "token-mean")))  # (1 + 6 + 8) / 6
    assert combined("sequences") != pytest.approx(combined("tokens"))
    # A padding row (real 0) is no trajectory: it weighs nothing, so padding leaves the reference's loss unchanged.
    padded_real = torch.tensor([1.0, 1, 1, 0])
    padded_mask = torch.cat([mask, torch.zeros(1, 3)])
    assert micro_batch_share("token-mean", "sequences", padded_mask[3:], padded_real[3:], padded_mask,
                             padded_real) == 0.0
    assert micro_batch_share("token-mean", "sequences", padded_mask[2:], padded_real[2:], padded_mask,
                             padded_real) == pytest.approx(1 / 3)
    # Sequence-level aggregations count rows (padding included, adding 0) over trajectories under either weight.
    for weight in ("sequences", "tokens"):
        assert micro_batch_share("seq-mean-token-mean", weight, padded_mask[2:], padded_real[2:], padded_mask,
                                 padded_real) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="'rows'"):
        micro_batch_share("token-mean", "rows", mask, real, mask, real)
