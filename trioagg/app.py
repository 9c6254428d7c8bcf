"""The HTTP face of trioagg: the Quart-Trio app, its routes and its lifespan.

``create_app()`` is the hypercorn factory (settings from ``TRIOAGG_*``
variables) and what ``trioagg serve`` runs. The writer task does not live in
Quart-Trio's ``app.nursery``, which is cancelled when shutdown begins: the app
opens a nursery of its own around the whole ASGI lifespan, so the writer
outlives the HTTP server, and ``after_serving`` drains it (shielded, because
Quart-Trio has already cancelled the scope it runs in).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from .discovery import keys_answer, parse_keys_query, parse_top_query, top_answer
from .errors import (
    ConfigError,
    InvalidEvents,
    InvalidQuery,
    PayloadTooLarge,
    RequestError,
    error_body,
)
from .http_edges import body_format, guard_connections, read_body, too_large_message
from .ingest import Limits, decode_body
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import openapi_document
from .query import Query, answer, parse_query
from .rollup import is_percentile
from .settings import BUCKET_WIDTHS, Settings
from .store import Store, open_store
from .writer import Writers, purge_expired_ids

log = logging.getLogger("trioagg")

_BUCKET_NAMES = {seconds: name for name, seconds in BUCKET_WIDTHS.items()}


class Service:
    """The parts that outlive a request: settings, store, writer and metrics."""

    def __init__(
        self, settings: Settings, store: Store, writers: Writers, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.writers = writers
        self.metrics = metrics
        self.limits = Limits(settings.max_batch, settings.max_future, settings.max_age)


class TrioaggApp(QuartTrio):
    """A Quart-Trio app whose writer task lives in a nursery around the ASGI lifespan."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("trioagg")
        self.settings = settings
        self.metrics = Metrics()
        self._service: Service | None = None
        self._lifespan_nursery: trio.Nursery | None = None
        self._purge_scope = trio.CancelScope()

    def log_exception(self, exception_info: Any) -> None:
        if isinstance(exception_info[1], ConfigError):  # a plain sentence says it all
            log.error("trioagg cannot start: %s", exception_info[1])
            return
        super().log_exception(exception_info)

    @property
    def service(self) -> Service:
        if self._service is None:
            raise RuntimeError("the service runs only while the app is serving")
        return self._service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await super().__call__(scope, receive, send)
            return
        async with trio.open_nursery() as nursery:
            self._lifespan_nursery = nursery
            await super().__call__(scope, receive, send)

    async def start_service(self) -> None:
        """Open the store and start the writer (``before_serving``)."""
        assert self._lifespan_nursery is not None, "the ASGI lifespan is not running"
        settings = self.settings
        store = await open_store(settings)
        writers = Writers(
            store,
            self.metrics,
            count=settings.writers,
            batch_size=settings.batch_size,
            queue_size=settings.queue_size,
            enqueue_timeout=settings.enqueue_timeout,
        )
        await self._lifespan_nursery.start(writers.run)
        self._lifespan_nursery.start_soon(
            purge_expired_ids, store, min(60.0, settings.dedup_window / 10), self._purge_scope
        )
        self._service = Service(settings, store, writers, self.metrics)
        log.info(
            "trioagg started: %s, %s buckets, %d writer(s), batch %d events, queue %d requests",
            store.backend.description,
            _BUCKET_NAMES[store.bucket],
            settings.writers,
            settings.batch_size,
            settings.queue_size,
        )

    async def stop_service(self) -> None:
        """Drain the writer, commit, close the store (``after_serving``)."""
        service = self.service
        self._purge_scope.cancel()
        with trio.CancelScope(shield=True):
            queued = service.writers.queued()
            service.writers.close()
            await service.writers.stopped.wait()
            await service.store.aclose()
        log.info(
            "trioagg stopped: drained %d queued requests, %d events committed since start",
            queued,
            service.writers.committed_events,
        )


