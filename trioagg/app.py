"""The HTTP face of trioagg: the Quart-Trio app, its routes and its lifespan.

``create_app()`` is the hypercorn factory (settings from ``TRIOAGG_*``
variables) and what ``trioagg serve`` runs. The writer task does not live in
Quart-Trio's ``app.nursery``, which is cancelled when shutdown begins: the app
opens a nursery of its own around the whole ASGI lifespan, so the writer
outlives the HTTP server, and ``after_serving`` drains it (shielded, because
Quart-Trio has already cancelled the scope it runs in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any, NoReturn, TypeVar

import msgspec
import trio
from hypercorn.utils import LifespanFailureError
from prometheus_client.metrics import MetricWrapperBase
from quart import Response, g, request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from . import otlp
from .answers import Pieces
from .auth import (
    ENDPOINT_SCOPES,
    Authenticator,
    current_tenant,
    key_required_to_start,
    settle_mode,
    tenant_tags,
)
from .budget import DEFAULT_BUDGET, INLINE_WORK, Budget
from .dashboard import add_dashboard
from .discovery import keys_answer, parse_keys_query, parse_top_query, top_answer
from .errors import (
    ConfigError,
    Forbidden,
    InvalidEvents,
    InvalidQuery,
    PayloadTooLarge,
    RequestError,
    StoreOutage,
    StoreUnavailable,
    Unauthorized,
    error_body,
)
from .hosts import AllowedHosts
from .http_edges import (
    body_format,
    content_encoding,
    guard_connections,
    read_body,
    too_large_message,
)
from .ingest import Limits, decode_body
from .loopwatch import (
    LongSteps,
    sample_loop_steps,
    tune_garbage_collector,
    watch_loop_stalls,
)
from .memory import give_back
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .openapi import openapi_document
from .otlp import Streams
from .params import parse_wait
from .query import ParsedQueries, Query, answer, is_timeless, parse_query, work
from .readcache import CachedAnswer, ReadCache, cache_key
from .settings import BUCKET_WIDTHS, Settings
from .stats import is_percentile
from .statsd import Receiver
from .statsd import open_socket as open_statsd_socket
from .store import Store, open_store, store_exists
from .store.head import copy_row
from .writer import Writers, purge_expired_ids

log = logging.getLogger("trioagg")

_Labelled = TypeVar("_Labelled", bound=MetricWrapperBase)
_Built = TypeVar("_Built")

_BUCKET_NAMES = {seconds: name for name, seconds in BUCKET_WIDTHS.items()}


class Service:
    """The parts that outlive a request, and their life, which
    ``async with Service.running(settings, metrics) as service`` owns: it opens the
    store, starts the writers and the id purge in a nursery of its own, and on the
    way out stops in a fixed order (see :meth:`running`)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        writers: Writers,
        metrics: Metrics,
        read_cache: ReadCache,
    ) -> None:
        self.settings = settings
        self.read_cache = read_cache
        self.store = store
        self.writers = writers
        self.metrics = metrics
        self.limits = Limits(settings.max_batch, settings.max_future, settings.max_age)
        self.auth = Authenticator(settings.auth, store)
        #: The event loop's longest task steps (:mod:`trioagg.loopwatch`).
        self.loop_steps = LongSteps(metrics)
        #: Worker threads building big answers.
        self.answering = trio.CapacityLimiter(2)
        #: Queries holding rows read from the store, from their read to their answer:
        #: as many as can read at once and be built at once. The others wait before
        #: reading, so that the rows in memory are bounded (see the README's Limits).
        self.querying = trio.CapacityLimiter(settings.readers + 2)
        #: The StatsD receiver, with ``--statsd`` (in one process of several).
        self.statsd: Receiver | None = None
        #: Cumulative OTLP streams' last points, to turn them into deltas.
        self.otlp_streams = Streams()

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, settings: Settings, metrics: Metrics, statsd_socket: socket.socket | None = None
    ) -> AsyncIterator[Service]:
        """Run the service for the body of the ``async with``; with ``--statsd``, receive
        StatsD on ``statsd_socket`` (bound by ``trioagg serve`` or its supervisor), or on
        a socket bound here. Leaving it: stop receiving StatsD and admitting
        requests, stop the purge and wait for it, close the writers' channels, drain them
        under ``drain_timeout`` (shielded from cancellation), answer what is left
        unstored, and close the store once no thread uses it. A writer that crashes
        cancels the body and the exception comes out of the ``async with``."""
        store = await open_store(settings)
        try:
            read_cache = ReadCache(
                entries=settings.read_cache_entries,
                max_bytes=settings.read_cache_bytes,
                ttl=settings.read_cache_ttl,
            )
            writers = Writers(
                store,
                metrics,
                committed=read_cache.committed if read_cache.enabled else None,
                count=settings.writers,
                batch_size=settings.batch_size,
                queue_size=settings.queue_size,
                enqueue_timeout=settings.enqueue_timeout,
                max_inflight=settings.max_inflight,
                flush_window=settings.flush_window,
                head_max=settings.head_max,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(writers.run)
                service = cls(settings, store, writers, metrics, read_cache)
                async with trio.open_nursery() as helpers:
                    interval = min(60.0, settings.dedup_window / 10)
                    helpers.start_soon(purge_expired_ids, store, interval)
                    helpers.start_soon(watch_loop_stalls, metrics)
                    helpers.start_soon(service.auth.record_uses)
                    if settings.auth == "auto":
                        await helpers.start(service.auth.watch_keys)
                    if settings.statsd is not None:
                        sock = statsd_socket or open_statsd_socket(settings.statsd)
                        service.statsd = Receiver(sock, writers, metrics, service.limits)
                        await helpers.start(service.statsd.run)
                        log.info("receiving StatsD on udp %s", service.statsd.address)
                    helpers.start_soon(
                        sample_loop_steps, service.loop_steps, settings.loop_step_sampling
                    )
                    tune_garbage_collector()
                    log.info(
                        "trioagg started: %s, %s buckets, %d writer(s), batch %d events, "
                        "queue %d requests, auth %s (%s)",
                        store.backend.description,
                        _BUCKET_NAMES[store.bucket],
                        settings.writers,
                        settings.batch_size,
                        settings.queue_size,
                        settings.auth,
                        _auth_state(settings.auth, required=service.auth.required),
                    )
                    try:
                        yield service
                    finally:
                        writers.accepting = False
                        helpers.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await service._drain()
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()

    async def _drain(self) -> None:
        """Commit what is queued, until ``drain_timeout``, logging progress every
        :data:`DRAIN_PROGRESS_SECONDS`; then answer the rest unstored."""
        writers, timeout = self.writers, self.settings.drain_timeout
        before, queued = writers.committed_events, writers.queued()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_drain, before, trio.current_time() + timeout)
            drained = await writers.drain(timeout)
            nursery.cancel_scope.cancel()
        if not drained:
            log.error(
                "the drain deadline (%gs, drain_timeout) passed: the rest went unstored", timeout
            )
        log.info(
            "trioagg stopped: %d queued requests at shutdown, %d events committed while "
            "draining, %d since start",
            queued,
            writers.committed_events - before,
            writers.committed_events,
        )

    async def _report_drain(self, before: int, deadline: float) -> None:
        """Until cancelled, log what a long drain has left and done, so that an operator
        waiting for the process to exit sees it progress (or stuck on the store)."""
        while True:
            await trio.sleep(DRAIN_PROGRESS_SECONDS)
            requests, events = self.writers.waiting()
            log.info(
                "draining: %d events of %d requests still to commit, %d events committed "
                "since shutdown began, %.0fs left of drain_timeout",
                events,
                requests,
                self.writers.committed_events - before,
                max(0.0, deadline - trio.current_time()),
            )


