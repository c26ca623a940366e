"""DeepSpeed plumbing of a learner rank: the process group, the DeepSpeed config, ZeRO-3 loading and gathering.

The policy (learner.engine) and the frozen reference (learner.reference) are both built from here, so the two never
disagree on dtype, ZeRO stage or how a partitioned model is loaded.
"""

from __future__ import annotations

import atexit
import importlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from learner.config import LearnerConfig


def disable_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling deepspeed_shm_comm at init (~25 s and 66 MB of /dev/shm per rank on CPU)."""
    # importlib, not `import deepspeed.ops`: Ray actors cannot cloudpickle a module bound at import time.
    ops = importlib.import_module("deepspeed.ops")
    ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(
    rank: int | None = None, world_size: int | None = None, master_addr: str | None = None, master_port: int | None = None,
    listener: socket.socket | None = None, node_ip: str | None = None,
) -> None:
    """Join (or create) DeepSpeed's default process group: gloo on CPU, NCCL on GPU; a no-op if one exists.

    Arguments left None come from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), else a
    one-process group on 127.0.0.1 and a free port. With an explicit `master_addr` (Learner actors) the rendezvous
    store is built here: rank 0 serves it on master_addr only (on `listener` when given, already bound there), where
    DeepSpeed's env:// rendezvous would serve it on every interface; `node_ip` is this rank's own address, whose
    interface gloo uses unless $GLOO_SOCKET_IFNAME says otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed
    from torch.distributed.elastic.utils.distributed import get_free_port

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    disable_shm_comm()
    explicit = master_addr is not None
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    master_addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    if listener is not None:
        master_port = int(listener.getsockname()[1])
    master_port = master_port or int(os.environ.get("MASTER_PORT", 0)) or get_free_port()
    os.environ.update(RANK=str(rank), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"), WORLD_SIZE=str(world_size),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if explicit:
        from weight_transfer.transport import serve_store

        if backend == "gloo" and node_ip and not os.environ.get("GLOO_SOCKET_IFNAME"):
            # The default group's gloo device comes from $GLOO_SOCKET_IFNAME, else from what the hostname resolves
            # to (init_process_group takes no gloo options): pin it to the network the node address is on.
            os.environ["GLOO_SOCKET_IFNAME"] = interface_of(node_ip)
        timeout = dist.default_pg_timeout  # what the env:// rendezvous would use, for the store and collectives
        if rank == 0:
            store = serve_store(master_addr, world_size, timeout.total_seconds(), port=master_port, listener=listener)
        else:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    # With a group already up, DeepSpeed only wraps it (deepspeed.comm.init_distributed -> TorchBackend).
    deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=world_size, verbose=False)
    # Single-process ZeRO-3 aborts at interpreter exit while a process group is still alive.
    atexit.register(destroy_distributed)


def interface_of(ip: str) -> str:
    """The network interface that carries `ip` (the loopback interface for any 127.x address)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address.split("%")[0] == ip for address in addresses):
            return name
    if ipaddress.ip_address(ip).is_loopback:
        return next((name for name, addresses in psutil.net_if_addrs().items()
                     if any(a.address == "127.0.0.1" for a in addresses)), "lo")
    raise ValueError(f"no network interface carries {ip}")


def destroy_distributed() -> None:
    """Destroy the default process group if one is alive (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where tensors for collectives on the default group must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    return device_for_backend(dist.get_backend() if dist.is_initialized() else None)


def device_for_backend(backend: str | None, cuda_index: int | None = None) -> torch.device:
    """The device of a collective's tensors on a group of `backend`: cuda (the current device unless `cuda_index`)
    for NCCL, else the CPU (gloo, or no group)."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device("cpu")


def resolve_dtype(config: LearnerConfig) -> torch.dtype:
    """The training dtype: bf16 on GPU and fp32 on CPU unless the config names one."""
    if config.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]


def deepspeed_config(config: LearnerConfig, trainable: bool = True) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from the learner config (`trainable=False`: the frozen reference's)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trainable:
        # Accumulation boundaries are set by hand in train_step; the batch size here is only bookkeeping.
        ds.update(gradient_accumulation_steps=1, gradient_clipping=config.grad_clip, zero_allow_untested_optimizer=True)
    if resolve_dtype(config) == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
        if trainable and config.zero_stage > 0:
            # Without it DeepSpeed 0.19.8 sums micro-batch gradients in bf16. With it, stage 1 becomes the
            # BF16_Optimizer (fp32 gradient buffers) and stages 2-3 keep fp32 gradient partitions. Stage 0 raises
            # NotImplementedError on this mix, so there bf16 accumulation stays (use stage >= 1 to avoid it).
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if config.zero_stage == 3:
        # Gather whole layers at once on small models; big models still prefetch in bounded buckets.
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
    return ds


@contextmanager
def partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, `from_pretrained` inside this block builds the model under deepspeed.zero.Init: each rank
    materialises only its 1/world share of every weight, so a 32B policy never has to fit whole on one rank.
    Scoped, because transformers reads it from a process-wide reference."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def load_model(config: LearnerConfig, model_path: str, trainable: bool) -> torch.nn.Module:
    """The policy (fp32 master weights) or the frozen reference (training dtype), partitioned under ZeRO-3."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if trainable else resolve_dtype(config)
    with partitioned_loading(deepspeed_config(config, trainable)):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.config.use_cache = False
    return model


def gathered(parameters: Sequence[torch.nn.Parameter], zero3: bool) -> Any:
    """A context in which ZeRO-3 parameters hold their full data (a collective: every rank enters it); a no-op at
    other stages."""
    if not zero3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=None)
