"""The galr HTTP service: a FastAPI application over one bundle and one gallery index.

>>> from galr.runtime.serve import ServeSettings, create_app       # doctest: +SKIP
>>> app = create_app(ServeSettings(bundle="galr.plan", index="gallery.gidx"))
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)  -- or the `galr-serve` command

Routes (JSON unless said; OpenAPI at ``/docs``):

=============================  ===============================================================
``GET /healthz``               alive (answers while the engine loads)
``GET /readyz``                200 once the engine and index are loaded and warmed up, else 503
``GET /metrics``               Prometheus text: requests and latency per route, batch sizes,
                               queue depth, errors
``GET /v1/info``               model, backend, index size and kind, limits
``POST /v1/search/text``       ``{"queries": [...], "top_k": 10, "rerank": true}`` -> results (optional
                               ``"bbox": [W, S, E, N]``, ``"since"``/``"until"`` dates: tiles of that place and time)
``POST /v1/search/image``      an uploaded image -> nearest captions of the text bank and
                               nearest gallery images
``POST /v1/embed/text``        ``{"texts": [...]}`` -> float32 embeddings
``POST /v1/embed/image``       an uploaded image -> its embedding
``GET /v1/thumbnail?id=ID``    a JPEG thumbnail of an indexed image (by index id only)
``POST /v1/admin/reload``      re-read the index file (needs the API key)
``GET /``                      the search page
=============================  ===============================================================

Errors are the house taxonomy (:mod:`galr.errors`) mapped to HTTP statuses, with a JSON body
``{"error": {"type": ..., "message": ...}}``; a full queue answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import os
import threading
import time
import warnings
from contextlib import asynccontextmanager
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from galr.config import RerankConfig
from galr.errors import BusyError, GalrError, InputError, NotFoundError, UnavailableError
from galr.geo.filters import PlaceFilter
from galr.runtime.serve.batching import QueryBatcher, SearchCall
from galr.runtime.serve.page import search_page
from galr.runtime.serve.settings import ServeSettings

log = logging.getLogger("galr.serve")


class TextSearchRequest(BaseModel):
    queries: list[str] = Field(description="Text queries, answered in order.")
    top_k: int = Field(10, ge=1, description="Results per query.")
    rerank: bool = Field(True, description="Multivariate rerank (needs the index's text bank).")
    nprobe: int | None = Field(None, ge=1, description="ivf/ivfpq indexes: lists scanned per query.")
    ef: int | None = Field(None, ge=1, description="hnsw indexes: search beam width.")
    exact_rerank: int | None = Field(None, ge=0, le=1000, description="ivfpq indexes built with rerank: PQ "
                                     "candidates re-scored with the exact vectors, as a multiple of top_k (0: none).")
    bbox: list[float] | None = Field(None, min_length=4, max_length=4,
                                     description="Only tiles whose footprint meets [west, south, east, north] (WGS84).")
    since: str | None = Field(None, description="Only tiles of scenes acquired on or after this date (YYYY-MM-DD).")
    until: str | None = Field(None, description="Only tiles of scenes acquired on or before this date.")


class EmbedTextRequest(BaseModel):
    texts: list[str] = Field(description="Texts to embed.")


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (no process-wide state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("galr_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("galr_request_seconds", "Request latency by route", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch = Histogram("galr_batch_queries", "Queries per encoder batch",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.queue = Gauge("galr_queued_queries", "Queries waiting or being computed", registry=self.registry)
        self.errors = Counter("galr_errors", "Error responses by error type", ["type"], registry=self.registry)


class Service:
    """The loaded engine and index, swapped atomically on reload."""

    def __init__(self, settings: ServeSettings, encoders: Any = None) -> None:
        self.settings = settings
        self.encoders = encoders
        self.retriever: Any = None
        self.detector: Any = None
        self.ready = False
        self.failure: str | None = None
        self._reload_lock = threading.Lock()

    def load(self) -> None:
        """Load the engine (unless given) and the index, then warm up (blocking)."""
        from galr.runtime.backends.onnxruntime import OnnxRuntimeOptions
        from galr.runtime.encoders import load_engine

        try:
            if self.encoders is None:
                options = OnnxRuntimeOptions(intra_op_threads=self.settings.encoder_threads,
                                             allow_spinning=self.settings.encoder_spinning)
                self.encoders = load_engine(self.settings.bundle, backend=self.settings.backend,
                                            device=self.settings.device, precision=self.settings.precision,
                                            options=[options])
            from galr.runtime.detector import choose_detector

            self.detector, line = choose_detector(self.settings.detector, getattr(self.encoders, "bundle", None),
                                                  drea_classes=self.encoders.spec.drea.classes,
                                                  use_bundled=self.settings.use_bundled_detector,
                                                  backend=getattr(getattr(self.encoders, "info", None), "backend",
                                                                  "auto"))
            if line:
                log.info(line)
            self.retriever = self._retriever(self._read_index())
            if self.settings.warmup:
                quietly(self.encoders.encode_text, ["warm up"])  # the words may not be in the vocabulary
            self.ready = True
        except Exception as exc:  # reported by /readyz; the process keeps answering /healthz
            self.failure = str(exc)
            log.error("galr-serve could not load: %s", exc)

    def reload(self) -> dict[str, Any]:
        """Read the index file again and swap it in; a bad file is refused and the old one keeps serving."""
        if not self.ready:
            raise UnavailableError("the service is not ready yet; reload after /readyz answers 200")
        with self._reload_lock:
            index = self._read_index()
            self.retriever = self._retriever(index)
        return {"images": len(index), "text_bank": len(index.text_bank_texts), "search": index.images.kind}

    def _read_index(self) -> Any:
        from galr.runtime.index import load_index

        # Mapped: the vectors' pages are shared with every other process serving the same file.
        return load_index(self.settings.index, expected_model_hash=self.encoders.model_hash, mapped=True)

    def _retriever(self, index: Any, search: dict[str, int] | None = None) -> Any:
        from galr.runtime.retriever import Retriever

        return Retriever(self.encoders, index, RerankConfig(), device=self.settings.device, search_params=search)

    def search_text(self, queries: list[str], top_k: int, rerank: bool, search: dict[str, Any]) -> list[Any]:
        """One batch of text searches; each result carries its own notices (unknown words, a shortened
        query, MR without a text bank) in ``notices``. Runs on one worker thread (warning capture)."""
        search = dict(search)
        where = search.pop("where", None)  # a PlaceFilter: requests batch together only with the same one
        retriever = self._retriever(self.retriever.index, search)  # one index for the whole batch
        labels = [f"query #{number}" for number in range(len(queries))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = retriever.search_text(queries, top_k=top_k, rerank=rerank, where=where, labels=labels)
        position = {label: number for number, label in enumerate(labels)}
        general: list[str] = []
        for warning in caught:
            label, text = getattr(warning.message, "label", None), str(warning.message)
            if label in position:  # "query #7 (...) ..." -> "query (...) ...": numbers are the batch's, not the client's
                results[position[label]].notices.append("query" + text[len(label):])
            elif text not in general:
                general.append(text)
        for result in results:
            result.notices.extend(general)
        return results


def quietly(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` with warnings silenced. Called on the batcher's one worker thread
    (and once at start-up, before any request is served), so the process-wide warning filters are
    never changed under another call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _public(result: Any) -> dict[str, Any]:
    """A result as JSON for clients: records without the server's file paths (ids identify images)."""
    data = result.to_dict()
    for hit in data["hits"]:
        if isinstance(hit.get("record"), dict):
            hit["record"].pop("path", None)
    return data


