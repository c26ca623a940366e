"""Server-side micro-batching and the query cache.

Concurrent requests put their queries on one asyncio queue; a worker (one by default) takes what is queued (waiting at most
`max_wait_ms` for more, up to `max_batch` queries), runs one encoder forward and one faiss search for all of them in
a thread, and resolves each caller's future. The event loop never blocks on torch or faiss, and under load the
batch grows by itself: while one batch is computing the next one queues up.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from retrieval_service.retriever import Hit, Retriever, clean_query

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class QueryCache:
    """LRU map (query, topk) -> hits. Only the event loop touches it, so it needs no lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, int], list[Hit]] = OrderedDict()

    def get(self, key: tuple[str, int]) -> list[Hit] | None:
        """Cached hits, refreshed as most recently used; None on a miss."""
        hits = self._entries.get(key)
        if hits is not None:
            self._entries.move_to_end(key)
        return hits

    def put(self, key: tuple[str, int], hits: list[Hit]) -> None:
        """Store hits, evicting the least recently used entry beyond `size`."""
        if self.size <= 0:
            return
        self._entries[key] = hits
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


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


@dataclass
class _Pending:
    query: str
    topk: int
    future: asyncio.Future[list[Hit]] = field(repr=False)


class MicroBatcher:
    """Coalesces queries from concurrent requests into batched searches, with a cache in front."""

    def __init__(
        self,
        retriever: Retriever,
        metrics: SearchMetrics,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        cache_size: int = 10_000,
        enabled: bool = True,
        workers: int = 1,
    ) -> None:
        self.retriever = retriever
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.enabled = enabled
        self.cache = QueryCache(cache_size)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.num_workers = workers
        self._workers: list[asyncio.Task[None]] = []

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
        while not self._queue.empty():
            item = self._queue.get_nowait()
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
        pending = [_Pending(q, topk, loop.create_future()) for q in queries]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        self._drain_into(batch)
        if len(batch) < self.max_batch and self.max_wait_s > 0:
            # A sleep, not wait_for(queue.get()): cancelling a get on timeout can drop an item on Python 3.11.
            await asyncio.sleep(self.max_wait_s)
            self._drain_into(batch)
        return batch

    def _drain_into(self, batch: list[_Pending]) -> None:
        while len(batch) < self.max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

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