#: How often a drain at shutdown logs its progress.
DRAIN_PROGRESS_SECONDS = 2.0


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


def create_app(settings: Settings | None = None) -> TrioaggApp:
    """The ASGI app. Without ``settings`` (the hypercorn factory) they come from
    ``TRIOAGG_*`` variables, and a bad variable or a store that cannot be opened
    ends the process at once with one line and exit code 2."""
    if settings is None:
        _configure_logging("info")
        try:
            settings = Settings.from_env()
        except ConfigError as error:
            exit_for_config(error)
        exit_unless_store_opens(settings)
        if multiprocessing.parent_process() is not None:
            # A hypercorn worker: its main process stops it through a shared event, and
            # SIGTERMs the workers still running as soon as one has exited, which would
            # kill this one in the middle of its drain. The drain has its own deadline.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging(settings.log_level)
    app = TrioaggApp(settings)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.before_serving(app.start_service)
    app.after_serving(app.stop_service)
    _add_routes(app)
    add_dashboard(app)
    _add_error_handlers(app)
    _time_and_authenticate_every_request(app)
    app.asgi_app = guard_connections(  # type: ignore[method-assign,assignment]
        app.asgi_app, closing=lambda: app.stopping, send_timeout=settings.send_timeout
    )
    return app


def _auth_state(mode: str, *, required: bool) -> str:
    """What the start-up log says of ``--auth``."""
    if mode == "off":
        return "keys never required"
    if required:
        return "keys required"
    return "no key yet: served without one to loopback connections only"


