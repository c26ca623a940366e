"""The FastAPI retrieval service: Search-R1's /retrieve and ReSearch's /batch_search and /search on one index.

Both projects' clients work unchanged:
    POST /retrieve      {"queries": [...], "topk": k, "return_scores": bool}
                        -> {"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}
                           (without return_scores: {"result": [[{"id", "contents"}, ...], ...]})
    POST /batch_search  {"query": [...], "top_n": k, "return_score": bool}
                        -> [[{"id", "contents"}, ...], ...]   or   [that, [[score, ...], ...]]
    POST /search        {"query": "...", "top_n": k, "return_score": bool}
                        -> [{"id", "contents"}, ...]          or   [that, [score, ...]]
    GET  /health        200 {"status": "ready", ...} once the index is loaded, 503 before
    GET  /metrics       Prometheus text
Every input problem is a 4xx with a reason: too many queries, too long a query, top-k out of range, too large a body,
malformed JSON, a missing or wrong bearer token. An empty query is answered like any other. Below the app, the HTTP
protocol (http_limits.py) answers too large or too many headers (431), too slow a client (408) and too many
connections (503); `uvicorn_config` puts it in place.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from retrieval_service.batcher import MicroBatcher, SearchMetrics
from retrieval_service.config import RetrievalConfig, ServerConfig
from retrieval_service.process import free_port, wait_healthy
from retrieval_service.retriever import Hit, Retriever

if TYPE_CHECKING:
    import uvicorn


class RetrieveRequest(BaseModel):
    """Search-R1's request."""

    model_config = ConfigDict(extra="ignore")

    queries: list[str] = Field(description="Queries to search.")
    topk: int | None = Field(None, description="Passages per query; unset or 0 = the service default.")
    return_scores: bool = Field(False, description="Wrap each passage as {document, score}.")


class BatchSearchRequest(BaseModel):
    """ReSearch's (FlashRAG's) batch request."""

    model_config = ConfigDict(extra="ignore")

    query: list[str] = Field(description="Queries to search.")
    top_n: int | None = Field(None, description="Passages per query; unset = the service default.")
    return_score: bool = Field(False, description="Answer [passages, scores] instead of passages.")


class SearchRequest(BaseModel):
    """ReSearch's (FlashRAG's) single-query request."""

    model_config = ConfigDict(extra="ignore")

    query: str = Field(description="The query.")
    top_n: int | None = Field(None, description="Passages; unset = the service default.")
    return_score: bool = Field(False, description="Answer [passages, scores] instead of passages.")


class BodySizeLimit:
    """ASGI middleware: reads at most `max_bytes` of a request body, else answers 413 before the app sees it."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(send, "request body larger than the limit" if declared.isdigit() else "bad Content-Length")
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reject(send, "request body larger than the limit")
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Callable, reason: str) -> None:
        payload = json.dumps({"detail": f"{reason} ({self.max_bytes} bytes)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


_KNOWN_PATHS = {"/retrieve", "/batch_search", "/search", "/health", "/metrics"}


class RequestCounter:
    """ASGI middleware: counts requests by endpoint and status and times them (pure ASGI: no per-request task)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: SearchMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, answered = 500, False  # an escaping exception is answered 500 by the error middleware outside

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
            if not answered:
                status = 499  # the client went away before an answer (nginx's code for it)
        finally:
            endpoint = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _document(hit: Hit) -> dict[str, str]:
    return {"id": hit.document.get("id", ""), "contents": hit.document.get("contents", "")}


def _score(hit: Hit) -> float | None:
    """The hit's score; null in JSON if it is not finite (strict JSON clients reject NaN)."""
    return hit.score if math.isfinite(hit.score) else None


def _json(payload: Any) -> Response:
    """Serialise once with json.dumps: skips FastAPI's return-type validation and jsonable_encoder."""
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8", "replace")
    return Response(body, media_type="application/json")


