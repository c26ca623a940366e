"""Parity of learner.grpo with a peer implementation: TRL 1.16.0 (`trl==1.16.0`, the dev extra installs it).

The peer's own code computes the loss: `trl.trainer.grpo_trainer.GRPOTrainer._compute_loss` is called on a
stand-in that carries only the attributes that method reads (one process, no vLLM, no entropy bonus) and hands
back our random log-probabilities instead of running a model. Equivalent settings:

    ours                                    TRL GRPOConfig
    agg="token-mean"                        loss_type="bnpo"
    agg="seq-mean-token-mean"               loss_type="grpo"
    agg="seq-mean-token-sum-norm", L        loss_type="dr_grpo", max_completion_length=L
    clip, clip_high                         epsilon, epsilon_high
    kl_coef, kl_estimator="k3"              beta (TRL's KL is always k3, unclamped; verl calls it "low_var_kl")
    group_advantages(eps=1e-4)              scale_rewards="group" (TRL adds a fixed 1e-4 to the std)
    group_advantages(scale_by_std=False)    scale_rewards="none"
    metrics clip_fraction_binding, ref_kl, entropy  clip_ratio/region_mean, kl, entropy

TRL computes group advantages inline in `_generate_and_score_completions`, which cannot run without generation;
the advantage check uses TRL's `nanstd` (its Bessel-corrected group std) with the composition written there.
verl 0.9.1 was the first choice but pins transformers<5.11, which this project cannot take.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from learner.grpo import group_advantages, policy_loss

# TRL 1.16 warns on import that it was tested up to vLLM 0.31; its loss code does not touch vLLM.
pytestmark = pytest.mark.filterwarnings("ignore:TRL currently supports vLLM:UserWarning")

GROUP_SIZE = 4
NUM_GROUPS = 5
LENGTH = 9
AGG_TO_TRL_LOSS_TYPE = {
    "token-mean": "bnpo",
    "seq-mean-token-mean": "grpo",
    "seq-mean-token-sum-norm": "dr_grpo",
}


@pytest.fixture(scope="module")
def trl_grpo() -> SimpleNamespace:
    """The peer's GRPOTrainer and nanstd; a missing peer is a failure, since the dev extra installs it."""
    try:
        import trl
        from trl.trainer.grpo_trainer import GRPOTrainer
        from trl.trainer.utils import nanstd
    except ImportError as error:
        pytest.fail(
            f"the GRPO parity peer is missing ({error}); install it with: pip install 'trl==1.16.0'",
            pytrace=False,
        )
    if trl.__version__ != "1.16.0":
        pytest.fail(f"parity was established against trl 1.16.0, found {trl.__version__}", pytrace=False)
    return SimpleNamespace(GRPOTrainer=GRPOTrainer, nanstd=nanstd)


def _random_batch(seed: int) -> dict[str, torch.Tensor]:
    """Rewards group by group (one group all equal), log-probs off-policy enough to clip, two empty rows."""
    generator = torch.Generator().manual_seed(seed)
    batch = NUM_GROUPS * GROUP_SIZE
    rewards = torch.rand(batch, generator=generator, dtype=torch.float64)
    rewards[GROUP_SIZE : 2 * GROUP_SIZE] = 0.1
    logprobs = -4 * torch.rand(batch, LENGTH, generator=generator, dtype=torch.float64)
    old_logprobs = logprobs + 0.25 * torch.randn(batch, LENGTH, generator=generator, dtype=torch.float64)
    ref_logprobs = logprobs + 0.5 * torch.randn(batch, LENGTH, generator=generator, dtype=torch.float64)
    entropy = 3 * torch.rand(batch, LENGTH, generator=generator, dtype=torch.float64)
    mask = (torch.rand(batch, LENGTH, generator=generator) > 0.3).float()
    mask[:, 0] = 1.0
    mask[3] = 0.0
    mask[11] = 0.0
    return {
        "rewards": rewards,
        "logprobs": logprobs,
        "old_logprobs": old_logprobs,
        "ref_logprobs": ref_logprobs,
        "entropy": entropy,
        "mask": mask,
    }


