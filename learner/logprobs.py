"""Next-token logprobs (and entropy) of a causal LM without materialising [batch, tokens, vocab] logits.

The full computation keeps bf16 logits for every position, an fp32 copy, logsumexp and softmax temporaries and,
in backward, as many gradients of the same size: 10.6 GB per fp32 copy for Qwen2.5-7B at 2 x 8,704 tokens. The
chunked computation runs the model as usual except that its LM head, for the duration of the call, maps the final
hidden states to logprobs `chunk_tokens` tokens at a time (`ChunkedHeadLogprobs`): forward keeps one logsumexp
per token, and backward recomputes each chunk's logits and forms the gradient in place, so no more than one chunk
of logits ever exists. Padding positions are left out of the matrix products altogether.

Why a custom autograd.Function and not torch.utils.checkpoint per chunk (`python -m bench.logprob_memory
--compare-checkpoint`, 7B head, 4,096 tokens: checkpoint 1.10x the CPU time and 4.55 vs 0.73 GB of working
memory): the Function's backward builds d(logprob)/d(logits) in place in the recomputed logits and sums the weight
gradient of all chunks into one fp32 buffer with addmm_, while per-chunk checkpointing replays the forward graph
and lets autograd add a separate vocab x hidden weight gradient per chunk (another 2.2 GB at 7B in fp32), with more
full-chunk temporaries along the way. Either way backward recomputes the logits: 4 vocab-sized matrix products
instead of 3, which is the time cost of not keeping them.

Why the LM head is replaced for the duration of a normal model call instead of running the decoder and the head
separately: a DeepSpeed engine's forward registers the hooks that start its backward (ZeRO reduction set-up), and
under ZeRO-3 the head's weight is a partitioned placeholder that DeepSpeed gathers in the head module's forward
pre-hook and again, for backward, when the gradient reaches the module's output. Computing the logprobs *inside*
the head module's call gives the Function the gathered weight in both passes, exactly as for the plain Linear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # this module imports with torch alone: bench/gpu_check.py runs it where nothing else is installed
    from learner.batch import TrainBatch

# 1,024 tokens x 152,064 vocab x 4 bytes = 0.6 GB per fp32 chunk: enough rows for the matrix products to run at
# full speed, small next to the 10.6 GB per fp32 copy of a whole 7B micro-batch. The default of
# learner.logprob_chunk_tokens (tests/unit/test_logprobs.py holds them equal; importing the pydantic config here
# would cost the torch-only import).
DEFAULT_CHUNK_TOKENS: int = 1024


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside `model`, which may be a DeepSpeed engine (`engine.module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _scaled_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """fp32 logits / temperature of (N, H) hidden states, rounded through the weight's dtype as the LM head does."""
    # Not F.linear: once deepspeed.zero.Init has run, F.linear is DeepSpeed's own autograd.Function for good.
    logits = (torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias, hidden, weight.t())).float()
    if temperature != 1.0:
        logits.div_(temperature)  # .float() copied unless the head is fp32, where the product is ours to change
    return logits


