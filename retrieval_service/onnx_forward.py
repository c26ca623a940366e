"""Small query forwards on CPU through ONNX Runtime: the encoder exported with torch.onnx.export, cached on disk.

On this project's CPUs ONNX Runtime ran MiniLM's one-query forward 2.7x faster than PyTorch fp32 and 1.5x faster than
PyTorch bf16, with the same top-1 passage for 300 of 300 queries and cosine 1.00000 to the fp32 vectors
(`python -m bench.query_encoder`, bench/RESULTS.md); batched, torch bf16 is faster, so the Encoder sends only forwards
of a few queries here. Only the forward moves: tokenisation, batching, pooling and normalisation stay the Encoder's,
and passages (hence indexes) are always encoded by PyTorch in fp32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from retrieval_service.config import cache_root


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the exporter's `onnx` package are installed."""
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


class _Positional(torch.nn.Module):
    """The model called with its inputs by keyword (the exporter passes them by position) -> last hidden state."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state."""
        return self.model(**dict(zip(self.names, inputs, strict=True))).last_hidden_state


def export_cache_dir() -> Path:
    """Where exported encoders are kept: onnx/ under the project's cache root."""
    return cache_root() / "onnx"


def export_key(model_dir: Path, names: list[str]) -> str:
    """Hash of what the exported graph depends on: the model files (name, size, mtime), torch's version, the inputs."""
    files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(model_dir).iterdir() if p.is_file())
    inputs = f"{Path(model_dir).resolve()}|{files}|{torch.__version__}|{names}"
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


class OnnxForward:
    """The encoder model's forward as an ONNX Runtime session, called like the model (keyword tensors in, an object
    with last_hidden_state out). The graph is exported once per model and torch version, then loaded from the cache
    (an export costs ~1.5 s; a service, a replica and every test that starts one would pay it)."""

    def __init__(self, model: torch.nn.Module, threads: int, model_dir: Path) -> None:
        import onnxruntime

        uses_types = getattr(model.config, "type_vocab_size", 0) > 1
        self.names = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_types else [])
        path = export_cache_dir() / f"{export_key(model_dir, self.names)}.onnx"
        if not path.is_file():
            export(model, self.names, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        """One forward: the last hidden state as a torch tensor."""
        (hidden,) = self.session.run(["last_hidden_state"], {n: batch[n].numpy() for n in self.names})
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def export(model: torch.nn.Module, names: list[str], path: Path) -> None:
    """torch.onnx.export of the model's forward with dynamic batch and length, written atomically to `path`."""
    example = tuple(torch.ones(1, 8, dtype=torch.long) for _ in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        with torch.no_grad():
            # In eval mode: the exporter restores the wrapper's mode afterwards, and a new Module is in train mode,
            # which would switch on the shared model's dropout for every later passage encode.
            torch.onnx.export(_Positional(model, names).eval(), example, str(partial), input_names=names,
                              output_names=["last_hidden_state"], dynamic_axes=axes, dynamo=False)
        os.replace(partial, path)