def _trl_loss(
    trl_grpo: SimpleNamespace,
    batch: dict[str, torch.Tensor],
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_type: str,
    epsilon: float,
    epsilon_high: float,
    beta: float,
    max_completion_length: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Run TRL's own `_compute_loss` on our tensors and return its loss and its logged metrics."""
    size = logprobs.shape[0]
    trainer = SimpleNamespace(
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        max_completion_length=max_completion_length,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            num_processes=1, reduce=lambda tensor, reduction: tensor, gather=lambda t: t
        ),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, batch["entropy"], None),
    )
    inputs = {
        "prompt_ids": torch.zeros(size, 1, dtype=torch.long),
        "prompt_mask": torch.ones(size, 1, dtype=torch.long),
        "completion_ids": torch.zeros(size, LENGTH, dtype=torch.long),
        "completion_mask": batch["mask"],
        "advantages": advantages,
        "old_per_token_logps": batch["old_logprobs"],
        "ref_per_token_logps": batch["ref_logprobs"],
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss, logged


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_trl(trl_grpo: SimpleNamespace, seed: int, scale_by_std: bool) -> None:
    rewards = _random_batch(seed)["rewards"]
    grouped = rewards.view(-1, GROUP_SIZE)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(GROUP_SIZE)
    std = trl_grpo.nanstd(grouped, dim=1).repeat_interleave(GROUP_SIZE)
    expected = rewards - mean
    if scale_by_std:
        expected = expected / (std + 1e-4)
    ours = group_advantages(rewards, GROUP_SIZE, eps=1e-4, scale_by_std=scale_by_std)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert torch.equal(ours[GROUP_SIZE : 2 * GROUP_SIZE], torch.zeros(GROUP_SIZE, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agg", list(AGG_TO_TRL_LOSS_TYPE))
@pytest.mark.parametrize(("clip", "clip_high"), [(0.2, None), (0.2, 0.28)])
@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_policy_loss_matches_trl(
    trl_grpo: SimpleNamespace, seed: int, agg: str, clip: float, clip_high: float | None, kl_coef: float
) -> None:
    batch = _random_batch(seed)
    advantages = group_advantages(batch["rewards"], GROUP_SIZE, eps=1e-4)
    max_length = LENGTH + 3  # a constant longer than the batch, as Dr. GRPO's MAX_TOKENS is

    ours_logprobs = batch["logprobs"].clone().requires_grad_()
    ours, metrics = policy_loss(
        ours_logprobs,
        batch["old_logprobs"],
        advantages,
        batch["mask"],
        clip=clip,
        agg=agg,
        ref_logprobs=batch["ref_logprobs"],
        kl_coef=kl_coef,
        clip_high=clip_high,
        kl_estimator="k3",
        entropy=batch["entropy"],
        max_length=max_length,
    )
    ours.backward()

    peer_logprobs = batch["logprobs"].clone().requires_grad_()
    peer, logged = _trl_loss(
        trl_grpo,
        batch,
        peer_logprobs,
        advantages,
        loss_type=AGG_TO_TRL_LOSS_TYPE[agg],
        epsilon=clip,
        epsilon_high=clip if clip_high is None else clip_high,
        beta=kl_coef,
        max_completion_length=max_length,
    )
    peer.backward()

    torch.testing.assert_close(ours, peer, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_logprobs.grad, peer_logprobs.grad, atol=1e-6, rtol=0)
    assert 0.0 < metrics["clip_fraction_binding"] < 1.0
    assert metrics["clip_fraction_binding"] == pytest.approx(logged["clip_ratio/region_mean"], abs=1e-6)
    assert metrics["entropy"] == pytest.approx(logged["entropy"], abs=1e-6)
    if kl_coef > 0:
        assert metrics["ref_kl"] == pytest.approx(logged["kl"], abs=1e-6)
