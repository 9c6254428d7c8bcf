"""The HTTP face of trioagg: the Quart-Trio app, its routes and its lifespan.

:func:`build_app` makes the app for given settings; the entry points
(:func:`trioagg.app.create_app`, ``trioagg serve``) do what only a process may do
before they call it. The writer task does not live in Quart-Trio's
``app.nursery``, which is cancelled when shutdown begins: the app opens a nursery
of its own around the whole ASGI lifespan, so the writer outlives the HTTP server,
and ``after_serving`` drains it (shielded, because Quart-Trio has already cancelled
the scope it runs in).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio
from hypercorn.utils import LifespanFailureError
from quart import Response, g, request
from quart_cors import cors
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from ..core.answers import Pieces
from ..core.errors import ConfigError, PayloadTooLarge, RequestError, StoreOutage, error_body
from ..core.settings import Settings
from ..ingest import otlp
from ..keys.auth import current_key, current_tenant
from ..query.budget import DEFAULT_BUDGET, Budget
from ..service.cases import Aggregates, accept_otlp, answer_keys, answer_status, answer_top
from ..service.lifecycle import Service
from ..service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..service.metrics import Metrics, bound_children
from .dashboard import dashboard_views
from .edges import content_encoding, guard_connections, read_body, too_large_message
from .endpoints import ENDPOINTS
from .gate import Gate, failure_answer
from .hotpath import HotPath, aggregates_view, events_view, sent
from .openapi import openapi_document

log = logging.getLogger("trioagg")

#: What answers an endpoint: Quart passes a route's variables as keywords.
View = Callable[..., Awaitable[Response]]


class WriterCrashed(LifespanFailureError):
    """A writer or the purge task died of a bug: the process must exit (non-zero) so
    that its supervisor restarts it."""

    def __init__(self, message: str) -> None:
        super().__init__("lifespan", message)


# How long a crashed service keeps answering (503) before the process exits, so that
# the requests it woke with an error get their answers out.
_CRASH_GRACE_SECONDS = 0.5


class TimedRequest(TrioRequest):
    """A request that knows when the app began answering it."""

    #: ``time.perf_counter()`` when the before_request hook ran; None before.
    started: float | None = None


class TrioaggApp(QuartTrio):
    """A Quart-Trio app whose :class:`Service` runs in a task of a nursery around the
    ASGI lifespan, so it outlives the HTTP server and drains after it."""

    request_class = TimedRequest

    def __init__(self, settings: Settings) -> None:
        super().__init__("trioagg")
        self.settings = settings
        self.metrics = Metrics()
        self._service: Service | None = None
        #: The UDP socket to receive StatsD on (``--statsd``), when it was bound before
        #: the app started; else the service binds one.
        self.statsd_socket: socket.socket | None = None
        self._lifespan_nursery: trio.Nursery | None = None
        self._stop_requested = trio.Event()
        self._service_stopped = trio.Event()
        #: Why the service died, once it has: the process is unhealthy and about to exit.
        self.crashed: str | None = None
        #: True once the server began to shut down: every answer closes its connection.
        self.stopping = False
        #: What one query may cost (tests narrow it).
        self.budget: Budget = DEFAULT_BUDGET
        #: The check every request makes before its view runs (the before_request hook
        #: that :func:`_time_and_authenticate_every_request` installs).
        self.check_request: Callable[[], Awaitable[None]] | None = None
        #: What lets requests in, on both request paths.
        self.gate = Gate(settings)
        #: Answers aggregates queries, on both request paths (one memo of parsed queries).
        self.aggregates = Aggregates(self.metrics)

    def log_exception(self, exception_info: Any) -> None:
        if isinstance(exception_info[1], ConfigError):  # a plain sentence says it all
            log.error("trioagg cannot start: %s", exception_info[1])
            return
        super().log_exception(exception_info)

    @property
    def serving(self) -> bool:
        """Whether the service has started (and so the app may take requests)."""
        return self._service is not None

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
        """Start the service in the lifespan's nursery (``before_serving``)."""
        assert self._lifespan_nursery is not None, "the ASGI lifespan is not running"
        self._service = await self._lifespan_nursery.start(self._run_service)

    async def _run_service(self, *, task_status: trio.TaskStatus[Service]) -> None:
        started = False
        try:
            async with Service.running(self.settings, self.metrics, self.statsd_socket) as service:
                task_status.started(service)
                started = True
                await self._stop_requested.wait()
        except BaseException as failure:
            if not started or _only_cancelled(failure):
                raise
            self.crashed = f"{type(failure).__name__}: {failure}"
            log.critical("the service crashed; exiting", exc_info=failure)
            await trio.sleep(_CRASH_GRACE_SECONDS)
            raise WriterCrashed(f"the service crashed: {self.crashed}") from failure
        finally:
            self._service_stopped.set()

    async def stop_service(self) -> None:
        """Stop and drain the service (``after_serving``)."""
        self._stop_requested.set()
        with trio.CancelScope(shield=True):
            await self._service_stopped.wait()


