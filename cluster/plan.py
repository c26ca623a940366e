"""`research plan CONFIG`: will the job fit? A memory estimate per role against the memory the config states, and
the placement of every rank, actor and replica on the launch files' nodes; exit code 1 when anything does not fit.

Pure arithmetic on the config and the model's architecture: nothing is built, loaded or downloaded, and torch is
not imported. Roles and what each estimate counts (all in GiB = 2**30 bytes):

learner rank (one DeepSpeed rank; capacity = gpus_per_rank x hardware.gpu_memory_gib, or host RAM on CPU)
    N parameters, p = bytes of the training dtype (bf16 2 on GPU, fp32 4 on CPU), W = learner.world_size.
    parameters      p*N, / W under ZeRO-3 (+ the gathered working set: the largest module + a 5e7 prefetch bucket)
    gradients       p*N, / W under ZeRO-2 and 3
    optimizer       AdamW m and v, 8*N, plus the fp32 master copy 4*N (DeepSpeed's ZeRO optimizers clone the fp32
                    partition even when training in fp32; plain fp32 ZeRO-0 has none), / W under ZeRO-1, 2, 3
    fp32 gradients  4*N accumulation buffer of bf16 mixed precision (0 in fp32: the gradients already are), / W
                    under ZeRO-1, 2, 3
    reduce bucket   min(N, 5e8 elements) * p, ZeRO-1, 2, 3 (DeepSpeed's default reduce_bucket_size)
    reference       p*N frozen weights when kl_coef > 0, / W under ZeRO-3
    activations     n = micro_batch_size * T tokens, T = min(max_prompt_tokens + max_response_tokens, max_model_len).
                    Per decoder layer and token, what the Hugging Face Qwen2/Llama layer saves for backward:
                      2 RMSNorms x 12h bytes (input, normalised and output; computed in fp32, so the same bytes in
                      bf16: fp32 copies plus the bf16 casts) + p*(5h + 4I) (q after RoPE, k and v repeated to all
                      heads, attention output and its reshaped copy; SwiGLU gate, silu(gate), up, their product).
                    Attention is SDPA (flash / memory-efficient: no T^2 scores), but SDPA turns a padded batch's
                    boolean mask into an additive B x T x T one (p bytes per entry) in every layer and saves it.
                    Once per rank: the boolean mask (B x T x T bytes) and the final norm (12h bytes per token).
                    Without gradient checkpointing all L layers are saved, plus one layer's worth of activation
                    gradients in backward; with it, each layer's input (p*h per token) plus one layer recomputed
                    and its gradients (2 layers' worth).
    log-probs       the (tokens x vocab) fp32 logits of token_logprobs and what backward makes of them: 3 copies
                    (logits, logsumexp's gradient, gather's scattered gradient; entropy's softmax is transient in
                    forward) x chunk x vocab x 4 bytes, chunk = learner.logprob_chunk_tokens (0: the whole
                    micro-batch at once).
                    Without checkpointing the log-prob stage adds to all saved activations (both live at the end
                    of forward); with it, the peak is the larger of it and the recomputed layer with its gradients.
                    Checked on CPU against real learner steps: bench/plan_check.py, bench/RESULTS.md.
    lm head grad    the LM head's whole weight gradient before ZeRO reduces it: vocab x hidden x (4 + p) with the
                    chunked head (learner.logprobs sums it in fp32, then casts it to the dtype; both alive), x p
                    with whole logits (autograd's); part of the log-prob stage's peak.
    runtime         1 GiB: CUDA context and NCCL buffers on GPU; the Python/torch process on CPU.
    weight sync     rank 0 only (the plan reports rank 0, the fullest): the sender's two buffers of the largest
                    bucket, max(weight_sync_bucket_mb, the largest tensor) in the dtype, kept between syncs
                    (learner/weight_sender.WeightSender), and on GPU the NCCL communicator's buffers (0.5 GiB, an
                    upper estimate).

rollout engine (one vLLM engine; on GPU each of its tensor_parallel_size GPUs, capacity = gpu_memory_utilization x
GPU memory; on CPU capacity = host RAM)
    weights         p*N / tp
    overhead        1 GiB runtime + 1 GiB CUDA graphs unless enforce_eager + the profiling forward: 8192 batched
                    tokens x p x (4h + 2I/tp) + max_num_seqs x vocab x 8 bytes of sampler logits
    KV cache        per token 2 x L x max(1, kv_heads/tp) x head_dim x p; the engine's share is what remains of the
                    capacity (GPU) or engine.cpu_kvcache_gb (CPU). The estimate counts one max_model_len sequence
                    (vLLM refuses to start without it); the breakdown tells how many tokens and sequences fit.
    weight sync     on GPU, outside vLLM's budget, so within the (1 - gpu_memory_utilization) it leaves: every
                    worker receives whole buckets (one largest bucket) over its own NCCL communicator (0.5 GiB).

placement (cluster/placement.py)
    every learner rank, rollout actor and retrieval replica with the CPUs, GPUs, memory and custom resources its
    section asks Ray for, packed onto the nodes of each launch file in hardware.launch_files (or --launch) and of
    hardware.nodes; a launch file's GPUs must have hardware.gpu_memory_gib.

retrieval replica (one service process, host RAM)
    index           ntotal x bytes per vector of the faiss factory (Flat: dim x 4), from the index dir's meta.json,
                    else 21,015,324 passages for a wiki-18 index dir, else data.world_passages (synthetic world)
    encoder         its parameters x 4 (fp32 on CPU)
    offsets         (ntotal + 1) x 8 bytes of docs.offsets.npy (memory-mapped)
    runtime         1 GiB: Python, torch, faiss and the web server
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config import JobConfig
    from cluster.placement import Placement

GIB = float(2**30)
RUNTIME_BYTES = 1.0 * GIB
CUDA_GRAPH_BYTES = 1.0 * GIB
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
PREFETCH_BUCKET_ELEMENTS = 50_000_000  # learner.engine.deepspeed_config: stage3_prefetch_bucket_size
LOGPROB_COPIES = 3  # fp32 (chunk x vocab) tensors alive at once in token_logprobs' forward/backward
VLLM_PROFILE_TOKENS = 8192  # tokens of vLLM's profiling forward (its default max_num_batched_tokens)
# NCCL's buffers of one communicator: NCCL_BUFFSIZE (4 MiB) per channel and peer, up to 32 channels on NVLink, plus
# its proxy and work FIFOs; an upper estimate, not measured.
NCCL_COMMUNICATOR_BYTES = 0.5 * GIB
WIKI18_PASSAGES = 21_015_324  # wiki-18 (DPR's 100-word split), the index of the paper presets


class PlanError(ValueError):
    """The config lacks what the planner needs (an unknown model, no GPU memory); the message says what to set."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that decide its memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    head_dim: int = 0  # 0 = hidden / heads
    qkv_bias: bool = True  # Qwen2 has q/k/v biases, Llama does not

    @property
    def dim_per_head(self) -> int:
        """Width of one attention head."""
        return self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        """Parameter count: embeddings (+ an untied LM head), attention, SwiGLU MLP and RMSNorm weights."""
        d = self.dim_per_head
        q, kv = self.heads * d, self.kv_heads * d
        attention = self.hidden * (q + 2 * kv) + q * self.hidden + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        heads = 1 if self.tie_embeddings else 2
        return heads * self.vocab * self.hidden + self.layers * layer + self.hidden

    @property
    def largest_module_params(self) -> int:
        """Parameters of the largest module ZeRO-3 gathers at once: the embedding or one decoder layer."""
        d = self.dim_per_head
        layer = self.hidden * (self.heads * d * 2 + 2 * self.kv_heads * d) + 3 * self.hidden * self.intermediate
        return max(self.vocab * self.hidden, layer)


