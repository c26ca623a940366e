"""Collate trajectories (an Arrow table with an `advantage` column) into padded (B, T) training tensors.

Layout: each row is prompt + response, right-padded to the longest row. Logits at position p predict the token
at p + 1, so every per-token tensor the loss uses (`loss_mask`, `behaviour_logprobs`) has T - 1 columns and
column p refers to token p + 1: response token k of a row with P prompt tokens sits in column P + k - 1.
Prompt columns and padding have loss_mask 0; retrieved tokens keep the 0 the rollout gave them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow as pa
import torch


@dataclass
class TrainBatch:
    """Padded tensors of B trajectories; rows added only to split evenly over ranks have `real` 0 and no loss."""

    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    loss_mask: torch.Tensor  # (B, T-1) float, 1 where the target token gets gradient
    behaviour_logprobs: torch.Tensor  # (B, T-1) float, vLLM's logprob of the target (untempered)
    advantages: torch.Tensor  # (B,) float, one per trajectory
    rewards: torch.Tensor  # (B,) float (metrics only)
    response_lengths: torch.Tensor  # (B,) long, response tokens (generated and retrieved) per row
    real: torch.Tensor  # (B,) float, 1 on trajectories, 0 on padding rows

    @property
    def size(self) -> int:
        """Number of trajectories."""
        return self.input_ids.shape[0]

    @property
    def max_response_length(self) -> int:
        """Longest response in the batch (the constant normaliser of Dr. GRPO's token-sum aggregation)."""
        return max(int(self.response_lengths.max()), 1)

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop), trimmed to their own longest sequence so micro-batches carry no extra padding."""
        attention = self.attention_mask[start:stop]
        length = max(int(attention.sum(dim=1).max()), 2) if stop > start else 2
        return TrainBatch(
            input_ids=self.input_ids[start:stop, :length],
            attention_mask=attention[:, :length],
            loss_mask=self.loss_mask[start:stop, : length - 1],
            behaviour_logprobs=self.behaviour_logprobs[start:stop, : length - 1],
            advantages=self.advantages[start:stop],
            rewards=self.rewards[start:stop],
            response_lengths=self.response_lengths[start:stop],
            real=self.real[start:stop],
        )

    def padded(self, multiple: int) -> TrainBatch:
        """The batch with rows appended until its size divides by `multiple`: each a one-token-prompt row with
        loss_mask 0, advantage 0 and `real` 0, so it changes neither the loss nor any gradient."""
        extra = -self.size % multiple
        if not extra:
            return self
        width = self.input_ids.shape[1]
        pad = {f.name: getattr(self, f.name) for f in fields(self)}
        pad["input_ids"] = torch.cat([self.input_ids, self.input_ids.new_zeros(extra, width)])
        attention = self.attention_mask.new_zeros(extra, width)
        attention[:, :2] = 1  # two tokens, so the row has one (masked) target like any other
        pad["attention_mask"] = torch.cat([self.attention_mask, attention])
        for name in ("loss_mask", "behaviour_logprobs"):
            pad[name] = torch.cat([pad[name], pad[name].new_zeros(extra, width - 1)])
        for name in ("advantages", "rewards", "response_lengths", "real"):
            pad[name] = torch.cat([pad[name], pad[name].new_zeros(extra)])
        return TrainBatch(**pad)

    def dealt(self, ranks: int, mini_size: int) -> TrainBatch:
        """The rows of each mini-batch dealt round-robin over `ranks` (rank r's contiguous share holds rows r,
        r + ranks, ...), so after a length sort every rank gets short and long rows alike, not the last rank all
        the longest ones and the padding. Each mini-batch keeps its rows, so the update is unchanged."""
        if ranks == 1:
            return self
        index = torch.as_tensor(deal_order(self.size, ranks, mini_size), dtype=torch.long)
        return TrainBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return TrainBatch(**moved)


def collate(table: pa.Table, pad_token_id: int, scoring_only: bool = False) -> TrainBatch:
    """Pad prompt+response rows of trajectories (actors.trajectory columns plus `advantage`) into a TrainBatch;
    `scoring_only` batches (logprobs, no update) need no `advantage` column."""
    if isinstance(table, list | tuple):
        table = pa.Table.from_batches(list(table))
    if table.num_rows == 0:
        raise ValueError("no trajectories to collate")
    if "advantage" not in table.column_names and not scoring_only:
        raise ValueError("trajectories need an `advantage` column (learner.grpo.with_advantages adds one)")
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    masks = table.column("loss_mask").to_pylist()
    behaviour = table.column("behaviour_logprobs").to_pylist()
    advantages = (torch.tensor(table.column("advantage").to_pylist(), dtype=torch.float32)
                  if "advantage" in table.column_names else torch.zeros(table.num_rows))
    rewards = torch.tensor(table.column("reward").to_pylist(), dtype=torch.float32)

    rows = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(max(lengths), 2)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width - 1), dtype=torch.float32)
    behaviour_logprobs = torch.zeros((rows, width - 1), dtype=torch.float32)
    for i, (prompt, response, mask, logprobs) in enumerate(zip(prompts, responses, masks, behaviour, strict=True)):
        if not prompt:
            raise ValueError(f"row {i} has an empty prompt: the first response token has nothing to condition on")
        if not (len(response) == len(mask) == len(logprobs)):
            raise ValueError(
                f"row {i}: response_ids ({len(response)}), loss_mask ({len(mask)}) and behaviour_logprobs "
                f"({len(logprobs)}) must have one entry per response token"
            )
        input_ids[i, : lengths[i]] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, : lengths[i]] = 1
        start = len(prompt) - 1  # column predicting the first response token
        loss_mask[i, start : start + len(response)] = torch.tensor(mask, dtype=torch.float32)
        behaviour_logprobs[i, start : start + len(response)] = torch.tensor(logprobs, dtype=torch.float32)
    response_lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    return TrainBatch(input_ids, attention_mask, loss_mask, behaviour_logprobs, advantages, rewards, response_lengths,
                      torch.ones(rows))


def deal_order(size: int, ranks: int, mini_size: int) -> list[int]:
    """Row order that deals each mini-batch of `mini_size` rows round-robin over `ranks` contiguous shares."""
    if size % mini_size or mini_size % ranks:
        raise ValueError(f"{size} rows do not split into mini-batches of {mini_size} over {ranks} ranks")
    return [start + rank + k * ranks for start in range(0, size, mini_size) for rank in range(ranks)
            for k in range(mini_size // ranks)]
