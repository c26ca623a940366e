"""GRPO math: advantage estimators, the clipped surrogate, KL to the reference, loss aggregation.

The driver picks an advantage estimator by name (`learner.grpo.advantage`, ESTIMATORS below) and writes the
`advantage` column the learner trains on (with_advantages), so the learner never sees groups and another estimator
(RLOO, Dr. GRPO's) is one small function here, not a learner change.

Everything here works on plain tensors laid out (B, T): B sequences (group by group, `group_size` samples of
one prompt next to each other), T response tokens. The learner computes `logprobs` with the current policy,
brings `old_logprobs` (the behaviour policy that sampled the tokens) and `ref_logprobs` (the frozen reference),
and `mask` says which tokens get gradient (1 on generated tokens, 0 on padding and on retrieved passages).
Nothing here knows about search, tags or prompts.

Conventions follow TRL 1.16 `GRPOTrainer` (the parity peer of tests/unit/test_grpo_parity.py):
- the group std is the unbiased (Bessel-corrected) one, as in TRL's `nanstd` and verl's `torch.std`;
- the ratio is not clamped (TRL does not; verl's dual clip is left out), but the k3 KL estimate is clamped to
  [-10, 10] as the ReSearch reference (verl) does;
- a sequence whose mask is all zero contributes zero loss but still counts in the number of sequences, so the
  per-sequence modes divide by the constant batch size (TRL; verl 0.9.1 instead leaves such rows out).
- the entropy bonus is the reference's: loss -= entropy_coef * aggregated entropy (verl's entropy_coeff, 0.001).
Left out on purpose: dual-clip PPO (verl's clip_ratio_c) and sequence-level ratios (GSPO); the paper uses neither.

Off-policy data (max_staleness > 0) with recomputed old logprobs uses the decoupled objective (AReaL): the clipped
ratio is taken against the recomputed *proximal* logprobs, and each token's loss is weighted by the behaviour
importance weight pi_prox / pi_behaviour (no gradient), which corrects for the stale sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import torch

from learner.config import GRPOConfig

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
MICRO_BATCH_WEIGHTS = ("sequences", "tokens")
KL_ESTIMATORS = ("k1", "k3")
K3_CLAMP = 10.0
"""verl (and so the ReSearch reference) clamps the k3 estimate to [-K3_CLAMP, K3_CLAMP] per token."""


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """Per-sequence advantage (r - mean_group) / (std_group + eps); `scale_by_std=False` gives Dr. GRPO's r - mean."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one scalar per sequence), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    advantages = grouped - mean
    if scale_by_std:
        # A group of one has no spread to measure: its advantage is 0 either way (TRL does the same).
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        advantages = advantages / (std + eps)
    return advantages.view(-1)


def grpo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """GRPO (the paper): (r - group mean) / (group std + eps)."""
    return group_advantages(rewards, group_size, eps, scale_by_std=True)


def dr_grpo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """Dr. GRPO: r - group mean, no division by the std (pair it with `agg: seq-mean-token-sum-norm`)."""
    return group_advantages(rewards, group_size, eps, scale_by_std=False)


def rloo(rewards: torch.Tensor, group_size: int, eps: float) -> torch.Tensor:
    """RLOO: r minus the mean reward of the other samples of its group (0 for a group of one)."""
    if group_size < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    centred = group_advantages(rewards, group_size, eps, scale_by_std=False)
    return centred * (group_size / (group_size - 1))


ESTIMATORS: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "grpo": grpo, "dr-grpo": dr_grpo, "rloo": rloo,
}