def create_app(config: RetrievalConfig, retriever: Retriever | None = None) -> FastAPI:
    """The service app; loads the index from config.index_dir at startup unless a loaded retriever is given."""
    server = config.server
    metrics = SearchMetrics()
    state: dict[str, Any] = {"batcher": None, "error": None}

    async def load() -> None:
        try:
            loaded = retriever
            if loaded is None:
                if not config.index_dir:
                    raise ValueError("retrieval.index_dir is not set")
                loaded = await asyncio.to_thread(Retriever, config.index_dir, config.encoder, server.faiss_gpu)
            batcher = MicroBatcher(
                loaded,
                metrics,
                max_batch=server.micro_batch_max_size,
                max_wait_ms=server.micro_batch_max_wait_ms,
                cache_size=server.cache_size,
                enabled=server.micro_batching,
                workers=server.micro_batch_workers,
                cache_max_bytes=server.cache_max_bytes,
                max_batch_chars=server.micro_batch_max_chars,
            )
            batcher.start()
            app.state.retriever = loaded
            state["batcher"] = batcher
        except Exception as error:  # reported by /health; the process stays up to say why
            state["error"] = f"{type(error).__name__}: {error}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if server.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(server.faiss_threads)
        loading = asyncio.create_task(load())
        yield
        loading.cancel()
        if state["batcher"] is not None:
            await state["batcher"].stop()
        if retriever is None and state["batcher"] is not None:
            state["batcher"].retriever.close()

    app = FastAPI(title="ReSearch retrieval service", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.server_config = server  # read by uvicorn_config for the HTTP-level limits
    # Added first, so it sits inside the counter and rejected bodies are still counted.
    app.add_middleware(BodySizeLimit, max_bytes=server.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)

    async def authorized(request: Request) -> None:
        if server.auth_token is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {server.auth_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token")

    def ready_batcher() -> MicroBatcher:
        if state["batcher"] is None:
            raise HTTPException(status_code=503, detail=state["error"] or "index is still loading")
        return state["batcher"]

    def resolve_topk(requested: int | None) -> int:
        if requested is None or requested == 0:
            return config.topk
        if not 1 <= requested <= server.max_topk:
            raise HTTPException(status_code=422, detail=f"top-k must be between 1 and {server.max_topk}")
        return requested

    def check_queries(queries: list[str]) -> None:
        if len(queries) > server.max_queries_per_request:
            raise HTTPException(
                status_code=413, detail=f"{len(queries)} queries; at most {server.max_queries_per_request} per request"
            )
        for i, query in enumerate(queries):
            if len(query) > server.max_query_chars:
                raise HTTPException(
                    status_code=422, detail=f"query {i} has {len(query)} characters; at most {server.max_query_chars}"
                )

    async def run(queries: list[str], topk: int | None) -> list[list[Hit]]:
        batcher = ready_batcher()
        check_queries(queries)
        return await batcher.search(queries, resolve_topk(topk))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> Response:
        # FastAPI's own handler echoes the input and fails (500) on lone surrogates; ASCII-escaped JSON cannot.
        detail = json.dumps({"detail": error.errors()}, ensure_ascii=True, default=repr)
        return Response(detail, status_code=422, media_type="application/json")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(error).__name__}"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if state["batcher"] is None:
            status = "error" if state["error"] else "loading"
            return JSONResponse(status_code=503, content={"status": status, "detail": state["error"]})
        meta = state["batcher"].retriever.index.meta
        return JSONResponse(
            {"status": "ready", "count": meta.count, "encoder": meta.encoder, "factory": meta.factory, "dim": meta.dim}
        )

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/retrieve", dependencies=[Depends(authorized)])
    async def retrieve(request: RetrieveRequest) -> Response:
        found = await run(request.queries, request.topk)
        if request.return_scores:
            return _json({"result": [[{"document": _document(h), "score": _score(h)} for h in hits] for hits in found]})
        return _json({"result": [[_document(h) for h in hits] for hits in found]})

    @app.post("/batch_search", dependencies=[Depends(authorized)])
    async def batch_search(request: BatchSearchRequest) -> Response:
        found = await run(request.query, request.top_n)
        documents = [[_document(h) for h in hits] for hits in found]
        if request.return_score:
            return _json([documents, [[_score(h) for h in hits] for hits in found]])
        return _json(documents)

    @app.post("/search", dependencies=[Depends(authorized)])
    async def search(request: SearchRequest) -> Response:
        hits = (await run([request.query], request.top_n))[0]
        documents = [_document(h) for h in hits]
        if request.return_score:
            return _json([documents, [_score(h) for h in hits]])
        return _json(documents)

    return app


def uvicorn_config(app: FastAPI, host: str, port: int, **options: Any) -> uvicorn.Config:
    """uvicorn.Config for a service app, with the HTTP limits of its ServerConfig; `options` go to uvicorn.Config."""
    import uvicorn

    from retrieval_service.http_limits import LimitedHttpToolsProtocol

    server: ServerConfig = getattr(app.state, "server_config", None) or ServerConfig()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=LimitedHttpToolsProtocol.with_limits(server),
        ws="none",  # no websocket routes: an Upgrade request is answered as plain HTTP, inside the same limits
        timeout_keep_alive=server.keep_alive_timeout_s,  # type: ignore[arg-type]  # uvicorn hints int, uses a float
        **options,
    )


class BackgroundServer:
    """A uvicorn server for `app` on a thread of this process (tests, demos, the in-process service of a driver)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.host = host
        self.port = port or free_port(host)
        self._server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level="warning"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        """Start serving and return once the socket accepts connections."""
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.05)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until /health answers 200 (the index is loaded), or raise with the reported state."""
        wait_healthy(self.url, timeout, alive=lambda: self._thread is not None and self._thread.is_alive())

    def stop(self) -> None:
        """Ask uvicorn to exit and join its thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