# Public config.json numbers of the hub models the presets name (so planning needs no download).
QWEN25_7B = Architecture(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064,
                         tie_embeddings=False)
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "qwen/qwen2.5-7b-instruct": QWEN25_7B,
    "qwen/qwen2.5-7b": QWEN25_7B,
    "qwen/qwen2.5-32b-instruct": Architecture(layers=64, hidden=5120, intermediate=27648, heads=40, kv_heads=8,
                                              vocab=152064, tie_embeddings=False),
    "qwen/qwen2.5-32b": Architecture(layers=64, hidden=5120, intermediate=27648, heads=40, kv_heads=8,
                                     vocab=152064, tie_embeddings=False),
    "qwen/qwen2.5-1.5b-instruct": Architecture(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2,
                                               vocab=151936, tie_embeddings=True),
    "smollm2-135m-instruct": Architecture(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3,
                                          vocab=49152, tie_embeddings=True, qkv_bias=False),
}
# Encoders: (parameters, output dimension).
KNOWN_ENCODERS: dict[str, tuple[int, int]] = {
    "all-minilm-l6-v2": (22_713_216, 384),
    "sentence-transformers/all-minilm-l6-v2": (22_713_216, 384),
    "intfloat/e5-base-v2": (109_482_240, 768),
    "intfloat/e5-large-v2": (335_141_888, 1024),
}