def with_advantages(groups: Sequence[pa.RecordBatch], estimator: str = "grpo", eps: float = 1e-6) -> pa.Table:
    """The groups as one table with an `advantage` column, each group's rows estimated together."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    sizes = {g.num_rows for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"every record batch must hold one group of equal size; sizes {sorted(sizes)}")
    table = pa.Table.from_batches(list(groups))
    rewards = torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32)
    advantages = ESTIMATORS[estimator](rewards, sizes.pop(), eps)
    return table.append_column("advantage", pa.array(advantages.tolist(), type=pa.float32()))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on policy samples: "k1" (logp - ref) or "k3" (low variance)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        # Schulman's k3: unbiased like k1 but never negative, so single tokens cannot push the KL term below 0.
        log_ratio = ref_logprobs - logprobs
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, -K3_CLAMP, K3_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the tokens where `mask` is nonzero; 0 when there are none."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def aggregate(
    loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", max_length: int | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over unmasked tokens, in one of AGGREGATIONS.

    "token-mean": every unmasked token in the batch weighs the same. "seq-mean-token-mean": mean over tokens
    within a sequence, then over the B sequences. "seq-mean-token-sum-norm" (Dr. GRPO): token sums divided by
    the constant `max_length` (default T), then mean over the B sequences. Empty rows contribute 0.
    """
    mask = mask.bool()
    # where, not multiply: a stray inf/NaN on a masked position must not reach the sum (inf * 0 is NaN).
    masked_loss = torch.where(mask, loss_mat, 0.0)
    if agg == "token-mean":
        return masked_loss.sum() / mask.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        token_counts = mask.sum(dim=-1).clamp(min=1)
        return (masked_loss.sum(dim=-1) / token_counts).mean()
    if agg == "seq-mean-token-sum-norm":
        horizon = loss_mat.shape[-1] if max_length is None else max_length
        # A constant normaliser keeps long and short answers from being weighted by their length (Dr. GRPO).
        return masked_loss.sum(dim=-1).mean() / horizon
    raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")


