"""Chunked logprobs (learner.logprobs) against the full computation on a tiny random Qwen2, and the DeepSpeed config."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from learner.config import LearnerConfig
from learner.logprobs import DEFAULT_CHUNK_TOKENS, head_logprobs, token_logprobs

VOCAB = 509  # prime, so no chunk of tokens lines up with anything
LENGTH = 23


def tiny_qwen2(tie: bool, seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer, 64-wide random Qwen2 in fp32."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(config).float()
    # Random init gives near-uniform next-token distributions; larger head weights make the test discriminating.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def ragged_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of random tokens, right-padded to LENGTH: full, 15 and 6 real tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (3, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in ((1, 15), (2, 6)):
        attention_mask[row, length:] = 0
        input_ids[row, length:] = 0
    return input_ids, attention_mask


def logprobs_and_grads(
    model: Qwen2ForCausalLM, chunk_tokens: int | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logprobs, entropy and the gradient of a fixed weighted sum of the logprobs w.r.t. every parameter."""
    input_ids, attention_mask = ragged_batch()
    model.zero_grad(set_to_none=True)
    logprobs, entropy = token_logprobs(
        model, input_ids, attention_mask, with_entropy=True, temperature=temperature, chunk_tokens=chunk_tokens
    )
    # Per-token weights of both signs, as a policy-gradient loss has; padding gets weight too (its logprob is 0).
    weights = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2))
    (logprobs * weights).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy, grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_tokens", [5, 1, 1000])
def test_chunked_matches_full_with_gradients(tie: bool, temperature: float, chunk_tokens: int) -> None:
    model = tiny_qwen2(tie)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    full_lp, full_ent, full_grads = logprobs_and_grads(model, None, temperature)
    lp, ent, grads = logprobs_and_grads(model, chunk_tokens, temperature)

    _, attention_mask = ragged_batch()
    padding = attention_mask[:, 1:] == 0
    assert padding.any() and lp.dtype == torch.float32 and lp.shape == (3, LENGTH - 1)
    assert (lp[padding] == 0).all() and (ent[padding] == 0).all()
    assert full_lp.std() > 0.5  # the distributions are far from uniform, so a wrong target or shift would show
    torch.testing.assert_close(lp, full_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, full_ent, atol=1e-5, rtol=0)
    assert not ent.requires_grad
    assert grads.keys() == full_grads.keys() == {n for n, p in model.named_parameters()}
    for name, grad in grads.items():
        expected = full_grads[name]
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=0, msg=lambda msg, name=name: f"{name}: {msg}")
        # Relative to its own size too, so the small gradients (attention projections at init) are checked as well.
        assert expected.norm() > 0 and (grad - expected).norm() <= 1e-5 * expected.norm(), name


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_gradient_of_chunked_matches_full(temperature: float) -> None:
    """An entropy bonus needs d(entropy)/d(parameters): the chunked backward must give the full computation's."""
    model = tiny_qwen2(tie=True)
    input_ids, attention_mask = ragged_batch()
    weights = torch.randn((3, LENGTH - 1), generator=torch.Generator().manual_seed(3))
    results = []
    for chunk_tokens in (None, 4):
        model.zero_grad(set_to_none=True)
        logprobs, entropy = token_logprobs(model, input_ids, attention_mask, with_entropy=True,
                                           temperature=temperature, chunk_tokens=chunk_tokens, entropy_grad=True)
        assert entropy.requires_grad
        (logprobs.mean() - 0.5 * (entropy * weights).mean()).backward()
        results.append({name: p.grad.clone() for name, p in model.named_parameters()})
    full, chunked = results
    for name, expected in full.items():
        assert (chunked[name] - expected).norm() <= 1e-5 * expected.norm() + 1e-7, name


