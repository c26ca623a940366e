"""Answer normalisation and the answer metrics: exact match, cover exact match and token F1.

These follow SQuAD's evaluation script as FlashRAG and Search-R1 use it, so scores computed here are comparable
with the numbers those projects (and the ReSearch paper) report. Each metric is the maximum over the golden answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

# Only ASCII punctuation is stripped (string.punctuation), exactly as SQuAD/FlashRAG do: widening it to Unicode
# punctuation would change scores on answers with dashes or curly quotes and break comparability.
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# SQuAD/HotpotQA give no partial credit on these: "no" against "yes" must not score through shared tokens.
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lowercase, strip ASCII punctuation, remove the articles a/an/the and collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golden_list(golden_answers: str | Sequence[str]) -> list[str]:
    if isinstance(golden_answers, str):
        return [golden_answers]
    return [str(answer) for answer in golden_answers if answer is not None]


def exact_match(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised golden answer, else 0.0."""
    if not prediction:
        return 0.0
    normalized_prediction = normalize_answer(prediction)
    if not normalized_prediction:
        return 0.0
    return float(any(normalize_answer(g) == normalized_prediction for g in _golden_list(golden_answers)))


def cover_exact_match(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """1.0 if a normalised golden answer occurs inside the normalised prediction (FlashRAG's "acc"), else 0.0."""
    if not prediction:
        return 0.0
    normalized_prediction = normalize_answer(prediction)
    for golden in _golden_list(golden_answers):
        normalized_golden = normalize_answer(golden)
        # An answer that normalises to "" (e.g. "The") is a substring of everything: never count it as covered.
        if normalized_golden and normalized_golden in normalized_prediction:
            return 1.0
    return 0.0


def _token_f1(normalized_prediction: str, normalized_golden: str) -> float:
    if normalized_prediction != normalized_golden and (
        normalized_prediction in _CLOSED_ANSWERS or normalized_golden in _CLOSED_ANSWERS
    ):
        return 0.0
    prediction_tokens = normalized_prediction.split()
    golden_tokens = normalized_golden.split()
    num_same = sum((Counter(prediction_tokens) & Counter(golden_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(golden_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalised prediction, maximised over golden answers; yes/no/noanswer match exactly."""
    if not prediction:
        return 0.0
    normalized_prediction = normalize_answer(prediction)
    if not normalized_prediction:
        return 0.0
    return max((_token_f1(normalized_prediction, normalize_answer(g)) for g in _golden_list(golden_answers)),
               default=0.0)
