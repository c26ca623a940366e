"""A scripted policy: Qwen2 weights whose next token depends only on the current token, by a given Markov chain.

A random tiny policy never writes `<search>`; tests and benches of the rollout need one that does, with the exact
architecture of the tiny test policy (so its weights travel through the same weight sync). The construction, for
hidden size d (two halves A and B) and chain states s = 0..K-1 (K < d/2):

- embedding of state token x: a*e_s (half A, "which state") + e_{d/2+s} (half B, "which output code");
  every other token embeds to 0;
- attention outputs are zeroed (o_proj = 0), so a position sees only its own token;
- layer 0's MLP maps the one-hot state e_s to T_s - e_{d/2+s}: gate/up rows pick dimension s, down's column s
  holds the target; the residual then holds a*e_s + T_s, later layers pass it through;
- the final norm keeps half B only and the embedding is tied, so logit_j = g * T_s[code of j] / rms: T_s holds the
  wanted logits of the successors of s (margin + log p), padded on one unused dimension to a common norm so the
  RMS norm scales every state alike.
Transitions with probability 1 win by `margin` nats (greedy and temperature-1 sampling follow them); branches
sample with the given probabilities. vLLM and transformers compute the same logits from these weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class TokenChain:
    """Transitions token -> {successor: probability}, built from scripted token paths and explicit branches."""

    def __init__(self) -> None:
        self.transitions: dict[int, dict[int, float]] = {}

    def path(self, token_ids: Sequence[int]) -> TokenChain:
        """Each token of the path is followed by the next one, always; a token with another successor is an error."""
        for current, following in zip(token_ids, token_ids[1:], strict=False):
            self.branch(current, {following: 1.0})
        return self

    def branch(self, token_id: int, successors: dict[int, float]) -> TokenChain:
        """`token_id` is followed by each successor with its probability (they must sum to 1)."""
        if abs(sum(successors.values()) - 1.0) > 1e-6:
            raise ValueError(f"successor probabilities of token {token_id} sum to {sum(successors.values())}")
        known = self.transitions.get(token_id)
        if known is not None and known != successors:
            raise ValueError(f"token {token_id} already has successors {known}, not {successors}")
        self.transitions[token_id] = dict(successors)
        return self

    def states(self) -> list[int]:
        """Every token the chain mentions, in first-mention order."""
        seen: dict[int, None] = {}
        for token, successors in self.transitions.items():
            seen.setdefault(token)
            for successor in successors:
                seen.setdefault(successor)
        return list(seen)

    def greedy_path(self, start: int, limit: int = 1000) -> list[int]:
        """Tokens greedy decoding emits after `start` (most probable successor each step, until a dead end)."""
        out: list[int] = []
        token = start
        while token in self.transitions and len(out) < limit:
            token = max(self.transitions[token].items(), key=lambda item: item[1])[0]
            out.append(token)
        return out


def text_path(tokenizer: Any, *texts: str) -> list[int]:
    """Token ids of consecutive text pieces, each tokenised alone (tags stay single tokens)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return ids


@torch.no_grad()
def apply_chain(model: Any, chain: TokenChain, margin: float = 30.0, state_scale: float = 1.0) -> Any:
    """Overwrite a Qwen2ForCausalLM's weights (tied embeddings, >= 1 layer) so it follows `chain`; returns it."""
    config = model.config
    d = config.hidden_size
    half = d // 2
    states = chain.states()
    if len(states) >= half:
        raise ValueError(f"a chain of {len(states)} tokens needs hidden size > {2 * len(states)}, model has {d}")
    if not config.tie_word_embeddings or config.intermediate_size < len(states):
        raise ValueError("apply_chain needs tied embeddings and intermediate_size >= number of chain tokens")
    index = {token: s for s, token in enumerate(states)}
    pad = d - 1  # a half-B dimension no token reads: it evens out the norm of every state's residual
    dtype = torch.float64

    embed = torch.zeros(config.vocab_size, d, dtype=dtype)
    for token, s in index.items():
        embed[token, s] = state_scale
        embed[token, half + s] = 1.0
    logits = torch.zeros(len(states), d, dtype=dtype)
    for token, successors in chain.transitions.items():
        for successor, probability in successors.items():
            logits[index[token], half + index[successor]] = margin + math.log(probability)
    eps = config.rms_norm_eps
    # Residual after layer 0 is state_scale*e_s + T_s, |T_s| = radius for every state, so one RMS for all.
    radius = 1.0
    rms = math.sqrt((state_scale**2 + radius**2) / d + eps)
    gain = float(logits.norm(dim=1).max()) * rms / (0.99 * radius) if len(states) else 1.0
    targets = logits * rms / gain
    targets[:, pad] = (radius**2 - targets.pow(2).sum(dim=1)).clamp_min(0).sqrt()

    # Layer 0 MLP input: RMS-normed residual (state_scale*e_s + e_{half+s}) with the B half zeroed by the norm gain.
    rms_in = math.sqrt((state_scale**2 + 1.0) / d + eps)
    c = state_scale / rms_in
    sharp = 2.0
    v = (sharp * c) * torch.sigmoid(torch.tensor(sharp * c, dtype=dtype)).item() * c  # silu(gate) * up
    gate = torch.zeros(config.intermediate_size, d, dtype=dtype)
    up = torch.zeros(config.intermediate_size, d, dtype=dtype)
    down = torch.zeros(d, config.intermediate_size, dtype=dtype)
    for s in range(len(states)):
        gate[s, s] = sharp
        up[s, s] = 1.0
        column = targets[s].clone()
        column[half + s] -= 1.0
        down[:, s] = column / v

    for parameter in model.parameters():
        parameter.zero_()
    inner = model.model
    inner.embed_tokens.weight.copy_(embed)
    for number, layer in enumerate(inner.layers):
        layer.input_layernorm.weight.fill_(1.0)
        if number == 0:
            layer.post_attention_layernorm.weight.copy_(torch.cat([torch.ones(half), torch.zeros(d - half)]))
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(down)
        else:
            layer.post_attention_layernorm.weight.fill_(1.0)
    inner.norm.weight.copy_(torch.cat([torch.zeros(half), torch.full((d - half,), gain)]))
    return model


def scripted_policy(base_dir: str | Path, chain: TokenChain, margin: float = 30.0) -> Any:
    """The policy at `base_dir` (e.g. cluster.models.tiny_policy_dir()) with its weights set to follow `chain`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return apply_chain(model, chain, margin).eval()
