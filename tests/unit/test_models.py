"""Offline policies: the tiny random Qwen2 test policy and the packaged SmolLM2 conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.models import TAG_TOKENS, build_tiny_policy, resolve_policy, smollm2_dir, tiny_policy_dir


def test_tiny_policy_loads_offline_with_single_token_tags(tmp_path: Path) -> None:
    path = build_tiny_policy(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    for tag in TAG_TOKENS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
        assert tokenizer.decode(ids) == tag
    text = "<think> a b </think><search> where was x born </search>\n<result>\n\"T\"\nx\n</result>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))


def test_tiny_policy_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_policy(tmp_path / "a", seed=1)
    b = build_tiny_policy(tmp_path / "b", seed=1)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_tiny_policy_cache_is_reused() -> None:
    first = tiny_policy_dir()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_policy_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_policy("tiny-random-qwen2") == str(first)
    assert resolve_policy("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.slow
def test_smollm2_conversion_loads_and_answers() -> None:
    """Converts the packaged GGUF once (~1 min, cached under RESEARCH_CACHE) and checks it is the real model."""
    path = smollm2_dir()
    assert (path / "model.safetensors").is_file() and (path / ".complete").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert not hasattr(model.config, "quantization_config")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
    assert smollm2_dir() == path  # second call reuses the cache