def _only_cancelled(failure: BaseException) -> bool:
    if isinstance(failure, BaseExceptionGroup):
        return failure.split(trio.Cancelled)[1] is None
    return isinstance(failure, trio.Cancelled)


def build_app(settings: Settings) -> TrioaggApp:
    """The ASGI app for ``settings``: its routes, hooks, error answers and connection
    guard. What only a process may do is :func:`trioagg.app.create_app`'s."""
    app = TrioaggApp(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.before_serving(app.start_service)
    app.after_serving(app.stop_service)
    route(app, {**api_views(app), **dashboard_views(app)})
    if settings.cors_origin:
        cors(
            app,
            allow_origin=settings.cors_origin,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    _add_error_handlers(app)
    _time_and_authenticate_every_request(app)
    app.asgi_app = guard_connections(  # type: ignore[method-assign,assignment]
        HotPath(app, app.asgi_app),
        closing=lambda: app.stopping,
        send_timeout=settings.send_timeout,
    )
    return app


def _time_and_authenticate_every_request(app: TrioaggApp) -> None:
    """Observe ``trioagg_request_seconds{endpoint, status}`` for every answer, errors too,
    and let every request in through the app's :class:`~trioagg.http.gate.Gate` before the
    view runs. A refused request never reaches the body-reading, admission or store code
    (what arrived of its body meanwhile is bounded by max_body, and the connection is
    closed after the answer, see guard_connections).

    One before_request hook does it all (the clock first, so a refusal is timed too):
    Quart awaits each hook through ``ensure_async``, which costs microseconds per hook
    on every request."""
    timer = bound_children(app.metrics.request_seconds)

    async def start_clock_and_authenticate() -> None:
        # One look-up of the request context, not one per attribute (microseconds each).
        current: TimedRequest = request._get_current_object()  # type: ignore[attr-defined]
        current.started = time.perf_counter()
        rule = current.url_rule
        if rule is None:
            return
        headers = current.headers
        key = await app.gate.check(
            app.service,
            rule.rule,
            current.method,
            headers.get("Host"),
            headers.get("Authorization"),
            current.scope.get("server"),
        )
        if key is not None:
            g.trioagg_key = key

    app.before_request(start_clock_and_authenticate)
    app.check_request = start_clock_and_authenticate

    @app.after_request
    async def stop_clock(response: Response) -> Response:
        current: TimedRequest = request._get_current_object()  # type: ignore[attr-defined]
        if current.started is not None:
            rule = current.url_rule.rule if current.url_rule is not None else "unrouted"
            timer(rule, response.status_code).observe(time.perf_counter() - current.started)
        return response


def _json(document: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(document), status, content_type="application/json")


def _json_body(body: bytes, status: int = 200) -> Response:
    """An answer whose JSON is already encoded."""
    return Response(body, status, content_type="application/json")


def _json_pieces(pieces: Pieces) -> Response:
    """A 200 answer whose JSON is already encoded in pieces, sent one after the other
    and each let go once sent, so that a big answer is not held whole while it is sent,
    nor copied into one string; once all are sent, the memory they took is given back."""
    if len(pieces.chunks) == 1:
        return _json_body(pieces.chunks[0])
    response = Response(sent(pieces), 200, content_type="application/json")
    response.content_length = pieces.size
    return response


async def post_events(app: TrioaggApp) -> Response:
    """Served here only for CORS requests: see :mod:`trioagg.http.hotpath`."""
    status, body = await events_view(
        app, request.headers, request.args, request.content_length, request.body, current_key()
    )
    return _json_body(body, status)


async def post_metrics(app: TrioaggApp) -> Response:
    """OTLP/HTTP metrics: see :func:`~trioagg.service.cases.accept_otlp`."""
    settings = app.settings
    protobuf = otlp.media_type(request.headers)
    body = await accept_otlp(
        app.service,
        functools.partial(
            read_body,
            request.content_length,
            request.body,
            content_encoding(request.headers),
            max_body=settings.max_body,
            timeout=settings.body_timeout,
        ),
        protobuf=protobuf,
        tenant=current_tenant(),
    )
    return Response(body, 200, content_type=otlp.PROTOBUF if protobuf else otlp.JSON)


async def get_aggregates(app: TrioaggApp) -> Response:
    """Served here only for CORS requests: see :mod:`trioagg.http.hotpath`."""
    current: TimedRequest = request._get_current_object()  # type: ignore[attr-defined]
    found = await aggregates_view(app, current.query_string, current.args, current_key())
    if isinstance(found, bytes):
        return _json_body(found)
    return _json_pieces(found)


async def get_keys(app: TrioaggApp) -> Response:
    return _json_body(await answer_keys(app.service, request.args, tenant=current_tenant()))


async def get_top(app: TrioaggApp) -> Response:
    return _json_body(await answer_top(app.service, request.args, tenant=current_tenant()))


async def get_status(app: TrioaggApp) -> Response:
    tenant = current_tenant()
    return _json_body(await answer_status(app.service, app.metrics, request.args, tenant=tenant))


async def healthz(app: TrioaggApp) -> Response:
    if app.crashed is not None:
        return _json({"status": "failing", "reason": "the service crashed; exiting"}, 503)
    if not app.service.writers.running:
        return _json({"status": "failing", "reason": "the writers are not running"}, 503)
    return _json({"status": "ok"})


async def readyz(app: TrioaggApp) -> Response:
    service = app.service
    checks = {"store": "ok", "writer": "running", "queue": "ok"}
    try:
        await service.store.ping()
    except StoreOutage as error:
        log.warning("readiness: the store cannot be read: %s", error.__cause__)
        checks["store"] = f"unreachable: {error.reason}"
    except Exception as error:
        log.warning("readiness: the store cannot be read: %s", error)
        checks["store"] = "unreachable"
    if service.writers.failing is not None:
        checks["store"] = f"failing: {service.writers.failing}"
    if not service.writers.running:
        checks["writer"] = "stopped"
    if service.writers.saturated():
        checks["queue"] = f"saturated ({service.writers.queued()} requests waiting)"
    ready = checks == {"store": "ok", "writer": "running", "queue": "ok"}
    return _json(
        {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
    )


async def metrics(app: TrioaggApp) -> Response:
    body = await app.metrics.rendered()
    return Response(body, 200, content_type=METRICS_CONTENT_TYPE)


async def openapi(app: TrioaggApp) -> Response:
    return _json(openapi_document())


#: The views of the API's endpoints, each over the app it is bound to by :func:`api_views`.
API_VIEWS: tuple[Callable[[TrioaggApp], Awaitable[Response]], ...] = (
    post_events,
    post_metrics,
    get_aggregates,
    get_keys,
    get_top,
    get_status,
    healthz,
    readyz,
    metrics,
    openapi,
)


def api_views(app: TrioaggApp) -> dict[str, View]:
    """The views of the API's endpoints, by name, bound to ``app``."""
    return {view.__name__: functools.partial(view, app) for view in API_VIEWS}


def route(app: TrioaggApp, views: dict[str, View]) -> None:
    """Serve each endpoint of :data:`~trioagg.http.endpoints.ENDPOINTS` with the view of its
    name. An endpoint without a view, or a view for no endpoint, fails here, as the app
    is made, not at the first request."""
    unrouted = dict(views)
    for endpoint in ENDPOINTS:
        view = unrouted.pop(endpoint.view, None)
        if view is None:
            raise RuntimeError(f"no view answers {endpoint.method} {endpoint.path}")
        app.add_url_rule(endpoint.path, endpoint.view, view, methods=[endpoint.method])
    if unrouted:
        raise RuntimeError(f"views of no endpoint: {', '.join(unrouted)}")


def _add_error_handlers(app: TrioaggApp) -> None:
    def answer(error: Exception) -> Response:
        status, headers, body = failure_answer(app.metrics, error, request.method, request.path)
        return Response(body, status, headers=headers, content_type="application/json")

    @app.errorhandler(RequestError)
    async def request_error(error: RequestError) -> Response:
        return answer(error)

    @app.errorhandler(StoreOutage)
    async def store_outage(error: StoreOutage) -> Response:
        return answer(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return answer(PayloadTooLarge(too_large_message(app.settings.max_body)))
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
        return answer(error)
