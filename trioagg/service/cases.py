"""The requests' use cases as plain async functions over a running
:class:`~trioagg.service.lifecycle.Service`: accepting a batch of events, accepting an OTLP
export, and answering aggregates, keys, top and status queries.

They know nothing of Quart. A view (:mod:`trioagg.http.app`) reads what HTTP carries (the
headers, the query string, the key's tenant), hands over a function that reads the
body, and turns what comes back into a response; an error they raise is a
:class:`~trioagg.core.errors.RequestError` the view's error handler answers. Tests call
them with a service and no socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
import trio

from .. import __version__
from ..core.answers import Pieces, Status
from ..core.errors import Forbidden, InvalidEvents, InvalidQuery
from ..core.stats import is_percentile
from ..ingest import otlp
from ..ingest.decode import decode_body
from ..keys.auth import tenant_tags
from ..query.aggregates import (
    ParsedQueries,
    Query,
    answer,
    is_timeless,
    parse_query,
    tier_cut_problem,
    work,
)
from ..query.budget import INLINE_WORK, Budget
from ..query.discovery import keys_answer, parse_keys_query, parse_top_query, top_answer
from ..query.params import STATUS, parse_args
from ..query.readcache import CachedAnswer, cache_key
from ..store import TierCut
from ..store.head import copy_row
from .lifecycle import Service
from .memory import give_back
from .metrics import Metrics, bound_children

_Built = TypeVar("_Built")


class BodyReader(Protocol):
    """Reads a request's body, calling ``keep(size)`` for each piece as it arrives (and
    inflates), which raises to refuse it (:meth:`~trioagg.ingest.writer.Admission.grow`)."""

    def __call__(self, *, keep: Callable[[int], None]) -> Awaitable[bytes]: ...


@dataclass(frozen=True, slots=True)
class Stored:
    """What became of a request's events."""

    #: Events the request carried, all queued.
    events: int
    #: Of those, events whose id was stored before (counted once); 0 unless durable.
    duplicates: int = 0


async def accept_events(
    service: Service, read: BodyReader, *, ndjson: bool, durable: bool, tenant: str | None
) -> Stored:
    """Read one request's body of events, validate them (all or none), queue them with
    the writers and, when ``durable``, wait for their commit. Raises
    :class:`~trioagg.core.errors.InvalidEvents` (nothing stored) or what the admission raises
    (:class:`~trioagg.core.errors.Overloaded`, ...), and :class:`~trioagg.core.errors.CommitFailed`
    when a durable commit failed."""
    metrics = service.metrics

    async with service.writers.admission() as admission:
        # Read before taking an admission token: a slow upload holds none.
        body = await read(keep=admission.grow)

        async def decoded() -> list[Any]:
            return await decode_body(
                body, ndjson=ndjson, limits=service.limits, now=time.time(), tenant=tenant
            )

        try:
            points, submission = await admission.queue(decoded, durable=durable)
        except InvalidEvents as error:
            metrics.events_rejected.inc(error.event_count)
            metrics.events_past_retention.inc(error.past_retention)
            raise
    if submission is None:
        return Stored(len(points))
    metrics.events_accepted.inc(len(points))
    if not durable:
        return Stored(len(points))
    await submission.wait_committed()
    return Stored(len(points), submission.duplicates)


async def accept_otlp(
    service: Service, read: BodyReader, *, protobuf: bool, tenant: str | None
) -> bytes:
    """Store an OTLP/HTTP metrics export (see :mod:`trioagg.ingest.otlp`) like events with
    ``wait=true`` and return OTLP's answer: a partial success naming the data points
    refused. Requests with cumulative points take turns (:class:`~trioagg.ingest.otlp.Streams`)
    from computing their deltas until their events are committed."""
    settings, metrics = service.settings, service.metrics
    streams = service.otlp_streams
    mapped: otlp.Mapped | None = None
    async with contextlib.AsyncExitStack() as turn:
        async with service.writers.admission() as admission:
            body = await read(keep=admission.grow)

            async def mapped_points() -> list[Any]:
                nonlocal mapped
                export = await build(
                    service,
                    len(body) // 64,
                    functools.partial(otlp.decode, body, protobuf=protobuf),
                )
                if otlp.has_cumulative(export):
                    await turn.enter_async_context(streams.lock)
                mapping = otlp.Mapping(
                    service.limits,
                    settings.otlp_resource_attributes,
                    tenant,
                    follows_streams=settings.workers == 1,
                )
                mapped = await build(
                    service,
                    len(body) // 64,
                    functools.partial(otlp.map_request, export, mapping, streams, time.time()),
                )
                return mapped.points

            points, submission = await admission.queue(mapped_points, durable=True)
        assert mapped is not None
        if submission is not None:
            metrics.events_accepted.inc(len(points))
            await submission.wait_committed()
        streams.keep(mapped.updates)
    metrics.otlp_accepted.inc(mapped.accepted)
    for reason, number in mapped.rejected.items():
        metrics.otlp_rejected.labels(reason).inc(number)
    return otlp.answer(sum(mapped.rejected.values()), mapped.error_message(), protobuf=protobuf)


