"""Peak memory and time of the LM head's logprobs, chunked (learner.logprobs) vs the full computation.

(Run it with -m from the repository root: as a file, its name would shadow the `learner` package.)
Qwen2.5-7B's LM head shape (hidden 3,584, vocab 152,064) with random fp32 weights on CPU; random hidden states of
`--tokens` tokens (requires_grad) go through learner.logprobs.head_logprobs with the entropy, then backward of a
per-token weighted sum of the logprobs, which fills the gradients of the hidden states and of the head's weight.

Each variant runs in a fresh subprocess, so its peak is its own: peak = ru_maxrss at the end minus the resident
size once the inputs (weight, hidden states) exist. "net" also subtracts the gradients the backward must return
(weight 2.2 GB, hidden states), the same bytes for every variant: what remains is the working memory of the
log-softmax, the thing the chunking is for. Time is the child's CPU time (all threads), which other users of a
shared machine disturb far less than wall time (both are printed). Goal: net peak <= 0.1x and time <= 1.2x of full.
`--compare-checkpoint` adds torch.utils.checkpoint per chunk, the alternative to the custom autograd.Function.

    python -m bench.logprob_memory [--tokens 4096] [--chunk-tokens 1024] [--temperature 1.0] [--compare-checkpoint]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

from learner.logprobs import DEFAULT_CHUNK_TOKENS, full_logprobs_from_logits, head_logprobs

HIDDEN, VOCAB = 3584, 152064  # Qwen2.5-7B


def resident_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    """The process's largest resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def checkpointed_head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    with_entropy: bool,
    temperature: float,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The alternative design: torch.utils.checkpoint around each chunk's head call and full log-softmax."""
    valid = torch.ones_like(targets[:, :1], dtype=torch.bool)
    pieces, entropies = [], []
    for start in range(0, targets.shape[1], chunk_tokens):
        stop = min(start + chunk_tokens, targets.shape[1])

        def chunk(piece: torch.Tensor, start: int = start, stop: int = stop) -> tuple[torch.Tensor, torch.Tensor]:
            logprobs, entropy = full_logprobs_from_logits(
                head(piece), targets[:, start:stop], valid, with_entropy, temperature
            )
            return logprobs, entropy if entropy is not None else logprobs.detach()

        logprobs, entropy = checkpoint(chunk, hidden[:, start:stop], use_reentrant=False)
        pieces.append(logprobs)
        entropies.append(entropy)
    return torch.cat(pieces, dim=1), torch.cat(entropies, dim=1) if with_entropy else None


def run_variant(variant: str, tokens: int, chunk_tokens: int, temperature: float) -> dict[str, float]:
    """Forward + backward of one variant in this process; its seconds, memory and checksums."""
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02)  # in place: no transient second copy to inflate the baseline
    hidden = torch.randn(1, tokens, HIDDEN).requires_grad_()
    targets = torch.randint(0, VOCAB, (1, tokens))
    weights = torch.randn(1, tokens)
    baseline = resident_bytes()
    peak_before = peak_resident_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    if variant == "full":
        logprobs, entropy = head_logprobs(head, hidden, targets, None, True, temperature, chunk_tokens=None)
    elif variant == "chunked":
        logprobs, entropy = head_logprobs(head, hidden, targets, None, True, temperature, chunk_tokens=chunk_tokens)
    elif variant == "checkpoint":
        logprobs, entropy = checkpointed_head_logprobs(head, hidden, targets, True, temperature, chunk_tokens)
    else:
        raise ValueError(variant)
    forward_seconds = time.perf_counter() - started
    (logprobs * weights).sum().backward()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    gradient_bytes = head.weight.grad.numel() * 4 + hidden.grad.numel() * 4
    peak = peak_resident_bytes() - baseline
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "forward_seconds": forward_seconds,
        "peak_gb": peak / 1e9,
        "net_peak_gb": (peak - gradient_bytes) / 1e9,
        "baseline_gb": baseline / 1e9,
        "baseline_peak_gb": peak_before / 1e9,  # ru_maxrss before the run: close to baseline_gb, or peaks hide
        "logprob_sum": float(logprobs.detach().sum()),
        "entropy_sum": float(entropy.sum()),
        "weight_grad_norm": float(head.weight.grad.norm()),
        "hidden_grad_norm": float(hidden.grad.norm()),
    }


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one variant in a fresh interpreter and return its JSON result line."""
    command = [
        sys.executable, "-m", "bench.logprob_memory", "--child", variant, "--tokens", str(args.tokens),
        "--chunk-tokens", str(args.chunk_tokens), "--temperature", str(args.temperature),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    """Measure the variants one after the other and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens through the head (8,192 needs > 24 GiB)")
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--compare-checkpoint", action="store_true", help="also time torch.utils.checkpoint")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.tokens, args.chunk_tokens, args.temperature)))
        return

    variants = ["full", "chunked"] + (["checkpoint"] if args.compare_checkpoint else [])
    print(
        f"LM head {HIDDEN} x {VOCAB} fp32, {args.tokens} tokens, chunks of {args.chunk_tokens}, "
        f"temperature {args.temperature}, with entropy, {torch.get_num_threads()} threads"
    )
    results = {}
    for variant in variants:
        results[variant] = result = measure(variant, args)
        print(
            f"{variant:>10}: CPU {result['cpu_seconds']:7.1f} s, wall {result['seconds']:6.1f} s "
            f"(forward {result['forward_seconds']:.1f} s)  "
            f"peak {result['peak_gb']:6.2f} GB  net of gradients {result['net_peak_gb']:6.2f} GB  "
            f"(baseline {result['baseline_gb']:.2f} GB, its ru_maxrss {result['baseline_peak_gb']:.2f} GB)",
            flush=True,
        )
    full = results["full"]
    for variant in variants[1:]:
        for key in ("logprob_sum", "entropy_sum", "weight_grad_norm", "hidden_grad_norm"):
            # The same computation: checksums agree to fp32 summation noise.
            if abs(results[variant][key] - full[key]) > 1e-4 * max(1.0, abs(full[key])):
                raise SystemExit(f"{variant} disagrees with full on {key}: {results[variant][key]} vs {full[key]}")
    chunked = results["chunked"]
    if "checkpoint" in results:
        checkpointed = results["checkpoint"]
        print(f"checkpoint / chunked CPU time: {checkpointed['cpu_seconds'] / chunked['cpu_seconds']:.2f}x")
    print(f"raw peak ratio (gradients included): {chunked['peak_gb'] / full['peak_gb']:.3f}")
    print(f"wall-time ratio: {chunked['seconds'] / full['seconds']:.3f}")
    print(
        f"peak_ratio={chunked['net_peak_gb'] / full['net_peak_gb']:.3f} "
        f"time_ratio={chunked['cpu_seconds'] / full['cpu_seconds']:.3f}"
    )


if __name__ == "__main__":
    main()
