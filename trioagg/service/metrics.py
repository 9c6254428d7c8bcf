"""Prometheus metrics of one trioagg app, in a registry of its own.

Each app owns a registry, so several apps in one process (tests, embedding)
never collide. Gauges of the moment (queue depth, the process's own figures,
build info) are read at scrape time, so the hot path pays nothing for them.

Several worker processes (``hypercorn --workers N``) each count their own
events; a scrape reaches one of them. When ``PROMETHEUS_MULTIPROC_DIR`` names
an empty folder shared by the workers (prometheus_client's multiprocess mode,
which must be chosen before the process starts), counters and histograms are
the totals of every worker that ever ran there, so they never go backwards
whichever worker answers; the gauges of the moment then carry a ``pid`` label.

Rendering takes milliseconds of CPU in a worker thread, which holds the GIL the
event loop needs: concurrent scrapes share renders (:class:`Coalesced`), so any
number of them costs at most two at a time, each render followed by a rest as
long (renders of /metrics take at most half the time, and sums of /v1/status
the same, however many scrapers keep coming),
and none is answered with figures older than its request.
``/v1/status`` sums the same samples, collected without the text (a tenth of the
CPU of rendering and parsing it), shared the same way.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .. import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BATCH_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000)
_STALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

T = TypeVar("T")


class Coalesced(Generic[T]):
    """An async computation whose concurrent callers share runs, yet never get a result
    older than their call.

    A call made while no run is under way starts one. A call made while one is under
    way waits for the *next* run, which starts once that one ends, and every call made
    meanwhile shares it. So each result comes from a run started after its call (it
    reflects everything that happened before the call), and any number of concurrent
    callers costs at most one run under way and one waiting.

    ``rest``: after a run of ``d`` seconds, the next one starts no sooner than
    ``rest * d`` seconds later, so that runs take at most ``1 / (1 + rest)`` of the time
    however many callers keep coming (each still started after its calls).

    A run belongs to the call that starts it, in that call's task. If that call is
    cancelled before its run has a result (a worker thread already running always
    finishes: ``trio.to_thread`` does not abandon it), or the run fails, only that call
    raises; the calls that were sharing the run start or join the next one.
    """

    def __init__(self, run: Callable[[], Awaitable[T]], *, rest: float = 0.0) -> None:
        self._run = run
        self.rest = rest
        #: When the next run may start, on trio's clock.
        self._rested = -math.inf
        self._running: _Run[T] | None = None
        #: The run the calls made while one is under way wait for; not started yet.
        self._next: _Run[T] | None = None
        #: Calls not answered yet (leading a run or waiting for one).
        self.callers = 0

    async def __call__(self) -> T:
        self.callers += 1
        try:
            run = self._join()
            while not run.done:
                if run.then is not None:  # its caller was cancelled or it failed
                    run = run.then
                elif self._running is None and trio.current_time() < self._rested:
                    await trio.sleep_until(self._rested)
                elif self._running is None:  # then ``run`` is the next one: start it
                    return await self._lead(run)
                else:
                    await self._running.ended.wait()
            return run.value
        finally:
            self.callers -= 1

    def _join(self) -> _Run[T]:
        if self._next is None:
            self._next = _Run()
        return self._next

    async def _lead(self, run: _Run[T]) -> T:
        self._next, self._running = None, run
        started = trio.current_time()
        try:
            run.value = await self._run()
            run.done = True
            return run.value
        finally:
            self._running = None
            ended = trio.current_time()
            self._rested = ended + self.rest * (ended - started)
            if not run.done:  # the calls sharing it, together, move on to the next run
                run.then = self._join()
            run.ended.set()


class _Run(Generic[T]):
    """One run of a :class:`Coalesced` computation, shared by the calls waiting for it."""

    value: T

    def __init__(self) -> None:
        self.ended = trio.Event()
        self.done = False
        #: For a run that ended without a result: the run its calls wait for instead.
        self.then: _Run[T] | None = None


_Labelled = TypeVar("_Labelled", bound=MetricWrapperBase)


def bound_children(metric: _Labelled) -> Callable[..., _Labelled]:
    """``metric.labels``, remembering each child it returns. A child is made (and its
    sample appears) on its first use, as with ``labels``, whose lock and argument
    checks cost about a microsecond on every call."""
    return functools.cache(metric.labels)


class Metrics:
    """The counters, gauges and histograms trioagg exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_accepted = Counter(
            "trioagg_events_accepted", "Events accepted (queued for commit).", registry=r
        )
        self.events_rejected = Counter(
            "trioagg_events_rejected", "Events in requests rejected as invalid.", registry=r
        )
        self.events_committed = Counter(
            "trioagg_events_committed", "Events committed to the store.", registry=r
        )
        self.events_duplicate = Counter(
            "trioagg_events_duplicate",
            "Events acknowledged but not counted: their id was already stored.",
            registry=r,
        )
        self.requests_rejected = Counter(
            "trioagg_requests_rejected",
            "Requests answered with an error, by code.",
            ["code"],
            registry=r,
        )
        self.auth_refused = Counter(
            "trioagg_auth_refused",
            "Requests refused for their API key (401, 403), by reason: missing, malformed, "
            "unknown, revoked, expired, scope, tenant, public_without_keys.",
            ["reason"],
            registry=r,
        )
        self.events_lost = Counter(
            "trioagg_events_lost",
            "Events answered 202 that were never stored, by reason.",
            ["reason"],
            registry=r,
        )
        self.rows_upserted = Counter(
            "trioagg_rows_upserted",
            "Rollup rows upserted by flushes and journal replays (after pre-aggregation).",
            registry=r,
        )
        self.flushes = Counter(
            "trioagg_flushes",
            "Flushes of a writer's head to the rollups table, by why: window (the flush "
            "window passed), size (the head reached --head-max), idle (no batch came), "
            "shutdown, read (a /v1/keys or /v1/top read waited for it).",
            ["why"],
            registry=r,
        )
        self.flush_failures = Counter(
            "trioagg_flush_failures",
            "Flushes that failed and changed nothing (the head is kept and flushed again).",
            registry=r,
        )
        self.flush_seconds = Histogram(
            "trioagg_flush_seconds",
            "Time to flush one head, retries on a locked database included.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rollups_refused = Counter(
            "trioagg_rollups_refused",
            "Rollups the rollups table refused at a flush (a stored row that cannot take "
            "a merge), kept in the table refused_rollups instead; each is logged.",
            registry=r,
        )
        self.journal_replayed = Counter(
            "trioagg_journal_replayed_events",
            "Events of journal rows left by a dead process (or this one's last run) that "
            "this process stored.",
            registry=r,
        )
        self.events_past_retention = Counter(
            "trioagg_events_past_retention",
            "Events refused (422) because they are older than the store keeps anything "
            "(the last tier's horizon of --tiers).",
            registry=r,
        )
        self.tier_rows_rolled = Counter(
            "trioagg_tier_rows_rolled",
            "Rows of a tier merged into the next tier's wider buckets once past its horizon.",
            registry=r,
        )
        self.tier_rows_dropped = Counter(
            "trioagg_tier_rows_dropped",
            "Rows of the last tier deleted once past the store's retention.",
            registry=r,
        )
        self.commit_failures = Counter(
            "trioagg_commit_failures", "Transactions that failed and stored nothing.", registry=r
        )
        self.batch_events = Histogram(
            "trioagg_batch_events",
            "Events per committed batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "trioagg_batch_requests",
            "Requests per committed batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "trioagg_commit_seconds",
            "Time to commit one batch to the journal, retries included.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_stall_seconds = Histogram(
            "trioagg_loop_stall_seconds",
            "How late the event loop woke a 10 ms heartbeat: time it was held by one task.",
            buckets=_STALL_BUCKETS,
            registry=r,
        )
        self.loop_step_cpu_seconds = Histogram(
            "trioagg_loop_step_cpu_seconds",
            "Task steps that held the event loop for at least 1 ms of its thread's CPU "
            "(timed while sampling, see --loop-step-sampling), by CPU seconds.",
            buckets=_STALL_BUCKETS,
            registry=r,
        )
        self.loop_steps_timed = Counter(
            "trioagg_loop_steps_timed",
            "Task steps of the event loop timed by the step timer (all, long or not).",
            registry=r,
        )
        self.read_cache = Counter(
            "trioagg_read_cache",
            "Aggregates queries answered from the read cache (hit) or read from the store (miss).",
            ["result"],
            registry=r,
        )
        self.contained_failures = Counter(
            "trioagg_contained_failures",
            "Unexpected failures kept to where they happened, each logged with its "
            "traceback, by where: connection (one connection ended, the server went on), "
            "commit_follow_up (work after a commit, which stands).",
            ["where"],
            registry=r,
        )
        for where in ("connection", "commit_follow_up"):  # 0 until one happens, not absent
            self.contained_failures.labels(where)
        self.statsd_datagrams = Counter(
            "trioagg_statsd_datagrams", "StatsD datagrams received (--statsd).", registry=r
        )
        self.statsd_parsed = Counter(
            "trioagg_statsd_lines_parsed",
            "StatsD lines parsed into events (queued, or dropped as counted apart).",
            registry=r,
        )
        self.statsd_refused = Counter(
            "trioagg_statsd_lines_refused",
            "StatsD lines refused, by reason: malformed, name, type, value, rate, tags, "
            "time, unsupported (DogStatsD events, service checks), too_many_events.",
            ["reason"],
            registry=r,
        )
        self.statsd_dropped = Counter(
            "trioagg_statsd_events_dropped",
            "Events of StatsD lines parsed but not queued, by reason: queue_full (the "
            "writers' queue or the receiver's own stayed full), store_unavailable, shutdown "
            "(parsed as the service stopped).",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "store_unavailable"):
            self.statsd_dropped.labels(reason)
        self.otlp_accepted = Counter(
            "trioagg_otlp_points_accepted",
            "OTLP data points stored (POST /v1/metrics), each as one or more events.",
            registry=r,
        )
        self.otlp_rejected = Counter(
            "trioagg_otlp_points_rejected",
            "OTLP data points refused (answered as rejected_data_points), by reason: value, "
            "time, name, tags, temporality, unsupported.",
            ["reason"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "trioagg_worker_restarts",
            "Worker processes that trioagg serve --workers N started to replace one that died.",
            registry=r,
        )
        self.request_seconds = Histogram(
            "trioagg_request_seconds",
            "Time to answer a request, by route and status code.",
            ["endpoint", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Figures of the moment: read at scrape time, never written to multiprocess files.
        self._live = CollectorRegistry()
        self._channels = _ChannelGauges()
        self._stalls = _Longest(
            "trioagg_loop_stall_max_seconds",
            "The longest the event loop was held by one task since the process started.",
        )
        self._steps = _Longest(
            "trioagg_loop_step_cpu_max_seconds",
            "The most CPU one task step used on the event loop since the process started "
            "(while sampling).",
        )
        self._live.register(self._channels)
        self._live.register(_BuildInfo())
        self._live.register(self._stalls)
        self._live.register(self._steps)
        self._live.register(ProcessCollector(registry=None))
        #: The thread that renders or sums the metrics (ms of CPU, reading files in
        #: multiprocess mode: never on the event loop), one at a time.
        self.rendering = trio.CapacityLimiter(1)
        #: :meth:`render`, in a worker thread; concurrent calls share renders. Callers
        #: that keep coming find it rendering at most half the time (``rest``; the sums
        #: of ``totals`` rest on their own).
        self.rendered = Coalesced(self._in_thread(self.render), rest=1.0)
        #: :meth:`sum_samples`, in a worker thread; concurrent calls share sums.
        self.totals = Coalesced(self._in_thread(self.sum_samples), rest=1.0)
        self._shared: CollectorRegistry | None = None
        if values.ValueClass is not values.MutexValue:  # PROMETHEUS_MULTIPROC_DIR is set
            self._shared = CollectorRegistry()
            MultiProcessCollector(self._shared)  # type: ignore[no-untyped-call]

    def count_contained(self, where: str) -> None:
        """Count a failure that was contained (``trioagg_contained_failures``). Where a
        failure is being contained, counting it must not fail in its turn."""
        with contextlib.suppress(Exception):
            self.contained_failures.labels(where).inc()

    def watch_channels(self, statistics: Callable[[], list[trio.MemoryChannelStatistics]]) -> None:
        """Export the writers' channel statistics, summed over writers, as gauges."""
        self._channels.statistics = statistics

    def loop_stalled(self, seconds: float) -> None:
        """Record one heartbeat's lateness."""
        self.loop_stall_seconds.observe(seconds)
        self._stalls.longest = max(self._stalls.longest, seconds)

    def loop_step(self, cpu_seconds: float) -> None:
        """Record one task step that used at least 1 ms of the loop thread's CPU."""
        self.loop_step_cpu_seconds.observe(cpu_seconds)
        self._steps.longest = max(self._steps.longest, cpu_seconds)

    def render(self) -> bytes:
        """What ``/metrics`` answers."""
        return b"".join(generate_latest(part) for part in self._exported())

    def sum_samples(self) -> dict[str, float]:
        """Every sample :meth:`render` writes, summed over its labels (histogram buckets
        left out), by name: collected, never written out as text and parsed again."""
        totals: dict[str, float] = {}
        for part in self._exported():
            for family in part.collect():
                for sample in family.samples:
                    if "le" not in sample.labels:
                        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def _exported(self) -> tuple[Collector, Collector]:
        if self._shared is None:
            return self.registry, self._live
        return self._shared, _PerProcess(self._live)

    def _in_thread(self, work: Callable[[], T]) -> Callable[[], Awaitable[T]]:
        async def run() -> T:
            return await trio.to_thread.run_sync(work, limiter=self.rendering)

        return run


_CHANNEL_GAUGES = [
    ("trioagg_queue_depth", "Requests waiting in the writers' channels.", "current_buffer_used"),
    ("trioagg_queue_capacity", "Requests the writers' channels hold.", "max_buffer_size"),
    (
        "trioagg_queue_waiting_senders",
        "Requests waiting for room in a full channel.",
        "tasks_waiting_send",
    ),
]


class _ChannelGauges(Collector):
    """The writers' channel statistics, summed over writers."""

    def __init__(self) -> None:
        self.statistics: Callable[[], list[trio.MemoryChannelStatistics]] = list

    def collect(self) -> Iterator[Metric]:
        current = self.statistics()
        for name, description, field in _CHANNEL_GAUGES:
            yield GaugeMetricFamily(
                name, description, value=float(sum(getattr(stats, field) for stats in current))
            )


class _Longest(Collector):
    """A gauge of the longest of something in this process since it started."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.longest = 0.0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, value=self.longest)


class _BuildInfo(Collector):
    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "trioagg_build_info", "The running trioagg and Python.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


class _PerProcess(Collector):
    """Another registry's samples with this process's ``pid`` as a label."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Metric]:
        pid = str(os.getpid())
        for family in self.inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, {**sample.labels, "pid": pid}, sample.value)
            yield labelled
