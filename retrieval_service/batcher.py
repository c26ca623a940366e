"""Server-side micro-batching and the query cache.

Concurrent requests queue their queries, one queue per request; a worker (one by default) takes what is queued
(waiting at most `max_wait_ms` for more, up to `max_batch` queries), runs one encoder forward and one faiss search for
all of them in a thread, and resolves each caller's future. The event loop never blocks on torch or faiss, and under
load the batch grows by itself: while one batch is computing the next one queues up.

Queries are taken round-robin across requests, not first-come first-served, and a batch holds at most
`max_batch_chars` characters of queries (its encoder cost grows with their length). So a request of 256 queries of
2,048 characters is served as 32 small batches, and a one-query request that arrives meanwhile waits for the batch in
flight and rides in the next one (1.3 s) instead of waiting for the whole big request (20.0 s; bench/retrieval_fairness.py
on 2 shared cores).
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from retrieval_service.retriever import Hit, Retriever, clean_query

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


_ENTRY_OVERHEAD = 200
"""Bytes of one cache entry besides its strings: the OrderedDict slot, the key tuple and int, the hit list."""
_HIT_OVERHEAD = 400
"""Bytes of one hit besides its strings: the Hit object and its __dict__, the document dict, the float score."""


def entry_bytes(key: tuple[str, int], hits: list[Hit]) -> int:
    """Estimated memory of one cache entry: its strings as CPython stores them, plus fixed per-object overheads."""
    size = _ENTRY_OVERHEAD + sys.getsizeof(key[0])
    for hit in hits:
        size += _HIT_OVERHEAD + sum(sys.getsizeof(value) for value in hit.document.values())
    return size


class QueryCache:
    """LRU map (query, topk) -> hits, bounded in entries and in estimated bytes; only the event loop touches it."""

    def __init__(self, size: int, max_bytes: int | None = None) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, int], tuple[list[Hit], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, int]) -> list[Hit] | None:
        """Cached hits, refreshed as most recently used; None on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: tuple[str, int], hits: list[Hit]) -> None:
        """Store hits, evicting least recently used entries beyond `size` entries or `max_bytes` bytes."""
        if self.size <= 0:
            return
        size = entry_bytes(key, hits)
        if self.max_bytes is not None and size > self.max_bytes:
            return  # would evict everything else and still not fit
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.bytes -= previous[1]
        self._entries[key] = (hits, size)
        self.bytes += size
        while len(self._entries) > self.size or (self.max_bytes is not None and self.bytes > self.max_bytes):
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted


