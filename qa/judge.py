"""LLM-as-a-Judge: asks a chat model whether a predicted answer means the same as any golden answer.

Any OpenAI-compatible `/chat/completions` endpoint serves as the judge: a vLLM server started next to the eval, or a
hosted API whose key is read from an environment variable. Calls use temperature 0 under a concurrency limit, and
verdicts are cached on disk (keyed by judge model, question, prediction and golden answers), so a resumed or repeated
eval never pays twice. A reply that is not the JSON verdict asked for is retried, then recorded as "unjudged":
never counted as correct, never an exception.

The prompt is the ReSearch paper's (arXiv 2503.19470, Appendix A, "Prompt for LLM-as-a-Judge"); the paper's judge
was gpt-4o-mini.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

JUDGE_PROMPT = """You will be given a question and its ground truth answer list where each item can be a ground truth answer. \
Provided a pred_answer, you need to judge if the pred_answer correctly answers the question based on the ground truth answer list. \
You should first give your rationale for the judgement, and then give your judgement result (i.e., correct or incorrect).

Here is the criteria for the judgement:
1. The pred_answer doesn't need to be exactly the same as any of the ground truth answers, but should be semantically same for the question.
2. Each item in the ground truth answer list can be viewed as a ground truth answer for the question, and the pred_answer should be semantically same to at least one of them.

question: {question}
ground truth answers: {gt_answer}
pred_answer: {pred_answer}

The output should in the following json format:
```json
{{
    "rationale": "your rationale for the judgement, as a text",
    "judgement": "your judgement result, can only be 'correct' or 'incorrect'"
}}
```
Your output:"""
"""The paper's judge prompt (Appendix A), with {question}, {gt_answer} and {pred_answer} to fill in."""

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "rationale": {"type": "string"},
        "judgement": {"type": "string", "enum": ["correct", "incorrect"]},
    },
    "required": ["rationale", "judgement"],
}
"""JSON schema of a verdict, sent as `response_format` when structured output is asked for."""

Status = Literal["correct", "incorrect", "unjudged"]
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass
class JudgeSettings:
    """Where the judge lives and how hard to push it."""

    base_url: str
    """OpenAI-style base URL including the version prefix, e.g. http://127.0.0.1:8001/v1 or https://api.openai.com/v1."""
    model: str
    """Model name the endpoint serves (the paper: gpt-4o-mini)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key; unset or empty means no Authorization header (a local server)."""
    concurrency: int = 8
    """Requests in flight at once."""
    max_attempts: int = 3
    """Attempts per verdict (invalid JSON, 5xx, 429 and connection errors are retried)."""
    timeout_s: float = 60.0
    """Timeout of one HTTP request."""
    max_tokens: int = 512
    """Completion budget of one verdict."""
    backoff_s: float = 0.5
    """Base of the exponential backoff between attempts."""
    structured_output: bool = False
    """Send VERDICT_SCHEMA as response_format (vLLM and OpenAI support it; some hosted APIs do not)."""


@dataclass
class Verdict:
    """The judge's decision on one prediction: correct, incorrect, or unjudged (with the reason)."""

    status: Status
    rationale: str = ""
    error: str | None = None
    """Why the verdict is missing, for unjudged ones."""
    cached: bool = False

    @property
    def correct(self) -> bool:
        """True only for a verdict the judge actually gave as correct."""
        return self.status == "correct"

    def to_json(self) -> dict[str, Any]:
        """The verdict as a JSON-ready dict (what eval records store)."""
        return asdict(self)