def test_default_chunk_and_no_grad_path() -> None:
    model = tiny_qwen2(tie=False)
    input_ids, attention_mask = ragged_batch()
    assert DEFAULT_CHUNK_TOKENS == LearnerConfig().logprob_chunk_tokens > 0
    with torch.no_grad():
        chunked, entropy = token_logprobs(model, input_ids, attention_mask)
        full, _ = token_logprobs(model, input_ids, attention_mask, chunk_tokens=0)
    assert entropy is None and not chunked.requires_grad
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    # The LM head is itself again afterwards.
    assert "forward" not in model.lm_head.__dict__
    assert model(input_ids=input_ids).logits.shape == (3, LENGTH, VOCAB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_with_bias_matches_full(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    head = torch.nn.Linear(32, 97, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.mul_(6.0)
    hidden = torch.randn(2, 11, 32, dtype=dtype)
    targets = torch.randint(0, 97, (2, 11))
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 7:] = False
    weights = torch.randn(2, 11)
    results = []
    for chunk_tokens in (None, 4):
        head.zero_grad(set_to_none=True)
        leaf = hidden.clone().requires_grad_()
        logprobs, _ = head_logprobs(head, leaf, targets, valid, temperature=0.7, chunk_tokens=chunk_tokens)
        (logprobs * weights).sum().backward()
        results.append((logprobs.detach(), leaf.grad, head.weight.grad, head.bias.grad))
    # bf16: both round the logits and d(logits) through bf16 the same way; only the summation order differs.
    # bf16 products depend on the thread count and blocking, which earlier tests in the process may have changed.
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 1e-1}
    for full, chunked in zip(*results, strict=True):
        assert chunked.dtype == full.dtype
        torch.testing.assert_close(chunked, full, **tolerance)


def test_model_that_changes_its_logits_is_refused() -> None:
    model = tiny_qwen2(tie=False)
    model.config.final_logit_softcapping = 30.0
    input_ids, attention_mask = ragged_batch()
    with pytest.raises(NotImplementedError):
        token_logprobs(model, input_ids, attention_mask)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_accumulates_bf16_gradients_in_fp32(stage: int) -> None:
    from learner.distributed import deepspeed_config

    bf16 = deepspeed_config(LearnerConfig(zero_stage=stage, dtype="bfloat16"))
    fp32 = deepspeed_config(LearnerConfig(zero_stage=stage, dtype="float32"))
    assert bf16["bf16"] == {"enabled": True}
    assert "data_types" not in fp32 and "bf16" not in fp32
    if stage == 0:
        # DeepSpeed 0.19.8 refuses bf16 weights with fp32 accumulation without ZeRO (NotImplementedError).
        assert "data_types" not in bf16
    else:
        assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}


# ~2 s on a quiet machine (DeepSpeed's import, two single-process engines), so not marked slow.
@pytest.mark.parametrize("tie", [False, True])
def test_zero3_engine_gathers_the_head_and_gets_the_full_gradients(tie: bool) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from learner.distributed import deepspeed_config, init_distributed

    init_distributed()  # one gloo rank
    reference = tiny_qwen2(tie)
    full_lp, full_ent, full_grads = logprobs_and_grads(reference, None, 0.7)
    model = tiny_qwen2(tie)
    ds_config = deepspeed_config(LearnerConfig(zero_stage=3, dtype="float32", micro_batch_size=3))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=ds_config
    )
    # Partitioned: the head's weight is a placeholder outside the module's call (persistence threshold 0).
    assert engine.module.lm_head.weight.numel() == 0
    input_ids, attention_mask = ragged_batch()
    logprobs, entropy = token_logprobs(
        engine, input_ids, attention_mask, with_entropy=True, temperature=0.7, chunk_tokens=5
    )
    weights = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2))
    engine.backward((logprobs * weights).mean())
    torch.testing.assert_close(logprobs.detach(), full_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, full_ent, atol=1e-5, rtol=0)
    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        assert grad is not None, name
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert engine.module.lm_head.weight.numel() == 0
    engine.destroy()


@pytest.mark.slow  # a DeepSpeed engine per stage
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_honours_fp32_gradient_accumulation(stage: int) -> None:
    import deepspeed

    from learner.distributed import deepspeed_config, init_distributed

    init_distributed()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).to(torch.bfloat16)
    config = deepspeed_config(LearnerConfig(zero_stage=stage, dtype="bfloat16", micro_batch_size=1))
    engine, optimizer, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config
    )
    accumulation = getattr(optimizer, "gradient_accumulation_dtype", getattr(optimizer, "grad_acc_dtype", None))
    # Stage 0 cannot have it (see deepspeed_config); 1 becomes the BF16_Optimizer, 2-3 keep fp32 partitions.
    assert accumulation == (None if stage == 0 else torch.float32)
    assert type(optimizer).__name__ == {
        0: "FP16_UnfusedOptimizer", 1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"
    }[stage]
    engine.destroy()