class SearchMetrics:
    """Prometheus series of one service, in its own registry so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "retrieval_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.queries = Counter("retrieval_queries", "Queries received", registry=self.registry)
        self.cache_hits = Counter("retrieval_cache_hits", "Queries answered from the cache", registry=self.registry)
        self.cache_misses = Counter("retrieval_cache_misses", "Queries that needed a search", registry=self.registry)
        self.batch_size = Histogram(
            "retrieval_batch_size", "Queries per encoder forward", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.latency = Histogram(
            "retrieval_request_seconds", "Request latency by endpoint", ["endpoint"], registry=self.registry
        )
        self.search_seconds = Histogram(
            "retrieval_search_seconds", "Encoder forward + faiss search time per batch", registry=self.registry
        )
        self.cache_bytes = Gauge(
            "retrieval_cache_bytes", "Estimated memory of the query cache, bytes", registry=self.registry
        )
        self.cache_entries = Gauge("retrieval_cache_entries", "Entries in the query cache", registry=self.registry)


@dataclass
class _Pending:
    query: str
    topk: int
    future: asyncio.Future[list[Hit]] = field(repr=False)


class MicroBatcher:
    """Coalesces queries from concurrent requests into batched searches, fairly across requests, with a cache in front."""

    def __init__(
        self,
        retriever: Retriever,
        metrics: SearchMetrics,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        cache_size: int = 10_000,
        enabled: bool = True,
        workers: int = 1,
        cache_max_bytes: int | None = None,
        max_batch_chars: int | None = None,
    ) -> None:
        self.retriever = retriever
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_batch_chars = max_batch_chars
        self.max_wait_s = max_wait_ms / 1000.0
        self.enabled = enabled
        self.cache = QueryCache(cache_size, cache_max_bytes)
        metrics.cache_bytes.set_function(lambda: self.cache.bytes)
        metrics.cache_entries.set_function(lambda: len(self.cache))
        # One queue per request with queries waiting, in the order they are next served (see _take_into).
        self._requests: deque[deque[_Pending]] = deque()
        self._queued = asyncio.Event()
        self.num_workers = workers
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight = 0  # requests between arrival and answer (queued or being searched)

    def start(self) -> None:
        """Start the batch workers on the running event loop."""
        if self.enabled and not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._run(), name=f"batcher-{i}") for i in range(self.num_workers)]

    async def stop(self) -> None:
        """Stop the workers; queued queries fail rather than hang."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        while self._requests:
            for item in self._requests.popleft():
                if not item.future.done():
                    item.future.set_exception(RuntimeError("retrieval service is shutting down"))

    async def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Hits for each query, from the cache or from a (batched) search."""
        queries = [clean_query(q) for q in queries]
        self.metrics.queries.inc(len(queries))
        results: list[list[Hit] | None] = [self.cache.get((q, topk)) for q in queries]
        missing = [i for i, hits in enumerate(results) if hits is None]
        self.metrics.cache_hits.inc(len(queries) - len(missing))
        self.metrics.cache_misses.inc(len(missing))
        if missing:
            fresh = await self._search_uncached([queries[i] for i in missing], topk)
            for i, hits in zip(missing, fresh, strict=True):
                results[i] = hits
                self.cache.put((queries[i], topk), hits)
        return [hits or [] for hits in results]

    async def _search_uncached(self, queries: list[str], topk: int) -> list[list[Hit]]:
        if not self.enabled:
            # Baseline without coalescing: one forward per request, as Search-R1's server does.
            self.metrics.batch_size.observe(len(queries))
            with self.metrics.search_seconds.time():
                return await asyncio.to_thread(self.retriever.search, queries, topk)
        loop = asyncio.get_running_loop()
        pending = deque(_Pending(q, topk, loop.create_future()) for q in queries)
        futures = [item.future for item in pending]
        self._requests.append(pending)
        self._queued.set()
        self._in_flight += 1
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self._in_flight -= 1

    async def _next_batch(self) -> list[_Pending]:
        while not self._requests:
            self._queued.clear()
            await self._queued.wait()
        batch: list[_Pending] = []
        if not self._take_into(batch) and self.max_wait_s > 0 and self._in_flight > 1:
            # Room left and other clients active: give them max_wait to add theirs (how a batch grows under load).
            # A lone request does not wait: with one client nobody else is coming, and the wait was pure latency.
            await asyncio.sleep(self.max_wait_s)
            self._take_into(batch)
        return batch

    def _take_into(self, batch: list[_Pending]) -> bool:
        """Add one query of each waiting request in turn (so none waits behind another's); True once the batch is full."""
        chars = sum(len(item.query) for item in batch)
        while self._requests:
            if len(batch) >= self.max_batch:
                return True
            request = self._requests[0]
            if request[0].future.done():  # its request was cancelled: take no room for it
                request.popleft()
                if not request:
                    self._requests.popleft()
                continue
            size = len(request[0].query)
            if batch and self.max_batch_chars is not None and chars + size > self.max_batch_chars:
                return True  # that query leads the next batch
            self._requests.popleft()
            batch.append(request.popleft())
            chars += size
            if request:
                # To the back: the rotation carries over to the next batch, so a big request does not restart first.
                self._requests.append(request)
        return len(batch) >= self.max_batch

    async def _run(self) -> None:
        while True:
            batch = [item for item in await self._next_batch() if not item.future.done()]
            if not batch:
                continue
            # Identical queries in one batch are searched once.
            unique = list(dict.fromkeys(item.query for item in batch))
            topk = max(item.topk for item in batch)
            self.metrics.batch_size.observe(len(unique))
            try:
                with self.metrics.search_seconds.time():
                    found = await asyncio.to_thread(self.retriever.search, unique, topk)
            except Exception as error:  # resolve every waiter; the worker itself must survive
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            by_query = dict(zip(unique, found, strict=True))
            for item in batch:
                if not item.future.done():
                    item.future.set_result(by_query[item.query][: item.topk])
