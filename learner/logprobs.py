"""Next-token log-probabilities (and entropy) of a batch under a causal LM, at a sampling temperature.

Row layout is learner.batch's: column p of the (B, T-1) result scores token p + 1. Padding positions get exactly 0,
so results do not depend on how much padding a micro-batch carried.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from learner.batch import TrainBatch


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    with_entropy: bool = False,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each next token at `temperature`, (B, T-1) in fp32, and optionally the entropy at each position
    (with its gradient when `entropy_grad`: an entropy bonus)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    if temperature != 1.0:
        logits.div_(temperature)  # in place: a second (B, T, vocab) fp32 copy is GBs at a 151k vocabulary
    logsumexp = torch.logsumexp(logits, dim=-1)
    targets = input_ids[:, 1:].unsqueeze(-1)
    logprobs = torch.gather(logits, -1, targets).squeeze(-1) - logsumexp
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    valid = attention_mask[:, 1:].bool()
    return torch.where(valid, logprobs, 0.0), entropy


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    micro_batch_size: int,
    device: torch.device,
    temperature: float = 1.0,
    rows: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Next-token logprobs of a batch, (B, T-1), micro-batch by micro-batch; 0 on padding and on rows not asked for.

    `rows` lists [start, stop) ranges to compute (default: the whole batch).
    """
    out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
    for first, last in rows if rows is not None else [(0, batch.size)]:
        for start in range(first, last, micro_batch_size):
            micro = batch.rows(start, min(start + micro_batch_size, last)).to(device)
            logprobs, _ = token_logprobs(model, micro.input_ids, micro.attention_mask, temperature=temperature)
            out[start : start + micro.size, : logprobs.shape[1]] = logprobs.float().cpu()
    return out