class RequestGuard:
    """The API key of every ``/v1`` route, body-size limits and per-route request metrics, as a plain
    ASGI middleware.

    Plain ASGI because Starlette's ``@app.middleware("http")`` runs every request in a task group and
    streams every response through a copy, and a FastAPI dependency per route costs its dependency
    resolution on every request: measurable event-loop time per request in a service whose event
    loop shares two cores with the encoder. One rule by path also guards any ``/v1`` route added later.
    """

    def __init__(self, app: Any, *, max_body_bytes: int, metrics: "Metrics", api_key: str | None) -> None:
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self._authorization = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # unless the application starts a response

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send_noting_status)
            else:
                await self.app(scope, receive, send_noting_status)
        finally:
            name = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - began)

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self._authorization is not None and scope["path"].startswith("/v1/") and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self._authorization):
            return _error_response(self.metrics, _Unauthorised.http_status, _Unauthorised.__name__,
                                   "missing or wrong API key: send 'Authorization: Bearer <key>'")
        if scope["method"] != "POST":
            return None
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" in headers:  # a streamed body of unknown size
            return _error_response(self.metrics, 411, "LengthRequired", "send the body with a Content-Length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return _error_response(self.metrics, 413, "PayloadTooLarge",
                                   f"the body may hold at most {self.max_body_bytes} bytes")
        return None


