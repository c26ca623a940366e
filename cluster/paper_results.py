"""The ReSearch paper's reported results, shown beside ours when an eval's policy is one the paper trained.

Source: Chen et al., "ReSearch: Learning to Reason with Search for LLMs via Reinforcement Learning", arXiv 2503.19470,
Table 2, "Exact Match (EM, %) and LLM-as-a-Judge (LJ, %) results on multi-hop question answering benchmarks"
(full dev sets of HotpotQA, 2WikiMultiHopQA and MuSiQue, Bamboogle test; E5-base-v2 over wiki-18, top-5; judge
gpt-4o-mini). Only the ReSearch rows are kept; values are percentages exactly as printed.
"""

from __future__ import annotations

import re

PAPER = "ReSearch (arXiv 2503.19470, Table 2)"

BENCHMARKS = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
"""Canonical benchmark names, in the paper's column order."""

# model -> benchmark -> (EM %, LJ %)
PAPER_RESULTS: dict[str, dict[str, tuple[float, float]]] = {
    "ReSearch-Qwen-7B": {
        "hotpotqa": (40.57, 60.26), "2wikimultihopqa": (44.67, 50.06),
        "musique": (21.68, 32.19), "bamboogle": (43.20, 54.40),
    },
    "ReSearch-Qwen-7B-Instruct": {
        "hotpotqa": (43.52, 63.62), "2wikimultihopqa": (47.59, 54.22),
        "musique": (22.30, 33.43), "bamboogle": (42.40, 54.40),
    },
    "ReSearch-Qwen-32B": {
        "hotpotqa": (42.77, 64.27), "2wikimultihopqa": (38.52, 45.59),
        "musique": (26.40, 37.57), "bamboogle": (54.40, 66.40),
    },
    "ReSearch-Qwen-32B-Instruct": {
        "hotpotqa": (46.73, 67.70), "2wikimultihopqa": (44.90, 50.30),
        "musique": (26.40, 38.56), "bamboogle": (56.80, 67.20),
    },
}

_SIZE = re.compile(r"(?<![0-9.])(7|32)b(?![a-z0-9])")


def paper_model(policy_name: str) -> str | None:
    """The paper's row for a policy: Qwen2.5-7B/32B (-Instruct) or the released ReSearch-Qwen-* models, else None."""
    name = policy_name.lower().replace("_", "-")
    if "qwen" not in name:
        return None
    is_research = "research" in name
    if not is_research and "qwen2.5" not in name and "qwen-2.5" not in name:
        return None
    match = _SIZE.search(name)
    if match is None:
        return None
    size = match.group(1)
    return f"ReSearch-Qwen-{size}B" + ("-Instruct" if "instruct" in name else "")


def canonical_benchmark(text: str) -> str | None:
    """The paper benchmark a file or name refers to (hotpotqa, 2wikimultihopqa, musique, bamboogle), else None."""
    lowered = text.lower()
    for key, needles in (("2wikimultihopqa", ("2wiki", "wikimultihop", "wikihop")), ("hotpotqa", ("hotpot",)),
                         ("musique", ("musique",)), ("bamboogle", ("bamboogle",))):
        if any(needle in lowered for needle in needles):
            return key
    return None


def paper_numbers(policy_name: str, benchmark: str) -> tuple[str, float, float] | None:
    """(paper model, EM %, LJ %) the paper reports for this policy on this benchmark, or None."""
    model = paper_model(policy_name)
    key = canonical_benchmark(benchmark)
    if model is None or key is None:
        return None
    em, lj = PAPER_RESULTS[model][key]
    return model, em, lj