def parse_verdict(text: str) -> tuple[Status, str]:
    """(judgement, rationale) from a judge reply; raises ValueError when it is not the JSON verdict asked for."""
    candidates = [match.group(1) for match in _FENCE.finditer(text)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            obj = json.loads(candidate.strip())
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        judgement = str(obj.get("judgement", "")).strip().strip("'\"").lower()
        if judgement in ("correct", "incorrect"):
            return judgement, str(obj.get("rationale", "")).strip()  # type: ignore[return-value]
        raise ValueError(f"judgement must be 'correct' or 'incorrect', got {obj.get('judgement')!r}")
    raise ValueError(f"reply is not a JSON verdict: {text[:120]!r}")


def build_judge_prompt(question: str, prediction: str, golden_answers: Sequence[str]) -> str:
    """The paper's judge prompt for one prediction."""
    return JUDGE_PROMPT.format(question=question, gt_answer=list(golden_answers), pred_answer=prediction)


def cache_key(model: str, question: str, prediction: str, golden_answers: Sequence[str]) -> str:
    """Stable key of one verdict: a different judge, question, prediction or answer list is a different verdict."""
    payload = json.dumps([model, question, prediction, list(golden_answers)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """Verdicts on disk as JSON Lines {key, status, rationale}; only real verdicts are stored, never unjudged ones."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._entries: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            with self.path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short by a killed process: that verdict is simply asked again

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Verdict | None:
        """The cached verdict for key, if any."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        return Verdict(status=entry["status"], rationale=entry.get("rationale", ""), cached=True)  # type: ignore[arg-type]

    def put(self, key: str, verdict: Verdict) -> None:
        """Remember a real verdict (appended to the file at once, so an interrupted eval keeps it)."""
        if verdict.status == "unjudged":
            return
        entry = {"key": key, "status": verdict.status, "rationale": verdict.rationale}
        with self._lock:
            self._entries[key] = entry
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry, ensure_ascii=False) + "\n")


class LLMJudge:
    """A judge client: `await judge(question, prediction, golden_answers)` -> Verdict; use as an async context."""

    def __init__(self, settings: JudgeSettings, cache_path: str | Path | None = None) -> None:
        self.settings = settings
        self.cache = VerdictCache(cache_path)
        self.requests = 0
        """HTTP requests sent so far (cache hits send none)."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._client = httpx.AsyncClient(headers=headers, timeout=settings.timeout_s)
        self._slots = asyncio.Semaphore(settings.concurrency)

    async def __aenter__(self) -> LLMJudge:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    def _body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": self.settings.max_tokens,
        }
        if self.settings.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True},
            }
        return body

    async def _attempt(self, body: dict[str, Any]) -> tuple[Verdict | None, str, bool]:
        """One request: (verdict or None, error text, whether another attempt may help)."""
        self.requests += 1
        try:
            response = await self._client.post(self._url, json=body)
        except httpx.HTTPError as error:
            return None, f"request failed: {type(error).__name__}: {error}", True
        if response.status_code != 200:
            reason = f"HTTP {response.status_code}: {response.text[:200]}"
            return None, reason, response.status_code in _RETRYABLE_STATUS
        try:
            content = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"not a chat completion: {response.text[:200]}", True
        try:
            status, rationale = parse_verdict(content)
        except ValueError as error:
            return None, str(error), True
        return Verdict(status=status, rationale=rationale), "", False

    async def judge(self, question: str, prediction: str | None, golden_answers: Sequence[str]) -> Verdict:
        """The verdict on one prediction; an empty prediction is incorrect without asking."""
        if not prediction or not prediction.strip():
            return Verdict(status="incorrect", rationale="the response has no extracted answer")
        key = cache_key(self.settings.model, question, prediction, golden_answers)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        body = self._body(build_judge_prompt(question, prediction, golden_answers))
        error = "no attempt made"
        async with self._slots:
            for attempt in range(self.settings.max_attempts):
                if attempt:
                    await asyncio.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
                verdict, error, retry = await self._attempt(body)
                if verdict is not None:
                    self.cache.put(key, verdict)
                    return verdict
                if not retry:
                    break
        return Verdict(status="unjudged", error=error)

    async def judge_many(self, items: Sequence[tuple[str, str | None, Sequence[str]]]) -> list[Verdict]:
        """Verdicts for (question, prediction, golden_answers) triples, in order, at most `concurrency` at once."""
        return list(await asyncio.gather(*(self.judge(q, p, g) for q, p, g in items)))