class ChunkedHeadLogprobs(torch.autograd.Function):
    """logprob of `targets` under softmax(hidden @ weight.T + bias) / temperature, chunk by chunk; entropy optional.

    Inputs are flat: hidden (N, H), targets (N,). Outputs: logprobs (N,) fp32 and entropy (N,) fp32 (empty unless
    asked for; differentiable only with `entropy_grad`, for an entropy bonus). Backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(  # noqa: D102 - see the class docstring
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_tokens: int,
        with_entropy: bool,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = hidden.shape[0]
        logprobs = torch.empty(count, dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty_like(logprobs)
        entropy = torch.empty(count if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, count, chunk_tokens):
            stop = min(start + chunk_tokens, count)
            # Everything below works in the chunk's one logits buffer: no second (chunk, vocab) temporary.
            logits = _scaled_logits(hidden[start:stop], weight, bias, temperature)
            target_logits = logits.gather(1, targets[start:stop, None]).squeeze(1)
            maxes = logits.amax(dim=-1)
            exps = logits.sub_(maxes[:, None]).exp_()  # e = exp(x - max)
            sums = exps.sum(dim=-1)
            logsumexp[start:stop] = maxes + sums.log()
            logprobs[start:stop] = target_logits - logsumexp[start:stop]
            if with_entropy:
                # H = log S - sum(e * log e) / S: both terms >= 0 (log e = x - max <= 0), so nothing cancels.
                # xlogy gives 0 where e underflowed to 0, and writes over e, which is not needed any more.
                e_log_e = torch.special.xlogy(exps, exps, out=exps).sum(dim=-1)
                entropy[start:stop] = sums.log() - e_log_e / sums
            del logits, exps
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp, entropy if entropy_grad else None)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(  # noqa: D102 - see the class docstring
        ctx: Any, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, logsumexp, entropy = ctx.saved_tensors
        if entropy is None or grad_entropy is None or grad_entropy.numel() == 0:
            grad_entropy = None
        temperature, chunk_tokens = ctx.temperature, ctx.chunk_tokens
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        count = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Summed over chunks in fp32 whatever the weight's dtype, as one whole-batch product would accumulate.
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, count, chunk_tokens):
            stop = min(start + chunk_tokens, count)
            chunk = hidden[start:stop]
            # d logprob / d raw logits = (onehot(target) - softmax) / temperature, built in the recomputed logits.
            scale = (grad_logprobs[start:stop].float() / temperature)[:, None]
            grad_logits = _scaled_logits(chunk, weight, bias, temperature)
            grad_logits.sub_(logsumexp[start:stop, None])  # log p
            if grad_entropy is None:
                grad_logits.exp_().mul_(-scale)
            else:
                # d H / d x_j = -p_j (log p_j + H): with upstream g, the logits gradient is p * (a + b log p).
                h_scale = (grad_entropy[start:stop].float() / temperature)[:, None]
                probs = grad_logits.exp()  # the one extra chunk buffer an entropy bonus costs
                grad_logits.mul_(-h_scale).sub_(scale + h_scale * entropy[start:stop, None]).mul_(probs)
                del probs
            grad_logits.scatter_add_(1, targets[start:stop, None], scale)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(weight.dtype)  # what the fp32 cast's backward hands a bf16 head
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ weight
            if grad_weight is not None:
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), chunk, beta=0.0 if start == 0 else 1.0)
                elif start == 0:
                    grad_weight.copy_(grad_logits.t() @ chunk)
                else:
                    grad_weight += grad_logits.t() @ chunk
            del grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def full_logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    with_entropy: bool = False,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference computation on whole (B, T', V) logits: logprobs of `targets`, 0 where not `valid`; entropy."""
    logits = logits.float()
    if temperature != 1.0:
        logits.div_(temperature)  # in place: a second (B, T, vocab) fp32 copy is GBs at a 151k vocabulary
    logsumexp = torch.logsumexp(logits, dim=-1)
    logprobs = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            # sum(p * -log p) rather than lse - sum(p * logits), whose two large terms cancel (~1e-5 off in fp32).
            entropy = (torch.softmax(logits, dim=-1) * (logsumexp.unsqueeze(-1) - logits)).sum(dim=-1)
            entropy = torch.where(valid, entropy, 0.0)
    # Padding positions get exactly 0, so results do not depend on how much padding a micro-batch carried.
    return torch.where(valid, logprobs, 0.0), entropy