def exit_unless_store_opens(settings: Settings, *, listening: bool = False) -> Settings:
    """Open (creating if needed) and close the store once, before anything listens: if
    it cannot be opened, log one line naming it and why, and exit with code 2. Call it
    where no trio run is going on (a command line, a worker loading the app).

    With ``listening`` (``trioagg serve``, which knows the address it binds), return the
    settings with ``--auth auto`` settled for that address (:func:`~trioagg.auth.settle_mode`),
    exiting the same way when a non-loopback address has no key to require: then a store
    that did not exist is not created (a server that cannot start leaves nothing behind)."""

    async def open_and_close() -> tuple[bool, bool]:
        """(whether the store exists, whether it holds a key)."""
        if listening and key_required_to_start(settings) and not await store_exists(settings):
            return False, False  # refused below, before anything is created
        store = await open_store(settings)
        try:
            return True, await store.any_api_key()
        finally:
            await store.aclose()

    _configure_logging(settings.log_level)
    try:
        found, keys_exist = trio.run(open_and_close)
        if not listening:
            return settings
        return settle_mode(settings, keys_exist=keys_exist, store_exists=found)
    except ConfigError as error:
        exit_for_config(error)


def exit_for_config(error: ConfigError) -> NoReturn:
    """End a process that cannot start: one line saying why, exit code 2."""
    _configure_logging("info")
    log.error("trioagg cannot start: %s", error)
    sys.exit(2)


def _time_and_authenticate_every_request(app: TrioaggApp) -> None:
    """Observe ``trioagg_request_seconds{endpoint, status}`` for every answer, errors too,
    and check every request to an endpoint of :data:`ENDPOINT_SCOPES` (the data) before
    the view runs: while no key is required, that its Host names this server
    (:mod:`trioagg.hosts`); then its key. A refused request never reaches the
    body-reading, admission or store code (what arrived of its body meanwhile is bounded
    by max_body, and the connection is closed after the answer, see guard_connections).
    CORS preflights (OPTIONS) carry no credentials by design and are never refused.

    One before_request hook does it all (the clock first, so a refusal is timed too):
    Quart awaits each hook through ``ensure_async``, which costs microseconds per hook
    on every request."""
    scopes = dict(ENDPOINT_SCOPES)
    if app.settings.metrics_public:
        del scopes["/metrics"]
    authenticating = app.settings.auth != "off"
    hosts = AllowedHosts.of(app.settings)
    timer = bound_children(app.metrics.request_seconds)

    @app.before_request
    async def start_clock_and_authenticate() -> None:
        # One look-up of the request context, not one per attribute (microseconds each).
        current: TimedRequest = request._get_current_object()  # type: ignore[attr-defined]
        current.started = time.perf_counter()
        rule = current.url_rule
        if rule is None or rule.rule not in ENDPOINT_SCOPES or current.method == "OPTIONS":
            return
        auth = app.service.auth
        if not auth.required:
            hosts.check(current.headers.get("Host"), current.scope.get("server"))
        scope = scopes.get(rule.rule)
        if authenticating and scope is not None:
            key = await auth.check(
                current.headers.get("Authorization"), scope, current.scope.get("server")
            )
            g.trioagg_key = key

    @app.after_request
    async def stop_clock(response: Response) -> Response:
        current: TimedRequest = request._get_current_object()  # type: ignore[attr-defined]
        if current.started is not None:
            rule = current.url_rule.rule if current.url_rule is not None else "unrouted"
            timer(rule, response.status_code).observe(time.perf_counter() - current.started)
        return response