def micro_batch_share(
    agg: str, weight: str, micro_mask: torch.Tensor, micro_real: torch.Tensor, mini_mask: torch.Tensor,
    mini_real: torch.Tensor,
) -> float:
    """The factor a micro-batch's loss (aggregated over the micro-batch alone) is scaled by before its backward, so
    that the micro-batches' sum is the mini-batch's loss; `*_mask` are loss masks, `*_real` the real-row flags.

    token-mean with weight "sequences" (the reference): the micro-batch's token mean weighted by its share of the
    mini-batch's trajectories, as verl's dp_actor with use_dynamic_bsz does (ReCall, branch re-search,
    src/verl/workers/actor/dp_actor.py:257-276: masked means per micro-batch, loss * len(data) / ppo_mini_batch_size,
    then FSDP averages over ranks), so a token weighs more in a micro-batch of short responses and the update
    depends on how rows fall into micro-batches. token-mean with "tokens": its share of the mini-batch's tokens, which
    sums to the exact token mean of the whole mini-batch whatever the micro-batch size and world size. The
    sequence-level aggregations already average over rows (padding rows add 0 but count, as TRL), so their share is
    the micro-batch's rows over the mini-batch's trajectories under either weight. Padding rows (real 0) are not
    trajectories: the reference has none, so they weigh nothing.
    """
    if weight not in MICRO_BATCH_WEIGHTS:
        raise ValueError(f"unknown micro-batch weight {weight!r}; expected one of {MICRO_BATCH_WEIGHTS}")
    trajectories = max(float(mini_real.sum()), 1.0)
    if agg != "token-mean":
        return float(micro_real.numel()) / trajectories
    if weight == "sequences":
        return float(micro_real.sum()) / trajectories
    return float(micro_mask.sum()) / max(float(mini_mask.sum()), 1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "token-mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_high: float | None = None,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    max_length: int | None = None,
    entropy_coef: float = 0.0,
    behaviour_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss: clipped surrogate on the ratio to the old policy (the behaviour policy's logprobs, or the learner's
    recomputed ones), plus kl_coef * KL to the reference, minus entropy_coef * entropy.

    With `behaviour_logprobs` (the decoupled objective), `old_logprobs` are the proximal policy's and every token's
    surrogate is weighted by exp(old - behaviour), without gradient.
    Returns the scalar loss to minimise and float metrics: policy_loss, kl_loss (kl_coef times the aggregated
    KL, 0 when not applied), clip_fraction_binding (tokens whose clipped surrogate was the one used: verl's
    pg_clipfrac), clip_fraction_ratio (tokens with |ratio - 1| > clip: CleanRL's clipfrac), approx_kl (k3 estimate
    of KL(old || current), as CleanRL logs it), and, when their inputs are given, ref_kl (masked token mean of the
    chosen estimator), entropy (masked token mean), entropy_loss and behaviour_weight (its masked mean).
    """
    if not (logprobs.shape == old_logprobs.shape == mask.shape) or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must share one (B, T) shape"
        )
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")
    if entropy_coef > 0 and (entropy is None or not entropy.requires_grad):
        raise ValueError("an entropy bonus needs the entropy with its gradient")
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # one advantage per sequence, shared by all its tokens
    clip_low = clip
    clip_high = clip if clip_high is None else clip_high

    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    surrogate = -advantages * ratio
    clipped_surrogate = -advantages * clipped_ratio
    # The pessimistic (larger) loss of the two: the update gains nothing by moving the ratio past the clip.
    per_token_loss = torch.maximum(surrogate, clipped_surrogate)
    behaviour_weight = None
    if behaviour_logprobs is not None:
        behaviour_weight = torch.exp(old_logprobs - behaviour_logprobs).detach()
        per_token_loss = per_token_loss * behaviour_weight
    pg_loss = aggregate(per_token_loss, mask, agg, max_length)

    loss = pg_loss
    kl_loss = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    ref_kl = None
    if ref_logprobs is not None:
        ref_kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        if kl_coef > 0:
            kl_loss = kl_coef * aggregate(ref_kl, mask, agg, max_length)
            loss = loss + kl_loss
    entropy_loss = None
    if entropy_coef > 0:
        entropy_loss = -entropy_coef * aggregate(entropy, mask, agg, max_length)
        loss = loss + entropy_loss

    with torch.no_grad():
        metrics = {
            "policy_loss": pg_loss.item(),
            "kl_loss": kl_loss.item(),
            "clip_fraction_binding": masked_mean((clipped_surrogate > surrogate).float(), mask).item(),
            "clip_fraction_ratio": masked_mean(((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float(), mask).item(),
            "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask).item(),
        }
        if ref_kl is not None:
            metrics["ref_kl"] = masked_mean(ref_kl, mask).item()
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, mask).item()
        if entropy_loss is not None:
            metrics["entropy_loss"] = entropy_loss.item()
        if behaviour_weight is not None:
            metrics["behaviour_weight"] = masked_mean(behaviour_weight, mask).item()
    return loss, metrics


class GRPOLoss:
    """The GRPO objective built once from its config (OpenRLHF's PolicyLoss pattern): called per micro-batch with
    tensors only, and `share` weighs that micro-batch's loss within its mini-batch."""

    def __init__(self, config: GRPOConfig) -> None:
        self.config = config

    def __call__(
        self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        ref_logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None, max_length: int | None = None,
        behaviour_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`policy_loss` with this config's clip, aggregation, KL, entropy and decoupled settings."""
        c = self.config
        return policy_loss(
            logprobs, old_logprobs, advantages, mask, clip=c.clip, agg=c.agg, ref_logprobs=ref_logprobs,
            kl_coef=c.kl_coef, clip_high=c.clip_high, kl_estimator=c.kl_estimator, entropy=entropy,
            max_length=max_length, entropy_coef=c.entropy_coef,
            # the decoupled objective: old_logprobs are the recomputed proximal ones, corrected to the sampler
            behaviour_logprobs=behaviour_logprobs if c.decoupled else None,
        )

    def share(self, micro_mask: torch.Tensor, micro_real: torch.Tensor, mini_mask: torch.Tensor,
              mini_real: torch.Tensor) -> float:
        """`micro_batch_share` with this config's aggregation and micro-batch weight."""
        return micro_batch_share(self.config.agg, self.config.micro_batch_weight, micro_mask, micro_real, mini_mask,
                                 mini_real)