async def build(service: Service, work: int, make: Callable[[], _Built]) -> _Built:
    """``make()``, on the event loop when small, else in a worker thread."""
    if work <= INLINE_WORK:
        return make()
    return await trio.to_thread.run_sync(make, limiter=service.answering)


class Aggregates:
    """Answers ``/v1/aggregates`` queries: parsing each query string once (hot reads
    repeat the same few), answering from the read cache when it can, else reading the
    store."""

    def __init__(self, metrics: Metrics) -> None:
        self._parsed: ParsedQueries[tuple[Query, Hashable | None]] = ParsedQueries()
        self._counted = bound_children(metrics.read_cache)

    async def answer(
        self,
        service: Service,
        query_string: bytes,
        args: Mapping[str, Any],
        *,
        tenant: str | None,
        budget: Budget,
    ) -> bytes | Pieces:
        """The answer's JSON to the query of ``args`` (whose text is ``query_string``),
        whole or in pieces. Raises :class:`~trioagg.core.errors.InvalidQuery`."""
        cache = service.read_cache
        store = service.store
        bucket = store.bucket
        now = time.time()
        # Where the coarse tiers hold data moves with the clock: a query parsed before a
        # roll is parsed again after it.
        held = store.tiers_held(now)
        context = (tenant, budget, bucket, held)
        known = self._parsed.get(query_string, context)
        if known is None:
            query = parse_query(
                args, bucket=bucket, now=now, budget=budget, tiers=store.policy.tiers, held=held
            )
            if tenant is not None:
                query = dataclasses.replace(query, tags=tenant_tags(query.tags, tenant))
            _check_quantiles_kept(query, service)
            # A tenant's reads carry its tag in query.tags, so tenants never share an entry.
            known = query, cache_key(query) if cache.enabled else None
            if is_timeless(args):
                self._parsed.put(query_string, context, known, query.edges_held)
        query, key = known
        cached = cache.get(key) if key is not None else None
        if cached is not None:
            body = await _answer_again(service, key, cached, query, budget, tenant)
            if body is not None:
                self._counted("hit").inc()
                return body
        with cache.reading(query.keys, query.start, query.end) as keep:
            pieces, made = await _read_and_answer(
                service, query, budget, tenant, keep=key is not None
            )
            if key is not None:
                self._counted("miss").inc()
                if made is not None and cache.keeps(query.keys, pieces.size + made.size):
                    made.body = pieces.joined()
                    keep(key, made, made.size)
                    return made.body
        return pieces


async def _read_and_answer(
    service: Service, query: Query, budget: Budget, tenant: str | None, *, keep: bool = False
) -> tuple[Pieces, CachedAnswer | None]:
    """Read the rows of ``query`` and answer it, one of at most ``querying`` queries
    holding rows; after a big one, give back to the system the memory it freed.
    ``keep``: also what the read cache needs to answer it again, if it is small."""
    size = 0
    try:
        async with service.querying:
            store = service.store
            try:
                parts = await store.read_parts(
                    query.keys,
                    query.start,
                    query.end,
                    sketches=query.needs_sketches,
                    limit=budget.rows + 1,
                    tenant=tenant,
                    fits=query.holds_whole if store.policy.tiers is not None else None,
                )
            except TierCut as cut:
                raise tier_cut_problem(query, cut) from None
            cached = None
            if keep and len(parts.stored) <= INLINE_WORK:  # answer() merges rows
                stored = [copy_row(row, query.needs_sketches) for row in parts.stored]
                cached = CachedAnswer(stored, parts.generations, parts.versions, tenant=tenant)
            # One list, which answer() empties: no other holds the rows read once it
            # has merged them, so give_back() below can return their memory.
            rows = parts.stored
            rows.extend(parts.overlay)
            parts.overlay.clear()
            size = work(query, rows)
            pieces = await build(service, size, functools.partial(answer, query, rows, budget))
            return pieces, cached
    finally:
        if size > INLINE_WORK:  # answer() has emptied rows, answered or refused
            # A full collection walks every query's rows: the last query out runs it.
            last = service.querying.statistics().borrowed_tokens == 0
            await trio.to_thread.run_sync(give_back, last)


