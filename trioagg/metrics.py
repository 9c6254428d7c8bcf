"""Prometheus metrics of one trioagg app, in a registry of its own.

Each app owns a registry, so several apps in one process (tests, embedding)
never collide. Queue gauges are read from the channel's ``statistics()`` at
scrape time, so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_BATCH_BUCKETS = (1, 10, 100, 1_000, 5_000, 10_000, 50_000, 100_000)
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
        request_seconds = Histogram(
            "trioagg_request_seconds",
            "Time to answer a request, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ingest_seconds = request_seconds.labels("events")
        self.query_seconds = request_seconds.labels("aggregates")

    def watch_channels(self, statistics: Callable[[], list[trio.MemoryChannelStatistics]]) -> None:
        """Export the writers' channel statistics, summed over writers, as gauges."""
        gauges = [
            (
                "trioagg_queue_depth",
                "Requests waiting in the writers' channels.",
                "current_buffer_used",
            ),
            ("trioagg_queue_capacity", "Requests the writers' channels hold.", "max_buffer_size"),
            (
                "trioagg_queue_waiting_senders",
                "Requests waiting for room in a full channel.",
                "tasks_waiting_send",
            ),
        ]
        for name, description, field in gauges:

            def total(field: str = field) -> float:
                return float(sum(getattr(stats, field) for stats in statistics()))

            Gauge(name, description, registry=self.registry).set_function(total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
