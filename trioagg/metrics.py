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
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Iterator

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BATCH_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000)
_STALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


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
            "trioagg_rows_upserted", "Rollup rows upserted (after pre-aggregation).", registry=r
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
            "Time to commit one batch, retries included.",
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
        #: The thread that renders the metrics (several ms of CPU, reading files in
        #: multiprocess mode: never on the event loop), one render at a time.
        self.rendering = trio.CapacityLimiter(1)
        self._shared: CollectorRegistry | None = None
        if values.ValueClass is not values.MutexValue:  # PROMETHEUS_MULTIPROC_DIR is set
            self._shared = CollectorRegistry()
            MultiProcessCollector(self._shared)  # type: ignore[no-untyped-call]

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

    async def render_in_thread(self) -> bytes:
        """:meth:`render`, in a worker thread."""
        return await trio.to_thread.run_sync(self.render, limiter=self.rendering)

    def render(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry) + generate_latest(self._live)
        return generate_latest(self._shared) + generate_latest(_PerProcess(self._live))


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
