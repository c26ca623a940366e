"""The frozen reference policy of the KL term: the initial weights, never updated, built only when kl_coef > 0."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.engine import partitioned_loading, resolve_dtype
from learner.logprobs import token_logprobs


class ReferencePolicy:
    """A frozen copy of the policy; under ZeRO-3 it is partitioned across ranks like the policy itself."""

    def __init__(self, config: LearnerConfig, model_path: str, device: torch.device) -> None:
        # Under ZeRO-3 an optimizer-less engine holds 1/world of the weights per rank and gathers layer by layer.
        stage = {"stage": config.zero_stage}
        ds = {"train_micro_batch_size_per_gpu": config.micro_batch_size, "zero_optimization": stage}
        if resolve_dtype(config) == torch.bfloat16:
            ds["bf16"] = {"enabled": True}
        with partitioned_loading(ds):
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(config))
        model.config.use_cache = False
        model.requires_grad_(False)
        model.eval()
        if config.zero_stage == 3:
            import deepspeed

            model, _, _, _ = deepspeed.initialize(model=model, config=ds)
            model.eval()
        else:
            model.to(device)
        self.model = model
        self.temperature = config.grpo.logit_temperature
        self.chunk_tokens = config.logprob_chunk_tokens

    @torch.no_grad()
    def logprobs(self, micro: TrainBatch) -> torch.Tensor:
        """Reference next-token logprobs of one micro-batch, (B, T-1) in fp32, 0 on padding."""
        logprobs, _ = token_logprobs(
            self.model, micro.input_ids, micro.attention_mask, temperature=self.temperature, chunk_tokens=self.chunk_tokens
        )
        return logprobs