def create_app(settings: Settings | None = None) -> TrioaggApp:
    """The ASGI app; without ``settings`` they come from ``TRIOAGG_*`` variables."""
    settings = Settings.from_env() if settings is None else settings
    _configure_logging(settings.log_level)
    app = TrioaggApp(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.before_serving(app.start_service)
    app.after_serving(app.stop_service)
    _add_routes(app)
    _add_error_handlers(app)
    app.asgi_app = guard_connections(app.asgi_app)  # type: ignore[method-assign,assignment]
    return app


def _configure_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def _json(document: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(document), status, content_type="application/json")


def _add_routes(app: TrioaggApp) -> None:
    @app.post("/v1/events")
    async def post_events() -> Response:
        started = time.perf_counter()
        service = app.service
        settings = service.settings
        body_form = body_format(request.headers)
        durable = _wait_param(request.args.get("wait"))
        # Read before taking an admission token: a slow upload holds none.
        body = await read_body(
            request,
            body_form.encoding,
            max_body=settings.max_body,
            timeout=settings.body_timeout,
        )
        await service.writers.admit()
        try:
            points = await decode_body(
                body, ndjson=body_form.ndjson, limits=service.limits, now=time.time()
            )
            submission = await service.writers.submit(points, durable=durable) if points else None
        except InvalidEvents as error:
            service.metrics.events_rejected.inc(error.event_count)
            raise
        finally:
            service.writers.admitted()
        duplicates = 0
        if submission is not None:
            service.metrics.events_accepted.inc(len(points))
            if durable:
                await submission.wait_committed()
                duplicates = submission.duplicates
        service.metrics.ingest_seconds.observe(time.perf_counter() - started)
        if durable:
            return _json({"accepted": len(points), "duplicates": duplicates})
        return _json({"accepted": len(points)}, 202)

    @app.get("/v1/aggregates")
    async def get_aggregates() -> Response:
        started = time.perf_counter()
        service = app.service
        query = parse_query(request.args, bucket=service.store.bucket, now=time.time())
        _check_quantiles_kept(query, service)
        rows = await service.store.read(
            query.keys, query.start, query.end, sketches=query.needs_sketches
        )
        response = _json(answer(query, rows))
        service.metrics.query_seconds.observe(time.perf_counter() - started)
        return response

    @app.get("/v1/keys")
    async def get_keys() -> Response:
        query = parse_keys_query(request.args)
        series = await app.service.store.list_keys(query.prefix, query.after, query.limit)
        return _json(keys_answer(query, series))

    @app.get("/v1/top")
    async def get_top() -> Response:
        store = app.service.store
        query = parse_top_query(request.args, bucket=store.bucket, now=time.time())
        ranked = await store.top(query.start, query.end, query.stat, query.prefix, query.limit)
        return _json(top_answer(query, ranked))

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        service = app.service
        checks = {"store": "ok", "writer": "running", "queue": "ok"}
        try:
            await service.store.ping()
        except Exception as error:
            checks["store"] = f"unreachable: {error}"
        if not service.writers.running:
            checks["writer"] = "stopped"
        if service.writers.saturated():
            checks["queue"] = f"saturated ({service.writers.queued()} requests waiting)"
        ready = checks == {"store": "ok", "writer": "running", "queue": "ok"}
        return _json(
            {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(app.metrics.render(), 200, content_type=METRICS_CONTENT_TYPE)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document())


def _check_quantiles_kept(query: Query, service: Service) -> None:
    if not any(is_percentile(name) for name in query.stats):
        return
    missing = [key for key in query.keys if not service.store.policy.keeps_quantiles(key)]
    if missing:
        raise InvalidQuery(
            "the query is invalid",
            [
                {
                    "parameter": "stats",
                    "message": f"quantiles are not kept for {', '.join(missing)}: "
                    "start the server with --quantiles naming these keys (glob patterns, * for "
                    "all); they apply to events received from then on",
                }
            ],
        )


def _wait_param(text: str | None) -> bool:
    if text is None or text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise RequestError(f"wait must be true or false, not {text!r}")


def _add_error_handlers(app: TrioaggApp) -> None:
    @app.errorhandler(RequestError)
    async def request_error(error: RequestError) -> Response:
        app.metrics.requests_rejected.labels(error.code).inc()
        return Response(
            error.body(), error.status, headers=error.headers(), content_type="application/json"
        )

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return await request_error(PayloadTooLarge(too_large_message(app.settings.max_body)))
        code = (error.name or "error").lower().replace(" ", "_")
        app.metrics.requests_rejected.labels(code).inc()
        # Keep what the exception adds (Allow on a 405), not its HTML Content-Type.
        headers = Headers([(k, v) for k, v in error.get_headers() if k.lower() != "content-type"])
        return Response(
            error_body(code, error.description or code),
            status,
            headers=headers,
            content_type="application/json",
        )

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        app.metrics.requests_rejected.labels("internal_error").inc()
        return Response(
            error_body("internal_error", "an unexpected error; see the server log"),
            500,
            content_type="application/json",
        )