async def _answer_again(
    service: Service,
    key: Hashable,
    cached: CachedAnswer,
    query: Query,
    budget: Budget,
    tenant: str | None,
) -> bytes | None:
    """The answer of a cached read as the store stands now, None when its kept rows
    are stale (this process flushed since, and the entry did not take that flush in):
    the answer kept if the heads hold its keys as they did, else the kept rows (with
    what flushes wrote since, :meth:`~trioagg.query.readcache.CachedAnswer.stored_now`)
    merged with what the heads hold now."""
    store, cache = service.store, service.read_cache
    read_at = cached.generations
    if not cache.current(read_at, store.generations()):
        return None
    if store.versions(query.keys) == cached.versions:
        return cached.body
    stored = cached.stored_now(query.start, query.end) if cached.flushed else cached.stored
    if len(stored) > INLINE_WORK:
        cache.discard(key)  # flushes grew it past what a cached read merges on the loop
        return None
    found = await store.overlay(
        query.keys, query.start, query.end, sketches=query.needs_sketches, tenant=tenant
    )
    if found is None:
        return None
    overlay, generations, versions = found

    def unflushed() -> bool:
        # Whether no flush of its keys committed since ``stored`` was taken: one that did
        # dropped the entry or made it take the flush in (its generations moved on).
        return cached.generations == read_at and cache.holds(key, cached)

    if not cache.current(read_at, generations) or not unflushed():
        return None
    rows = [*(copy_row(row, query.needs_sketches) for row in stored), *overlay]
    body = (
        await build(service, work(query, rows), functools.partial(answer, query, rows, budget))
    ).joined()
    if unflushed():  # else the answer is right as of the overlay, but no longer kept
        fresh = CachedAnswer(stored, generations, versions, body, tenant)
        cache.refresh(key, fresh, fresh.size)
    return body


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


async def _flushed(service: Service) -> None:
    """Wait, up to ``store_timeout``, until the rollups table holds what this process
    acknowledged: /v1/keys and /v1/top read the table alone. (A flush that fails or
    waits for a locked database is not waited for longer: the read goes on.)"""
    with trio.move_on_after(service.settings.store_timeout):
        await service.writers.flushed()


async def answer_keys(service: Service, args: Mapping[str, Any], *, tenant: str | None) -> bytes:
    """The ``/v1/keys`` answer's JSON: a page of series. Raises InvalidQuery."""
    query = parse_keys_query(args)
    await _flushed(service)
    series = await service.store.list_keys(query.prefix, query.after, query.limit, tenant)
    tiers = service.store.policy.tiers
    return await build(service, len(series), functools.partial(keys_answer, query, series, tiers))


async def answer_top(service: Service, args: Mapping[str, Any], *, tenant: str | None) -> bytes:
    """The ``/v1/top`` answer's JSON: keys ranked. Raises InvalidQuery."""
    store = service.store
    now = time.time()
    query = parse_top_query(
        args, bucket=store.bucket, now=now, tiers=store.policy.tiers, held=store.tiers_held(now)
    )
    await _flushed(service)
    ranked = await store.top(query.start, query.end, query.stat, query.prefix, query.limit, tenant)
    return top_answer(query, ranked)


async def answer_status(
    service: Service, metrics: Metrics, args: Mapping[str, Any], *, tenant: str | None
) -> bytes:
    """The ``/v1/status`` answer's JSON: the whole service's figures. Raises
    InvalidQuery, and Forbidden for a key with a tenant."""
    parse_args(STATUS, args)[1].raise_any()
    if tenant is not None:
        # The figures are the whole service's: they would tell one tenant of the others.
        raise Forbidden("the service's figures are for keys without a tenant", "tenant")
    # Summing the metrics takes ~1 ms of CPU: in a worker thread, shared by
    # concurrent requests.
    figures = status_figures(
        await metrics.totals(), bucket=service.store.bucket, quantiles=service.settings.quantiles
    )
    return msgspec.json.encode(figures)


def status_figures(
    totals: Mapping[str, float], *, bucket: int, quantiles: tuple[str, ...]
) -> Status:
    """The dashboard's figures, from the ``totals`` of what ``/metrics`` answers
    (:meth:`~trioagg.service.metrics.Metrics.sum_samples`: so, with ``PROMETHEUS_MULTIPROC_DIR``,
    counters are totals of every worker)."""

    def total(name: str) -> float:
        return totals.get(name, 0.0)

    return Status(
        version=__version__,
        time=time.time(),
        bucket_seconds=bucket,
        quantiles=list(quantiles),
        events_accepted=int(total("trioagg_events_accepted_total")),
        events_committed=int(total("trioagg_events_committed_total")),
        events_rejected=int(total("trioagg_events_rejected_total")),
        events_lost=int(total("trioagg_events_lost_total")),
        queue_depth=int(total("trioagg_queue_depth")),
        queue_capacity=int(total("trioagg_queue_capacity")),
        commits=int(total("trioagg_commit_seconds_count")),
        commit_seconds_sum=total("trioagg_commit_seconds_sum"),
        loop_stall_max_seconds=total("trioagg_loop_stall_max_seconds"),
        statsd_datagrams=int(total("trioagg_statsd_datagrams_total")),
        statsd_lines_parsed=int(total("trioagg_statsd_lines_parsed_total")),
        statsd_lines_refused=int(total("trioagg_statsd_lines_refused_total")),
        statsd_events_dropped=int(total("trioagg_statsd_events_dropped_total")),
        otlp_points_accepted=int(total("trioagg_otlp_points_accepted_total")),
        otlp_points_rejected=int(total("trioagg_otlp_points_rejected_total")),
    )