def architecture_from_config_json(path: str | Path) -> Architecture:
    """The Architecture of a Hugging Face config.json (Qwen2, Llama and alike)."""
    raw = json.loads(Path(path).read_text())
    raw = raw.get("text_config", raw)
    try:
        heads = int(raw["num_attention_heads"])
        return Architecture(
            layers=int(raw["num_hidden_layers"]),
            hidden=int(raw["hidden_size"]),
            intermediate=int(raw["intermediate_size"]),
            heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads),
            vocab=int(raw["vocab_size"]),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            head_dim=int(raw.get("head_dim") or 0),
            qkv_bias=bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")),
        )
    except KeyError as err:
        raise PlanError(f"{path}: no {err.args[0]} in the model config") from None


def _tiny_architecture() -> Architecture:
    """The tiny test policy's shape: its cached config.json when built, else the numbers it is built from."""
    from cluster import models

    built = models.cache_root() / "models" / f"{models.TINY_NAME}-seed0" / "config.json"
    if built.is_file():
        return architecture_from_config_json(built)
    # Built, the vocabulary is the trained BPE (TINY_VOCAB minus the tags) plus the 8 tags: TINY_VOCAB.
    return Architecture(layers=models.TINY_LAYERS, hidden=models.TINY_HIDDEN, intermediate=2 * models.TINY_HIDDEN,
                        heads=models.TINY_HEADS, kv_heads=models.TINY_KV_HEADS, vocab=models.TINY_VOCAB,
                        tie_embeddings=True)


def hf_cached_config(repo_id: str) -> Path | None:
    """The config.json of a hub model already in the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub), or None; nothing is downloaded."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache = os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    return Path(found) if isinstance(found, str) else None  # None or the "known absent" sentinel otherwise


def architecture_and_source(name_or_path: str) -> tuple[Architecture, str]:
    """A policy's Architecture and where it came from: a local directory's config.json, the Hugging Face cache's,
    the built-in policies, or (offline fallback) the public numbers of the hub ids the presets name."""
    from cluster import models

    if name_or_path == models.TINY_NAME:
        return _tiny_architecture(), "built-in tiny policy"
    if name_or_path == models.SMOLLM2_NAME:
        converted = models.cache_root() / "models" / models.SMOLLM2_NAME / "config.json"
        if converted.is_file():
            return architecture_from_config_json(converted), str(converted)
        return KNOWN_ARCHITECTURES[name_or_path], "built-in table"
    local = Path(name_or_path).expanduser() / "config.json"
    if local.is_file():
        return architecture_from_config_json(local), str(local)
    cached = hf_cached_config(name_or_path)
    if cached is not None:
        return architecture_from_config_json(cached), str(cached)
    known = KNOWN_ARCHITECTURES.get(name_or_path.lower())
    if known is None:
        raise PlanError(
            f"unknown model {name_or_path!r}: give a local directory with a config.json, download it into the "
            f"Hugging Face cache (huggingface-cli download {name_or_path} config.json), or use one of "
            f"{', '.join(sorted(KNOWN_ARCHITECTURES))}"
        )
    return known, "built-in table (not in the Hugging Face cache)"


def resolve_architecture(name_or_path: str) -> Architecture:
    """A policy's Architecture (see architecture_and_source)."""
    return architecture_and_source(name_or_path)[0]


def encoder_size(name_or_path: str) -> tuple[int, int]:
    """(parameters, dimension) of a retrieval encoder: the known ones, or a local BERT-style config.json."""
    known = KNOWN_ENCODERS.get(name_or_path.lower())
    if known is not None:
        return known
    local = Path(name_or_path) / "config.json"
    if not local.is_file():
        raise PlanError(f"unknown encoder {name_or_path!r}: give a local directory or one of {', '.join(KNOWN_ENCODERS)}")
    raw = json.loads(local.read_text())
    h, inter, layers = int(raw["hidden_size"]), int(raw["intermediate_size"]), int(raw["num_hidden_layers"])
    embeddings = (int(raw["vocab_size"]) + int(raw.get("max_position_embeddings", 512)) + 2) * h + 2 * h
    layer = 4 * h * h + 4 * h + 2 * h * inter + inter + h + 4 * h  # attention, MLP, two LayerNorms
    return embeddings + layers * layer + h * h + h, h


@dataclass
class RolePlan:
    """One role's verdict: bytes by component, what it is compared with, and role-specific figures."""

    role: str
    count: int
    per: str
    breakdown: dict[str, float]  # bytes
    capacity: float  # bytes
    estimate: float  # bytes; the peak, which is not always the sum of the breakdown (see the module docstring)
    fits: bool
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The role as JSON: estimate_gib, capacity_gib, fits, then the breakdown and extras."""
        out: dict[str, Any] = {
            "estimate_gib": round(self.estimate / GIB, 3),
            "capacity_gib": round(self.capacity / GIB, 3),
            "fits": self.fits,
            "headroom_gib": round((self.capacity - self.estimate) / GIB, 3),
            "count": self.count,
            "per": self.per,
            "breakdown_gib": {k: round(v / GIB, 3) for k, v in self.breakdown.items()},
        }
        out.update(self.extra)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def host_memory_bytes() -> float:
    """This machine's RAM."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def dtype_bytes(name: str, on_gpu: bool) -> int:
    """Bytes per element of a config dtype name ('auto' = bf16 on GPU, fp32 on CPU)."""
    if name == "auto":
        return 2 if on_gpu else 4
    return 4 if name == "float32" else 2