def _error_response(metrics: Metrics, status: int, kind: str, message: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def create_app(settings: ServeSettings, *, encoders: Any = None, reload_on_sighup: bool = False,
               search_call: Callable[[SearchCall], Awaitable[Any]] | None = None,
               background_load: bool = True) -> FastAPI:
    """The FastAPI application (see the module docstring).

    Args:
        settings: files, limits and batching.
        encoders: already loaded :class:`~galr.runtime.encoders.Encoders` (else loaded from the bundle).
        reload_on_sighup: re-read the index when the process gets SIGHUP (``galr-serve`` sets it).
        search_call: answers one request's text search, batching it with others (Ray Serve passes its
            ``@serve.batch`` method); ``None`` = the app's own :class:`QueryBatcher`. It returns the
            results, or the exception to raise.
        background_load: load the engine and index after start-up while ``/healthz`` answers (a
            process of its own); ``False`` = before the app serves (a Ray replica: Ray routes to it only then).
    """
    service = Service(settings, encoders)
    metrics = Metrics()
    batcher = QueryBatcher(service.search_text, max_batch_queries=settings.max_batch_queries,
                           max_wait_ms=settings.max_wait_ms, max_queued_queries=settings.max_queued_queries,
                           on_batch=metrics.batch.observe)
    metrics.queue.set_function(lambda: batcher.queued_queries)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        loop = asyncio.get_running_loop()
        loading = loop.run_in_executor(None, service.load)  # /healthz answers meanwhile
        if not background_load:
            await loading
        if reload_on_sighup:
            import signal

            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _reload_logged))
        yield
        await loading
        await batcher.stop()
        if service.encoders is not None and encoders is None:
            service.encoders.close()

    def _reload_logged() -> None:
        try:
            log.info("reloaded %s: %s", settings.index, service.reload())
        except Exception as exc:  # the old index keeps serving
            log.error("reload of %s refused, still serving the previous index: %s", settings.index, exc)

    app = FastAPI(title="galr", version="1", lifespan=lifespan,
                  description="GaLR remote-sensing text-image retrieval (text and image search, embeddings).")
    app.state.service, app.state.batcher, app.state.metrics = service, batcher, metrics
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, metrics=metrics, api_key=settings.api_key)

    @app.exception_handler(GalrError)
    async def galr_error(_: Request, exc: GalrError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, BusyError) else None
        return _error_response(metrics, exc.http_status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error_response(metrics, 400, "InvalidRequest", problems or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(metrics, 500, type(exc).__name__, "internal error; see the service log")

    def ready() -> Service:
        if not service.ready:
            raise UnavailableError(f"not ready: {service.failure or 'loading the engine and index'}")
        return service

    def checked_queries(queries: list[str], *, what: str = "queries") -> list[str]:
        if not queries:
            raise InputError(f"{what} is empty; send at least one")
        if len(queries) > settings.max_queries:
            raise InputError(f"{len(queries)} {what}; one request may hold at most {settings.max_queries}")
        for number, query in enumerate(queries):
            if len(query) > settings.max_query_chars:
                raise InputError(f"{what}[{number}] has {len(query)} characters; at most {settings.max_query_chars}")
            problem = service.encoders.query_problem(query)
            if problem is not None:
                raise InputError(f"{what}[{number}] {problem}")
        return queries

    async def timed(awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise _Timeout(f"not answered within {settings.request_timeout_s:g} s") from None

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        ready()
        return {"status": "ready", "images": len(service.retriever.index)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return search_page(needs_key=settings.api_key is not None)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        svc = ready()
        index = svc.retriever.index
        return {"engine": svc.encoders.info.describe(), "model_hash": svc.encoders.model_hash,
                "images": len(index), "text_bank": len(index.text_bank_texts), "search": index.images.kind,
                "embed_dim": index.embed_dim,
                "limits": {"max_queries": settings.max_queries, "max_query_chars": settings.max_query_chars,
                           "max_top_k": settings.max_top_k, "max_body_bytes": settings.max_body_bytes}}

    @app.post("/v1/search/text")
    async def search_text(body: TextSearchRequest) -> dict[str, Any]:
        ready()
        if body.top_k > settings.max_top_k:
            raise InputError(f"top_k is {body.top_k}; at most {settings.max_top_k}")
        queries = checked_queries(body.queries)
        search: dict[str, Any] = {name: value for name, value in (("nprobe", body.nprobe), ("ef", body.ef),
                                                                  ("rerank", body.exact_rerank)) if value is not None}
        where = PlaceFilter.from_text(",".join(map(str, body.bbox)) if body.bbox else None, body.since, body.until)
        if where is not None:
            search["where"] = where
        if search_call is None:
            results = await timed(batcher.search(queries, body.top_k, body.rerank, search))
        else:
            results = await timed(search_call(SearchCall(queries, body.top_k, body.rerank,
                                                         tuple(sorted(search.items())))))
            if isinstance(results, BaseException):
                raise results
        # Plain JSON types already: rendered directly, without FastAPI's recursive encoder (a batch of
        # 32 answers otherwise spends milliseconds of the event loop there, while clients wait).
        return JSONResponse({"results": [_public(result) for result in results]})

    @app.post("/v1/embed/text")
    async def embed_text(body: EmbedTextRequest) -> dict[str, Any]:
        svc = ready()
        texts = checked_queries(body.texts, what="texts")
        vectors = await timed(batcher.run_blocking(svc.encoders.encode_text, texts))
        return {"dim": int(vectors.shape[1]), "embeddings": vectors.astype("float32").tolist()}

    async def embed_upload(upload: UploadFile) -> Any:
        svc = ready()
        data = await upload.read()
        if not data:
            raise InputError(f"the uploaded file {upload.filename!r} is empty")
        stream = io.BytesIO(data)
        stream.name = upload.filename or "upload"
        # The service's detector gives the DREA input; without one, the documented all-zero fallback
        # (without a warning each time).
        return await timed(batcher.run_blocking(quietly, svc.encoders.encode_images, [stream], svc.detector))

    def drea_note() -> str:
        if service.detector is not None:
            return f"DREA input from the service's detector ({service.detector.source})"
        return "no detections were given: the local branch used its all-zero fallback"

    @app.post("/v1/embed/image")
    async def embed_image(image: UploadFile = File(...)) -> dict[str, Any]:
        vector = await embed_upload(image)
        return {"dim": int(vector.shape[1]), "embedding": vector[0].astype("float32").tolist(), "note": drea_note()}

    @app.post("/v1/search/image")
    async def search_image(image: UploadFile = File(...), top_k: int = Form(10, ge=1),
                           rerank: bool = Form(True)) -> dict[str, Any]:
        if top_k > settings.max_top_k:
            raise InputError(f"top_k is {top_k}; at most {settings.max_top_k}")
        vector = await embed_upload(image)
        retriever = service.retriever
        label = [image.filename or "upload"]

        def both() -> dict[str, Any]:
            images = retriever.search_embeddings(vector, label, target="images", top_k=top_k, rerank=False)
            captions = (retriever.search_embeddings(vector, label, target="captions", top_k=top_k, rerank=rerank)
                        if retriever.has_text_bank else [])
            return {"images": _public(images[0])["hits"],
                    "captions": _public(captions[0])["hits"] if captions else [],
                    "reranked": bool(captions and captions[0].reranked), "note": drea_note()}

        return await timed(batcher.run_blocking(both))

    @app.get("/v1/thumbnail")
    async def thumbnail(id: str = Query(..., description="an image id of the index")) -> Response:
        svc = ready()
        from galr.runtime.index import UnknownIdError

        try:
            record = svc.retriever.index.get(id)
        except UnknownIdError:
            raise NotFoundError(f"no image with id {id!r} in the index") from None

        def render() -> bytes:
            from PIL import Image

            from galr.preprocess.image import load_image
            from galr.runtime.index.scenes import read_record_pixels

            if not os.path.isfile(record.path):
                raise NotFoundError(f"image {id!r} is indexed but its file is no longer on the server")
            tile = read_record_pixels(record)  # a scene tile: its window only, never the whole scene
            picture = Image.fromarray(tile) if tile is not None else load_image(record.path, svc.encoders.spec.image)
            picture.thumbnail((256, 256))
            out = io.BytesIO()
            picture.save(out, format="JPEG", quality=85)
            return out.getvalue()

        return Response(await timed(batcher.run_blocking(render)), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.post("/v1/admin/reload")
    async def reload_index() -> dict[str, Any]:
        if settings.api_key is None:
            raise _Forbidden("the reload route needs an API key (start galr-serve with one), or send SIGHUP")
        return {"reloaded": await asyncio.get_running_loop().run_in_executor(None, service.reload)}

    return app


class _Unauthorised(GalrError):
    """No or a wrong API key (HTTP only)."""

    http_status = 401


class _Forbidden(GalrError):
    """A route this service was not configured for (HTTP only)."""

    http_status = 403


class _Timeout(GalrError):
    """A request not answered within the request timeout (HTTP only)."""

    http_status = 504


__all__ = ["Service", "create_app"]