def bound_children(metric: _Labelled) -> Callable[..., _Labelled]:
    """``metric.labels``, remembering each child it returns. A child is made (and its
    sample appears) on its first use, as with ``labels``, whose lock and argument
    checks cost about a microsecond on every call."""
    return functools.cache(metric.labels)


def _configure_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def _json(document: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(document), status, content_type="application/json")


def _json_body(body: bytes) -> Response:
    """A 200 answer whose JSON is already encoded."""
    return Response(body, 200, content_type="application/json")


def _json_pieces(pieces: Pieces) -> Response:
    """A 200 answer whose JSON is already encoded in pieces, sent one after the other
    and each let go once sent, so that a big answer is not held whole while it is sent,
    nor copied into one string; once all are sent, the memory they took is given back."""
    if len(pieces.chunks) == 1:
        return _json_body(pieces.chunks[0])
    response = Response(_sent(pieces.chunks), 200, content_type="application/json")
    response.content_length = pieces.size
    return response


async def _sent(chunks: list[bytes]) -> AsyncIterator[bytes]:
    chunks.reverse()
    while chunks:
        yield chunks.pop()
    await trio.to_thread.run_sync(give_back, False)


def _add_routes(app: TrioaggApp) -> None:
    @app.post("/v1/events")
    async def post_events() -> Response:
        service = app.service
        settings = service.settings
        body_form = body_format(request.headers)
        durable = _wait_param(request.args.get("wait"))
        # The body holds in-flight bytes as they arrive (and inflate), until its events
        # are queued: a slow upload holds only what it sent, not what it may send.
        with service.writers.inflight.holding() as hold:
            # Read before taking an admission token: a slow upload holds none.
            body = await read_body(
                request,
                body_form.encoding,
                max_body=settings.max_body,
                timeout=settings.body_timeout,
                keep=hold.grow,
            )
            await service.writers.admit()
            try:
                points = await decode_body(
                    body,
                    ndjson=body_form.ndjson,
                    limits=service.limits,
                    now=time.time(),
                    tenant=current_tenant(),
                )
                submission = (
                    await service.writers.submit(points, durable=durable) if points else None
                )
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
        if durable:
            return _json({"accepted": len(points), "duplicates": duplicates})
        return _json({"accepted": len(points)}, 202)

    rejected_points = bound_children(app.metrics.otlp_rejected)

    @app.post("/v1/metrics")
    async def post_metrics() -> Response:
        """OTLP/HTTP metrics (see :mod:`trioagg.otlp`): stored like /v1/events with
        ``wait=true``, answered with OTLP's response, a partial success naming the data
        points refused. Requests with cumulative points take turns (:class:`Streams`)
        from computing their deltas until their events are committed."""
        service = app.service
        settings = service.settings
        writers = service.writers
        protobuf = otlp.media_type(request.headers)
        encoding = content_encoding(request.headers)
        submission = None
        async with contextlib.AsyncExitStack() as turn:
            with writers.inflight.holding() as hold:
                body = await read_body(
                    request,
                    encoding,
                    max_body=settings.max_body,
                    timeout=settings.body_timeout,
                    keep=hold.grow,
                )
                await writers.admit()
                try:
                    export = await build(
                        len(body) // 64, functools.partial(otlp.decode, body, protobuf=protobuf)
                    )
                    streams = service.otlp_streams
                    if otlp.has_cumulative(export):
                        await turn.enter_async_context(streams.lock)
                    mapping = otlp.Mapping(
                        service.limits,
                        settings.otlp_resource_attributes,
                        current_tenant(),
                        follows_streams=settings.workers == 1,
                    )
                    mapped = await build(
                        len(body) // 64,
                        functools.partial(otlp.map_request, export, mapping, streams, time.time()),
                    )
                    del export
                    if mapped.points:
                        submission = await writers.submit(mapped.points, durable=True)
                finally:
                    writers.admitted()
            if submission is not None:
                app.metrics.events_accepted.inc(len(mapped.points))
                await submission.wait_committed()
            streams.keep(mapped.updates)
        app.metrics.otlp_accepted.inc(mapped.accepted)
        for reason, number in mapped.rejected.items():
            rejected_points(reason).inc(number)
        body = otlp.answer(sum(mapped.rejected.values()), mapped.error_message(), protobuf=protobuf)
        return Response(body, 200, content_type=otlp.PROTOBUF if protobuf else otlp.JSON)

    app.config.setdefault("QUERY_BUDGET", DEFAULT_BUDGET)
    counted = bound_children(app.metrics.read_cache)
    # Hot reads repeat the same few query strings: each is parsed and checked once.
    parsed: ParsedQueries[tuple[Query, Hashable | None]] = ParsedQueries()

    async def build(work: int, make: Callable[[], _Built]) -> _Built:
        """``make()``, on the event loop when small, else in a worker thread."""
        if work <= INLINE_WORK:
            return make()
        return await trio.to_thread.run_sync(make, limiter=app.service.answering)

    async def read_and_answer(
        query: Query, budget: Budget, tenant: str | None, *, keep: bool = False
    ) -> tuple[Pieces, CachedAnswer | None]:
        """Read the rows of ``query`` and answer it, one of at most ``querying`` queries
        holding rows; after a big one, give back to the system the memory it freed.
        ``keep``: also what the read cache needs to answer it again, if it is small."""
        service = app.service
        size = 0
        try:
            async with service.querying:
                parts = await service.store.read_parts(
                    query.keys,
                    query.start,
                    query.end,
                    sketches=query.needs_sketches,
                    limit=budget.rows + 1,
                    tenant=tenant,
                )
                cached = None
                if keep and len(parts.stored) <= INLINE_WORK:  # answer() merges rows
                    stored = [copy_row(row, query.needs_sketches) for row in parts.stored]
                    cached = CachedAnswer(stored, parts.generations, parts.versions)
                # One list, which answer() empties: no other holds the rows read once it
                # has merged them, so give_back() below can return their memory.
                rows = parts.stored
                rows.extend(parts.overlay)
                parts.overlay.clear()
                size = work(query, rows)
                pieces = await build(size, functools.partial(answer, query, rows, budget))
                return pieces, cached
        finally:
            if size > INLINE_WORK:  # answer() has emptied rows, answered or refused
                # A full collection walks every query's rows: the last query out runs it.
                last = service.querying.statistics().borrowed_tokens == 0
                await trio.to_thread.run_sync(give_back, last)

    async def answer_again(
        key: Hashable, cached: CachedAnswer, query: Query, budget: Budget, tenant: str | None
    ) -> bytes | None:
        """The answer of a cached read as the store stands now, None when its kept rows
        are stale (this process flushed since): the answer kept if the heads hold its
        keys as they did, else the kept rows merged with what the heads hold now."""
        store, cache = app.service.store, app.service.read_cache
        if not cache.current(cached.generations, store.generations()):
            return None
        if store.versions(query.keys) == cached.versions:
            return cached.body
        found = await store.overlay(
            query.keys, query.start, query.end, sketches=query.needs_sketches, tenant=tenant
        )
        if found is None:
            return None
        overlay, generations, versions = found
        if not cache.current(cached.generations, generations):
            return None
        rows = [*(copy_row(row, query.needs_sketches) for row in cached.stored), *overlay]
        body = (
            await build(work(query, rows), functools.partial(answer, query, rows, budget))
        ).joined()
        fresh = CachedAnswer(cached.stored, generations, versions, body)
        cache.refresh(key, fresh, fresh.size)
        return body

    @app.get("/v1/aggregates")
    async def get_aggregates() -> Response:
        service = app.service
        cache = service.read_cache
        current: TimedRequest = request._get_current_object()  # type: ignore[attr-defined]
        raw = current.query_string
        budget: Budget = app.config["QUERY_BUDGET"]
        tenant = current_tenant()
        bucket = service.store.bucket
        context = (tenant, budget, bucket)
        known = parsed.get(raw, context)
        if known is None:
            args = current.args
            query = parse_query(args, bucket=bucket, now=time.time(), budget=budget)
            if tenant is not None:
                query = dataclasses.replace(query, tags=tenant_tags(query.tags, tenant))
            _check_quantiles_kept(query, service)
            # A tenant's reads carry its tag in query.tags, so tenants never share an entry.
            known = query, cache_key(query) if cache.enabled else None
            if is_timeless(args):
                parsed.put(raw, context, known, query.edges_held)
        query, key = known
        cached = cache.get(key) if key is not None else None
        if cached is not None:
            body = await answer_again(key, cached, query, budget, tenant)
            if body is not None:
                counted("hit").inc()
                return _json_body(body)
        with cache.reading(query.keys, query.start, query.end) as keep:
            pieces, made = await read_and_answer(query, budget, tenant, keep=key is not None)
            if key is not None:
                counted("miss").inc()
                if made is not None and cache.keeps(query.keys, pieces.size + made.size):
                    made.body = pieces.joined()
                    keep(key, made, made.size)
                    return _json_body(made.body)
        return _json_pieces(pieces)

    async def flushed() -> None:
        """Wait, up to ``store_timeout``, until the rollups table holds what this process
        acknowledged: /v1/keys and /v1/top read the table alone. (A flush that fails or
        waits for a locked database is not waited for longer: the read goes on.)"""
        with trio.move_on_after(app.service.settings.store_timeout):
            await app.service.writers.flushed()

    @app.get("/v1/keys")
    async def get_keys() -> Response:
        query = parse_keys_query(request.args)
        await flushed()
        series = await app.service.store.list_keys(
            query.prefix, query.after, query.limit, current_tenant()
        )
        return _json_body(await build(len(series), functools.partial(keys_answer, query, series)))

    @app.get("/v1/top")
    async def get_top() -> Response:
        store = app.service.store
        query = parse_top_query(request.args, bucket=store.bucket, now=time.time())
        await flushed()
        ranked = await store.top(
            query.start, query.end, query.stat, query.prefix, query.limit, current_tenant()
        )
        return _json_body(top_answer(query, ranked))

    @app.get("/healthz")
    async def healthz() -> Response:
        if app.crashed is not None:
            return _json({"status": "failing", "reason": "the service crashed; exiting"}, 503)
        if not app.service.writers.running:
            return _json({"status": "failing", "reason": "the writers are not running"}, 503)
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
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

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await app.metrics.rendered()
        return Response(body, 200, content_type=METRICS_CONTENT_TYPE)

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
                    "all). Percentiles then cover the events received from then on, and are "
                    "null for buckets of events received before: a sketch is built from each "
                    "value as it arrives, and values are not kept",
                }
            ],
        )


def _wait_param(text: str | None) -> bool:
    if text is None:
        return True
    try:
        return parse_wait(text)
    except ValueError as error:
        raise RequestError(f"wait {error}") from None


def _add_error_handlers(app: TrioaggApp) -> None:
    @app.errorhandler(RequestError)
    async def request_error(error: RequestError) -> Response:
        app.metrics.requests_rejected.labels(error.code).inc()
        if isinstance(error, Unauthorized | Forbidden):
            app.metrics.auth_refused.labels(error.reason).inc()
        return Response(
            error.body(), error.status, headers=error.headers(), content_type="application/json"
        )

    @app.errorhandler(StoreOutage)
    async def store_outage(error: StoreOutage) -> Response:
        log.warning(
            "%s %s: the store is unavailable: %s", request.method, request.path, error.__cause__
        )
        return await request_error(
            StoreUnavailable(f"the store cannot answer now ({error.reason}); retry later")
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