@dataclass(frozen=True)
class LearnerShape:
    """What decides a learner rank's memory besides the micro-batch."""

    arch: Architecture
    seq_len: int
    zero_stage: int
    world_size: int
    p: int  # bytes per element of the training dtype
    checkpointing: bool
    reference: bool
    chunk_tokens: int | None  # None = whole micro-batch
    sync_buffer_bytes: float = 0.0  # rank 0: the weight sender's two bucket buffers, kept between syncs
    communicator_bytes: float = 0.0  # rank 0: the weight-sync group's NCCL communicator


def largest_bucket_bytes(arch: Architecture, p: int, bucket_mb: float) -> float:
    """Bytes of the largest weight-sync bucket: bucket_mb MiB, or the largest tensor (the embedding or the untied
    LM head, vocab x hidden) when it is larger, since a tensor travels whole (weight_transfer/wire.make_manifest);
    never more than the whole model (the buffers are sized to the largest bucket there is)."""
    return min(float(p * arch.params), max(bucket_mb * 2**20, float(p * arch.vocab * arch.hidden)))


def layer_activation_bytes_per_token(arch: Architecture, p: int) -> float:
    """Bytes one decoder layer saves for backward per token (see the module docstring)."""
    return 24 * arch.hidden + p * (5 * arch.hidden + 4 * arch.intermediate)


def learner_breakdown(shape: LearnerShape, micro_batch: int) -> tuple[dict[str, float], float, dict[str, float]]:
    """(bytes by component, the peak, activation figures) of one learner rank at `micro_batch` sequences."""
    a, n_params, w, stage, p = shape.arch, shape.arch.params, shape.world_size, shape.zero_stage, shape.p
    mixed = p < 4
    parts: dict[str, float] = {}
    parts["parameters"] = p * n_params / (w if stage == 3 else 1)
    if stage == 3:
        parts["zero3 gathered parameters"] = p * (a.largest_module_params + PREFETCH_BUCKET_ELEMENTS)
    parts["gradients"] = p * n_params / (w if stage >= 2 else 1)
    master = 4 if (mixed or stage >= 1) else 0
    parts["optimizer (adam m, v, fp32 master)"] = (8 + master) * n_params / (w if stage >= 1 else 1)
    if mixed:
        parts["fp32 gradients"] = 4 * n_params / (w if stage >= 1 else 1)
    if stage >= 1:
        parts["reduce bucket"] = p * min(n_params, REDUCE_BUCKET_ELEMENTS)
    if shape.reference:
        parts["reference policy"] = p * n_params / (w if stage == 3 else 1)
    parts["runtime"] = RUNTIME_BYTES
    if shape.sync_buffer_bytes:
        parts["weight-sync buffers (rank 0)"] = shape.sync_buffer_bytes
    if shape.communicator_bytes:
        parts["weight-sync communicator (rank 0)"] = shape.communicator_bytes

    tokens, mask = micro_batch * shape.seq_len, micro_batch * shape.seq_len**2
    # SDPA turns the padded batch's boolean mask into an additive one per call and saves it: p bytes per T^2 entry.
    per_layer = layer_activation_bytes_per_token(a, p) * tokens + p * mask
    edges = 12 * a.hidden * tokens + mask  # final norm + the boolean (B, 1, T, T) mask, shared by the layers
    full = a.layers * per_layer + edges
    checkpointed_inputs = a.layers * p * a.hidden * tokens + edges
    chunk = tokens if shape.chunk_tokens is None else min(shape.chunk_tokens, tokens)
    logprobs = LOGPROB_COPIES * chunk * a.vocab * 4
    # The LM head's whole weight gradient exists before ZeRO reduces it: the chunked head (learner.logprobs) sums
    # it in fp32 and casts it to the weight's dtype at the end (both alive then); autograd's is in the dtype.
    head_grad = (4 + (p if p < 4 else 0)) * a.vocab * a.hidden if shape.chunk_tokens is not None else p * a.vocab * a.hidden
    parts["lm head weight gradient"] = head_grad
    logprobs += head_grad
    # Backward holds a layer's activation gradients while that layer's saved tensors are alive: one more layer.
    if shape.checkpointing:
        parts["activations (checkpointed layer inputs)"] = checkpointed_inputs
        parts["activations (one layer recomputed + its gradients)"] = 2 * per_layer
        dynamic = checkpointed_inputs + max(2 * per_layer, logprobs)
    else:
        parts["activations (all layers)"] = full
        parts["activation gradients (one layer)"] = per_layer
        dynamic = full + per_layer + logprobs
    parts["log-probs"] = logprobs - head_grad
    static = sum(v for k, v in parts.items() if not k.startswith(("activation", "log-probs", "lm head")))
    figures = {"without_checkpointing": full + per_layer, "with_checkpointing": checkpointed_inputs + 2 * per_layer}
    return parts, static + dynamic, figures


