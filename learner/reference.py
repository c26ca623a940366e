"""The frozen reference policy of the KL term: the initial weights, never updated, built only when kl_coef > 0."""

from __future__ import annotations

import torch

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.distributed import deepspeed_config, load_model
from learner.logprobs import token_logprobs


class ReferencePolicy:
    """A frozen copy of the policy; under ZeRO-3 it is partitioned across ranks like the policy itself."""

    def __init__(self, config: LearnerConfig, model_path: str, device: torch.device) -> None:
        model = load_model(config, model_path, trainable=False)
        model.requires_grad_(False)
        if config.zero_stage == 3:
            import deepspeed

            # An optimizer-less engine holds 1/world of the weights per rank and gathers layer by layer.
            model, _, _, _ = deepspeed.initialize(model=model, config=deepspeed_config(config, trainable=False))
        else:
            model.to(device)
        model.eval()
        self.model = model
        self.temperature = config.grpo.logit_temperature
        self.chunk_tokens = config.logprob_chunk_tokens

    @torch.no_grad()
    def logprobs(self, micro: TrainBatch) -> torch.Tensor:
        """Reference next-token logprobs of one micro-batch, (B, T-1) in fp32, 0 on padding."""
        logprobs, _ = token_logprobs(self.model, micro.input_ids, micro.attention_mask, temperature=self.temperature,
                                     chunk_tokens=self.chunk_tokens)
        return logprobs