def head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs (B, T') fp32 of `targets` from hidden states (B, T', H) through the LM head `head`, 0 where not `valid`.

    Reads `head.weight` and `head.bias`: call it where they are whole (inside the head's forward under ZeRO-3).
    `chunk_tokens` None or 0 computes the whole logits at once through `head` (the reference).
    """
    if valid is None:
        valid = torch.ones_like(targets, dtype=torch.bool)
    if not chunk_tokens:
        return full_logprobs_from_logits(head(hidden), targets, valid, with_entropy, temperature, entropy_grad)
    rows = valid.reshape(-1).nonzero().squeeze(1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    flat_targets = targets.reshape(-1).index_select(0, rows)
    bias = getattr(head, "bias", None)
    logprobs, entropy = ChunkedHeadLogprobs.apply(
        flat_hidden, head.weight, bias, flat_targets, float(temperature), int(chunk_tokens), with_entropy,
        entropy_grad and torch.is_grad_enabled(),
    )
    zeros = torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device)
    logprobs = zeros.index_copy(0, rows, logprobs).view(targets.shape)
    if with_entropy:
        entropy = zeros.index_copy(0, rows, entropy).view(targets.shape)
        return logprobs, entropy
    return logprobs, None


@contextmanager
def _replaced_forward(module: torch.nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Route calls of `module` to `forward` inside the block; the module's hooks (ZeRO-3's gathers) still run."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    with_entropy: bool = False,
    temperature: float = 1.0,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each next token at `temperature`, (B, T-1) in fp32, and optionally the entropy at each position.

    Padding positions (attention_mask[:, 1:] == 0) get exactly 0 in both. `model` is a Hugging Face causal LM or a
    DeepSpeed engine around one. The entropy carries a gradient only with `entropy_grad` (an entropy bonus).
    `chunk_tokens` None or 0 = the full computation.
    """
    valid = attention_mask[:, 1:].bool()
    targets = input_ids[:, 1:]
    if not chunk_tokens:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        return full_logprobs_from_logits(logits, targets, valid, with_entropy, temperature, entropy_grad)

    lm = causal_lm(model)
    if getattr(lm.config, "final_logit_softcapping", None):
        raise NotImplementedError("chunked logprobs assume logits = lm_head(hidden); this model soft-caps them")
    head = lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise NotImplementedError(f"{type(lm).__name__} has no linear LM head (get_output_embeddings)")
    computed: dict[str, torch.Tensor | None] = {}

    def logprobs_head(hidden: torch.Tensor) -> torch.Tensor:
        # Called by the model where it would compute logits: (B, T, H) final hidden states -> (B, T-1) logprobs.
        logprobs, computed["entropy"] = head_logprobs(
            head, hidden[:, :-1], targets, valid, with_entropy, temperature, chunk_tokens, entropy_grad
        )
        computed["logprobs"] = logprobs
        return logprobs

    with _replaced_forward(head, logprobs_head):
        logprobs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # Hooks may wrap the head's output (ZeRO-3 returns a detached alias), but a model that transforms its logits
    # after the head would silently transform logprobs: insist on the same storage.
    if "logprobs" not in computed or logprobs.data_ptr() != computed["logprobs"].data_ptr():
        raise RuntimeError(f"{type(lm).__name__} does not return its LM head's output as logits unchanged")
    return logprobs, computed.get("entropy")


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    micro_batch_size: int,
    device: torch.device,
    temperature: float = 1.0,
    rows: Sequence[tuple[int, int]] | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Next-token logprobs of a batch, (B, T-1), micro-batch by micro-batch; 0 on padding and on rows not asked for.

    `rows` lists [start, stop) ranges to compute (default: the whole batch); `chunk_tokens` as in token_logprobs.
    """
    out = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
    for first, last in rows if rows is not None else [(0, batch.size)]:
        for start in range(first, last, micro_batch_size):
            micro = batch.rows(start, min(start + micro_batch_size, last)).to(device)
            logprobs, _ = token_logprobs(
                model, micro.input_ids, micro.attention_mask, temperature=temperature, chunk_tokens=chunk_tokens
            )
            out[start : start + micro.size, : logprobs.shape[1]] = logprobs.float().cpu()
    return out
