"""Async client of the retrieval service, used by the rollout actors for every <search>.

It spreads attempts over the replicas (starting at a rotating one), retries timeouts, connection errors and 5xx
with exponential backoff and full jitter, and after the last retry raises RetrievalError naming every URL it tried
and the last error. It never returns None: the caller decides what a failed search means for its trajectory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from dataclasses import dataclass

import httpx

from retrieval_service.config import TOKEN_ENV, RetrievalConfig
from retrieval_service.corpus import split_contents


@dataclass(frozen=True)
class Passage:
    """One retrieved passage."""

    id: str
    title: str
    text: str
    score: float

    @property
    def contents(self) -> str:
        """The wiki-18 contents string ("Title" on the first line, then the text)."""
        return f'"{self.title}"\n{self.text}'


class RetrievalError(RuntimeError):
    """The service could not answer after every retry on every replica."""


class _ClientError(Exception):
    """A 4xx answer: retrying the same request cannot help."""


class RetrievalClient:
    """Talks to one or more service replicas through a pooled httpx.AsyncClient."""

    def __init__(
        self,
        urls: list[str],
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        token: str | None = None,
        max_connections: int = 64,
    ) -> None:
        if not urls:
            raise ValueError("RetrievalClient needs at least one service URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.retries = retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers)
        self._start = itertools.cycle(range(len(self.urls)))

    @classmethod
    def from_config(cls, config: RetrievalConfig) -> RetrievalClient:
        """A client of `config.urls` with its timeout, retries and backoff; the token is the service's
        (`server.auth_token`) or, when unset, $RESEARCH_RETRIEVAL_TOKEN, the variable `research serve` reads."""
        token = config.server.auth_token or os.environ.get(TOKEN_ENV) or None
        return cls(list(config.urls), timeout=config.timeout_s, retries=config.retries, backoff=config.backoff_s,
                   token=token)

    async def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """Top-k passages of each query (Search-R1's /retrieve with scores)."""
        if not queries:
            return []
        body = {"queries": queries, "topk": topk, "return_scores": True}
        payload = await self._post("/retrieve", body)
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalError(f"malformed /retrieve answer: expected {len(queries)} result lists")
        try:
            return [[self._passage(item) for item in hits] for hits in result]
        except (KeyError, TypeError, ValueError) as error:
            raise RetrievalError(f"malformed /retrieve answer: {type(error).__name__}: {error}") from None

    @staticmethod
    def _passage(item: dict) -> Passage:
        document = item["document"]
        title, text = split_contents(document["contents"])
        return Passage(id=str(document["id"]), title=title, text=text, score=float(item["score"]))

    async def _post(self, path: str, body: dict) -> object:
        first = next(self._start)
        tried: list[str] = []
        last_error = "no attempt made"
        for attempt in range(self.retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)] + path
            tried.append(url)
            try:
                response = await self._http.post(url, json=body)
                if response.status_code >= 500:
                    raise httpx.HTTPStatusError(
                        f"{response.status_code}: {response.text[:200]}", request=response.request, response=response
                    )
                if response.status_code >= 400:
                    raise _ClientError(f"{url} refused the request ({response.status_code}): {response.text[:300]}")
                return response.json()
            except _ClientError as error:
                raise RetrievalError(str(error)) from None
            except (httpx.HTTPError, ValueError) as error:
                last_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            if attempt < self.retries:
                # Full jitter keeps many rollout actors from retrying a recovering replica in lockstep.
                await asyncio.sleep(random.uniform(0, self.backoff * 2**attempt))
        unique = list(dict.fromkeys(tried))
        raise RetrievalError(
            f"retrieval failed after {len(tried)} attempts on {', '.join(unique)}; last error: {last_error}"
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> RetrievalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