def largest_micro_batch(shape: LearnerShape, capacity: float, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose peak fits in `capacity` (0 if not even one sequence does)."""
    if learner_breakdown(shape, 1)[1] > capacity:
        return 0
    low, high = 1, limit
    if learner_breakdown(shape, high)[1] <= capacity:
        return high
    while high - low > 1:  # the peak grows with the micro-batch
        middle = (low + high) // 2
        low, high = (middle, high) if learner_breakdown(shape, middle)[1] <= capacity else (low, middle)
    return low


def _seq_len(config: JobConfig) -> int:
    """Longest trajectory the learner sees: prompt + response budget, capped by what the engine admits."""
    rollout = config.rollout
    return min(rollout.max_prompt_tokens + rollout.sampling.max_response_tokens, rollout.engine.max_model_len)


def _on_gpu(config: JobConfig) -> bool:
    """Whether the GPU roles run on GPUs: when learner ranks or rollout actors reserve GPUs."""
    return config.learner.gpus_per_rank > 0 or config.rollout.gpus_per_actor > 0


def _gpu_bytes(config: JobConfig) -> float:
    """Memory of one GPU; a PlanError naming the key to set when the config does not state it."""
    if config.hardware.gpu_memory_gib is None:
        raise PlanError(
            f"{config.name} runs on GPUs but hardware.gpu_memory_gib is not set "
            "(e.g. `research plan CONFIG hardware.gpu_memory_gib=80`)"
        )
    return config.hardware.gpu_memory_gib * GIB


def _host_bytes(config: JobConfig) -> float:
    """RAM of one node: hardware.host_memory_gib, else this machine's."""
    stated = config.hardware.host_memory_gib
    return stated * GIB if stated is not None else host_memory_bytes()


def plan_learner(config: JobConfig, arch: Architecture, chunk_tokens: int | None = None) -> RolePlan:
    """One learner rank; `chunk_tokens` overrides learner.logprob_chunk_tokens (None = the config's)."""
    learner, on_gpu = config.learner, _on_gpu(config)
    if chunk_tokens is None:
        chunk_tokens = learner.logprob_chunk_tokens or None
    shape = LearnerShape(
        arch=arch, seq_len=_seq_len(config), zero_stage=learner.zero_stage, world_size=learner.world_size,
        p=dtype_bytes(learner.dtype, on_gpu), checkpointing=learner.gradient_checkpointing,
        reference=learner.grpo.kl_coef > 0, chunk_tokens=chunk_tokens,
        # Rank 0 alone sends the weights: two buffers of the largest bucket (in the training dtype) stay allocated
        # between syncs (learner/weight_sender.WeightSender._buffer), plus the NCCL communicator's buffers on GPU.
        sync_buffer_bytes=2 * largest_bucket_bytes(arch, dtype_bytes(learner.dtype, on_gpu),
                                                   learner.weight_sync_bucket_mb),
        communicator_bytes=NCCL_COMMUNICATOR_BYTES if on_gpu else 0.0,
    )
    if on_gpu:
        capacity = max(learner.gpus_per_rank, 1.0) * _gpu_bytes(config)
        per = f"{max(learner.gpus_per_rank, 1):g} GPU, rank 0"
    else:
        capacity, per = _host_bytes(config), "host"
    parts, peak, figures = learner_breakdown(shape, learner.micro_batch_size)
    notes = []
    if not on_gpu:
        notes.append("on CPU every role shares the host's RAM")
    return RolePlan(
        role="learner_rank", count=learner.world_size, per=per, breakdown=parts, capacity=capacity, estimate=peak,
        fits=peak <= capacity,
        extra={
            "parameters": arch.params,
            "zero_stage": learner.zero_stage,
            "world_size": learner.world_size,
            "dtype_bytes": shape.p,
            "micro_batch_size": learner.micro_batch_size,
            "seq_len": shape.seq_len,
            "gradient_checkpointing": learner.gradient_checkpointing,
            "logprob_chunk_tokens": chunk_tokens,
            "activations_gib": {k: round(v / GIB, 3) for k, v in figures.items()},
            "max_micro_batch": largest_micro_batch(shape, capacity),
        },
        notes=notes,
    )


def plan_rollout(config: JobConfig, arch: Architecture) -> RolePlan:
    """One rollout engine: per GPU of its tensor-parallel group on GPU, its process on CPU."""
    engine, on_gpu = config.rollout.engine, _on_gpu(config)
    p = dtype_bytes(engine.dtype, on_gpu)
    tp = engine.tensor_parallel_size if on_gpu else 1
    kv_per_token = 2 * arch.layers * max(1, arch.kv_heads // tp) * arch.dim_per_head * p
    parts: dict[str, float] = {"weights": p * arch.params / tp, "runtime": RUNTIME_BYTES}
    if on_gpu:
        if not engine.enforce_eager:
            parts["cuda graphs"] = CUDA_GRAPH_BYTES
        profile = VLLM_PROFILE_TOKENS * p * (4 * arch.hidden + 2 * arch.intermediate / tp)
        parts["profiling forward"] = profile + engine.max_num_seqs * arch.vocab * 8
        capacity = engine.gpu_memory_utilization * _gpu_bytes(config)
        kv_cache = max(0.0, capacity - sum(parts.values()))
        per = f"GPU of {tp}" if tp > 1 else "GPU"
    else:
        capacity = _host_bytes(config)
        kv_cache = engine.cpu_kvcache_gb * GIB
        per = "host"
    one_sequence = engine.max_model_len * kv_per_token
    kv_tokens = int(kv_cache // kv_per_token)
    wanted = engine.max_num_seqs * engine.max_model_len
    notes = []
    if kv_tokens < engine.max_model_len:
        notes.append(f"the KV cache holds {kv_tokens} tokens, less than one max_model_len sequence: vLLM will not start")
    elif kv_tokens < wanted:
        notes.append(f"{kv_tokens // engine.max_model_len} of max_num_seqs={engine.max_num_seqs} max-length "
                     "sequences fit at once; vLLM queues or preempts the rest")
    static = sum(parts.values())
    outside: dict[str, float] = {}
    if on_gpu:
        estimate = static + one_sequence
        parts["kv cache (one max-length sequence)"] = one_sequence
        # Allocated outside vLLM's budget, so they must fit in the (1 - gpu_memory_utilization) it leaves: every
        # worker, tensor-parallel ones included, receives whole buckets (actors/weight_receiver.research_load_weights)
        # over its own NCCL communicator.
        outside = {"weight-sync receive buffer": largest_bucket_bytes(arch, p, config.learner.weight_sync_bucket_mb),
                   "weight-sync communicator": NCCL_COMMUNICATOR_BYTES}
        left = (1.0 - engine.gpu_memory_utilization) * _gpu_bytes(config)
        fits = kv_tokens >= engine.max_model_len and sum(outside.values()) <= left
        if sum(outside.values()) > left:
            notes.append(f"the weight-sync receive buffer and communicator ({sum(outside.values()) / GIB:.2f} GiB) "
                         f"do not fit in the {left / GIB:.2f} GiB gpu_memory_utilization leaves")
    else:
        parts["kv cache (cpu_kvcache_gb)"] = kv_cache
        estimate = static + kv_cache
        fits = estimate <= capacity and kv_tokens >= engine.max_model_len
    return RolePlan(
        role="rollout_engine", count=config.rollout.num_actors, per=per, breakdown=parts, capacity=capacity,
        estimate=estimate, fits=fits,
        extra={
            "tensor_parallel_size": tp,
            "dtype_bytes": p,
            "kv_cache_gib": round(kv_cache / GIB, 3),
            "kv_bytes_per_token": kv_per_token,
            "kv_tokens": kv_tokens,
            "kv_tokens_wanted": wanted,
            "max_length_sequences": kv_tokens // engine.max_model_len,
            "capacity_is": "gpu_memory_utilization x GPU memory" if on_gpu else "host RAM",
            "outside_vllm_budget_gib": {k: round(v / GIB, 3) for k, v in outside.items()},
        },
        notes=notes,
    )


def index_size(config: JobConfig, dim: int) -> tuple[int, int, str]:
    """(vectors, bytes per vector, where the count came from) of the retrieval index the job serves."""
    index_dir = config.retrieval.index_dir
    if index_dir:
        meta = Path(index_dir) / "meta.json"
        if meta.is_file():
            raw = json.loads(meta.read_text())
            return int(raw["count"]), bytes_per_vector(raw.get("factory", "Flat"), int(raw["dim"])), str(meta)
        if re.search(r"wiki-?18", index_dir, re.IGNORECASE):
            return WIKI18_PASSAGES, bytes_per_vector("Flat", dim), "wiki-18 (index not on this machine)"
        raise PlanError(f"{index_dir} has no meta.json and is not a wiki-18 index: build it or plan where it exists")
    return config.data.world_passages, bytes_per_vector("Flat", dim), "synthetic world (data.world_passages)"


def bytes_per_vector(factory: str, dim: int) -> int:
    """Bytes per vector of a faiss index_factory string (Flat, HNSWm, IVFk,PQm/SQ8/Flat); Flat when unknown."""
    hnsw = re.match(r"HNSW(\d+)", factory)
    if hnsw:
        return 4 * dim + 8 * int(hnsw.group(1))  # vectors + level-0 links (2M int32 neighbours)
    pq = re.search(r"PQ(\d+)", factory)
    if pq:
        return int(pq.group(1)) + 8  # codes + ids in the inverted lists
    if "SQ8" in factory:
        return dim + 8
    return 4 * dim + (8 if factory.startswith("IVF") else 0)


def plan_retrieval(config: JobConfig) -> RolePlan:
    """One retrieval service replica (host RAM: replicas are CPU actors)."""
    params, dim = encoder_size(config.retrieval.encoder.name_or_path)
    count, per_vector, source = index_size(config, dim)
    parts = {
        "index": float(count * per_vector),
        "encoder": 4.0 * params,
        "passage offsets": 8.0 * (count + 1),
        "runtime": RUNTIME_BYTES,
    }
    capacity = _host_bytes(config)
    estimate = sum(parts.values())
    notes = [f"index size from {source}"]
    replicas = config.retrieval.replicas if not config.retrieval.urls else 0
    if replicas > 1:
        notes.append(f"{replicas} replicas on one node need {replicas} x this")
    return RolePlan(
        role="retrieval_replica", count=replicas, per="host", breakdown=parts, capacity=capacity,
        estimate=estimate, fits=estimate <= capacity,
        extra={"index_vectors": count, "index_bytes_per_vector": per_vector},
        notes=notes,
    )


TIGHT = 0.9  # an estimate above this share of the capacity leaves little for allocator fragmentation


def plan(config: JobConfig, chunk_tokens: int | None = None) -> dict[str, RolePlan]:
    """Every role's plan for a JobConfig."""
    arch, source = architecture_and_source(config.policy.name_or_path)
    plans = {
        "learner_rank": plan_learner(config, arch, chunk_tokens),
        "rollout_engine": plan_rollout(config, arch),
        "retrieval_replica": plan_retrieval(config),
    }
    plans["learner_rank"].extra["architecture_source"] = source
    for role in plans.values():
        if role.fits and role.estimate > TIGHT * role.capacity:
            role.notes.append(f"tight: the estimate is {role.estimate / role.capacity:.0%} of the capacity, and "
                              "allocator fragmentation (not counted) may tip it over")
    return plans


def check_placement(config: JobConfig, plans: dict[str, RolePlan],
                    launch_files: list[str] | None = None) -> list[Placement]:
    """Whether the job's units can be placed: on each launch file (default hardware.launch_files) and on
    hardware.nodes when set. A retrieval replica asks Ray for its index's memory (the plan's index bytes)."""
    from cluster.placement import check_hardware_nodes, check_launch_file

    index_bytes = plans["retrieval_replica"].breakdown["index"]
    names = config.hardware.launch_files if launch_files is None else launch_files
    verdicts = [check_launch_file(config, name, index_bytes) for name in names]
    if config.hardware.nodes:
        verdicts.append(check_hardware_nodes(config, index_bytes))
    return verdicts


def format_placement(verdicts: list[Placement]) -> list[str]:
    """Lines of the placement section: one per source, its node groups' roles, and every problem."""
    if not verdicts:
        return ["", "placement: not checked (no hardware.launch_files, hardware.nodes or --launch)"]
    lines = ["", "placement (learner ranks, rollout actors, retrieval replicas on the nodes each source offers):"]
    for verdict in verdicts:
        note = f", {verdict.note}" if verdict.note else ""
        lines.append(f"  {verdict.source}: {'yes' if verdict.fits else 'NO'} ({verdict.nodes} nodes, "
                     f"{verdict.gpus:g} GPUs{note})")
        for group, roles in verdict.hosted.items():
            lines.append(f"    {group}: " + ", ".join(f"{count} {role}{'s' if count != 1 else ''}"
                                                    for role, count in roles.items()))
        lines += [f"    problem: {problem}" for problem in verdict.problems]
    return lines


def format_plan(config: JobConfig, plans: dict[str, RolePlan], brief: bool = False) -> str:
    """A readable table: one line per role, then (unless `brief`) each role's breakdown."""
    hardware = config.hardware
    where = f"{hardware.gpu or 'GPU'} {hardware.gpu_memory_gib:g} GiB" if _on_gpu(config) else "CPU"
    host = f"{hardware.host_memory_gib:g}" if hardware.host_memory_gib else f"{host_memory_bytes() / GIB:.1f} (this machine)"
    lines = [f"research plan: {config.name} on {where}, host RAM {host} GiB",
             f"model shape from {plans['learner_rank'].extra.get('architecture_source', '?')}", ""]
    lines.append(f"{'role':<18} {'count':>5}  {'per':<14} {'estimate GiB':>12} {'capacity GiB':>12}  fits")
    for name, role in plans.items():
        lines.append(f"{name:<18} {role.count:>5}  {role.per:<14} {role.estimate / GIB:>12.2f} "
                     f"{role.capacity / GIB:>12.2f}  {'yes' if role.fits else 'NO'}")
    for name, role in plans.items():
        if brief:
            break
        lines += ["", f"{name}:"]
        lines += [f"  {part:<40} {value / GIB:>9.3f} GiB" for part, value in role.breakdown.items()]
        if name == "learner_rank":
            x = role.extra
            chunk = x["logprob_chunk_tokens"] or "whole micro-batch"
            lines.append(f"  ZeRO-{x['zero_stage']} over {x['world_size']} ranks, {x['dtype_bytes']}-byte dtype, "
                         f"{x['parameters'] / 1e9:.3f}B parameters, micro-batch {x['micro_batch_size']} x "
                         f"{x['seq_len']} tokens, log-prob chunk {chunk}")
            acts = x["activations_gib"]
            lines.append(f"  activations: {acts['without_checkpointing']:.3f} GiB without gradient checkpointing, "
                         f"{acts['with_checkpointing']:.3f} GiB with (it is "
                         f"{'on' if x['gradient_checkpointing'] else 'off'})")
            lines.append(f"  largest micro-batch that fits: {x['max_micro_batch']}")
        if name == "rollout_engine":
            x = role.extra
            lines.append(f"  KV cache {x['kv_cache_gib']:.2f} GiB = {x['kv_tokens']:,} tokens "
                         f"({x['kv_bytes_per_token']:,} bytes each) = {x['max_length_sequences']} max-length "
                         f"sequences; max_num_seqs x max_model_len = {x['kv_tokens_wanted']:,}")
            lines.append(f"  capacity = {x['capacity_is']}")
        lines += [f"  note: {note}" for note in role.notes]
    return "\n".join(lines)


def _one_line_error(message: str) -> None:
    """argparse's error, as one line on stderr and exit code 2 like the planner's own errors."""
    print(f"research plan: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """`research plan CONFIG [key=value ...] [--json] [--launch FILE]`: per-role memory estimates and placement;
    exit code 0 when everything fits, 1 when something does not, 2 on an error."""
    import yaml

    from cluster.config import ConfigError, load_config

    parser = argparse.ArgumentParser(
        prog="research plan", description="memory estimate per role and placement on the cluster: does CONFIG fit? "
        "Exit code 0: it fits; 1: something does not fit; 2: an error.")
    parser.add_argument("config", help="a YAML file or a preset name under configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (e.g. hardware.gpu_memory_gib=80)")
    parser.add_argument("--json", action="store_true",
                        help='print {role: {"estimate_gib", "capacity_gib", "fits", ...}, "placement": [...]}')
    parser.add_argument("--logprob-chunk-tokens", type=int, default=None, metavar="N",
                        help="plan a learner that scores N tokens at a time (default: learner.logprob_chunk_tokens "
                        "when the config has it, else whole micro-batches)")
    parser.add_argument("--brief", action="store_true", help="the verdict table and the placement only")
    parser.add_argument("--launch", action="append", default=None, metavar="FILE",
                        help="place the job on the nodes of this launch file (Ray cluster YAML, KubeRay RayJob, "
                        "Slurm script) instead of hardware.launch_files; repeatable")
    parser.error = _one_line_error  # type: ignore[method-assign]
    args = parser.parse_intermixed_args(argv)
    try:
        if args.logprob_chunk_tokens is not None and args.logprob_chunk_tokens < 1:
            raise PlanError("--logprob-chunk-tokens must be >= 1")
        config = load_config(args.config, args.overrides)
        plans = plan(config, args.logprob_chunk_tokens)
        placement = check_placement(config, plans, args.launch)
    except (ConfigError, PlanError, OSError, ValueError, KeyError, yaml.YAMLError) as err:
        message = f"{type(err).__name__} {err}" if isinstance(err, KeyError) else str(err)
        print(f"research plan: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    if args.json:
        out: dict[str, Any] = {name: role.to_json() for name, role in plans.items()}
        out["placement"] = [verdict.to_json() for verdict in placement]
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(config, plans, args.brief) + "\n" + "\n".join(format_placement(placement)))
    fits = all(role.fits for role in plans.values()) and all(verdict.fits for verdict in placement)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
