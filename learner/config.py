"""Configuration of the learner: the GRPO objective and the DeepSpeed engine that optimises it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def plain_sampling(temperature: float, top_p: float, top_k: int) -> bool:
    """Whether tokens are sampled from the untouched distribution (temperature 1, no top-p/top-k): the only case in
    which vLLM's returned logprobs are the sampler's own (it returns raw, untempered, unfiltered logprobs)."""
    return temperature == 1.0 and top_p == 1.0 and top_k <= 0


class GRPOConfig(BaseModel):
    """The GRPO objective (the paper: clip 0.2, k3 KL to the reference with coefficient 0.001, token mean)."""

    model_config = ConfigDict(extra="forbid")

    clip: float = Field(0.2, gt=0.0, description="Lower clip of the importance ratio (1 - clip).")
    clip_high: float | None = Field(None, gt=0.0, description="Upper clip (1 + clip_high); None = same as clip.")
    kl_coef: float = Field(0.001, ge=0.0, description="Weight of the KL-to-reference loss term; 0 skips the reference.")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="KL estimator: k1 or the low-variance k3.")
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="Loss aggregation over tokens and sequences."
    )
    micro_batch_weight: Literal["sequences", "tokens"] = Field(
        "sequences", description="How token-mean combines micro-batches (learner.grpo.micro_batch_share): "
        "'sequences' = the reference's (verl's dp_actor): each micro-batch's own token mean, weighted by its share of "
        "the mini-batch's trajectories, so the update depends on micro_batch_size and world_size; 'tokens' = the "
        "exact token mean of the whole mini-batch, the same for any micro-batch size and world size. The "
        "sequence-level aggregations are exact under both.",
    )
    advantage: Literal["grpo", "dr-grpo", "rloo"] = Field(
        "grpo", description="Advantage estimator (learner/grpo.py): grpo = (r - mean) / (std + eps), dr-grpo = "
        "r - mean, rloo = r - mean of the other samples.",
    )
    eps: float = Field(1e-6, gt=0.0, description="Added to the group std before dividing.")
    temperature: float | None = Field(
        None, gt=0.0, description="Logits are divided by it before every log-softmax (policy, old, reference); "
        "None = the rollout's sampling temperature in a job (1.0 when sampling is greedy), 1.0 alone.",
    )
    entropy_coef: float = Field(
        0.001, ge=0.0, description="Weight of the entropy bonus (loss -= entropy_coef * entropy); 0.001 is the "
        "reference's (verl's actor.entropy_coeff, which its train script does not override).",
    )
    decoupled: bool | None = Field(
        None, description="The decoupled objective for stale data (AReaL): clip against the recomputed proximal "
        "logprobs and weight each token by pi_prox / pi_behaviour. None = on exactly when a job generates ahead "
        "(trainer.max_staleness > 0) and recomputes old logprobs.",
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling: a group whose rewards are all equal (every advantage 0) is "
        "dropped and its prompt counted as used; fresh prompts replace it. Off in the paper presets (the reference "
        "trains on every group).",
    )
    dynamic_sampling_metric: Literal["reward", "f1"] = Field(
        "reward", description="With dynamic_sampling, what must vary within a group for it to be kept: 'reward', or "
        "'f1' (the answers' F1, as DAPO filters on accuracy: verl's filter_groups.metric 'acc'), which also drops "
        "groups of all-wrong answers whose rewards differ only by format (0 invalid vs 0.1 valid): after the "
        "division by the group's std those teach format as strongly as a right answer teaches answering.",
    )
    dynamic_sampling_max_draws: int = Field(
        3, ge=1, description="With dynamic_sampling, a step drops at most (max_draws - 1) x batch_size groups; past "
        "that, zero-variance groups are trained on, so a step always completes.",
    )
    old_logprobs: Literal["auto", "behaviour", "recompute"] = Field(
        "auto", description="Denominator of the importance ratio: the sampler's logprobs ('behaviour'), or the "
        "learner's own before the update ('recompute', as verl does: one more forward). auto = behaviour when "
        "sampling is plain (temperature 1, no top-p/top-k), whose logprobs vLLM returns exactly, else recompute.",
    )

    @property
    def logit_temperature(self) -> float:
        """The temperature the learner applies (1.0 when unset)."""
        return self.temperature or 1.0

    @property
    def recompute_old_logprobs(self) -> bool:
        """Whether the ratio's denominator comes from the learner rather than the sampler (an unresolved 'auto'
        assumes no top-p/top-k: a job resolves it with its sampling, see `resolved`)."""
        return self.resolved(self.logit_temperature, 1.0, -1).old_logprobs == "recompute"

    def resolved(self, sampling_temperature: float, top_p: float, top_k: int, max_staleness: int = 0) -> GRPOConfig:
        """A copy for a run that samples this way: temperature unset -> the sampling temperature (1.0 when greedy),
        old_logprobs auto -> behaviour only when vLLM's raw logprobs are the sampler's (T = 1, no top-p/top-k),
        decoupled unset -> on when stale data (max_staleness > 0) meets recomputed old logprobs."""
        temperature = self.temperature
        if temperature is None:
            temperature = sampling_temperature if sampling_temperature > 0 else 1.0
        old_logprobs = self.old_logprobs
        if old_logprobs == "auto":
            old_logprobs = "behaviour" if plain_sampling(temperature, top_p, top_k) else "recompute"
        decoupled = self.decoupled
        if decoupled is None:
            decoupled = max_staleness > 0 and old_logprobs == "recompute"
        return self.model_copy(update={"temperature": temperature, "old_logprobs": old_logprobs,
                                       "decoupled": decoupled})


class LearnerConfig(BaseModel):
    """The DeepSpeed learner group: ranks, ZeRO stage, optimiser, schedule, micro-batching, weight sync."""

    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(1, ge=1, description="Learner ranks (one Ray actor each).")
    gpus_per_rank: float = Field(0.0, ge=0.0, description="GPUs per learner rank (1 on GPU clusters).")
    cpus_per_rank: float = Field(1.0, ge=0.0, description="CPUs reserved per learner rank.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each learner rank requests (in its placement-group "
        "bundle), e.g. {learner_node: 1}: puts the ranks on the nodes that advertise them.",
    )
    setup_timeout_s: float = Field(
        1800.0, gt=0.0, description="How long the driver waits for the ranks to be placed, join the process group "
        "and build policy and reference (model download and zero.Init included).",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    lr: float = Field(1e-6, gt=0.0, description="Peak learning rate of AdamW.")
    lr_schedule: Literal["constant", "warmup"] = Field("constant", description="Constant, or linear warm-up then constant.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warm-up.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="AdamW weight decay; 0.01 is the reference's (verl's AdamW default, not overridden)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward per rank.")
    ppo_epochs: int = Field(1, ge=1, description="Optimizer passes over each batch of trajectories.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per batch (1 = one step per batch).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    logprob_chunk_tokens: int = Field(
        1024, ge=0, description="Tokens per chunk of the LM head when computing logprobs and entropy (learner.logprobs): "
        "never more than this many tokens' logits exist at once, recomputed in backward; 0 = whole logits at once.",
    )
    autocast: Literal["off", "bf16"] = Field(
        "off", description="bf16 autocast of the learner's forward/backward (weights, gradients and AdamW stay in "
        "`dtype`); on CPUs with AVX-512 bf16 the matrix products run ~2x faster (bench/learner_step.py).",
    )
    weight_sync_bucket_mb: int = Field(256, ge=1, description="Flat bucket size of the weight broadcast, MiB.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="The GRPO objective.")
