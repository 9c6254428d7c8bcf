"""Event-loop stalls of a trioagg server, read from its ``/metrics`` text.

Every trioagg process wakes a 10 ms heartbeat and records how late it woke
(the time one task held the event loop): the histogram
``trioagg_loop_stall_seconds`` and the gauge ``trioagg_loop_stall_max_seconds``
(the longest since the process started; one sample per worker, labelled
``pid``, when ``PROMETHEUS_MULTIPROC_DIR`` is set). The harness runs every
trioagg server with a multiprocess folder of its own, so the histogram is
the sum over workers whichever worker answers a scrape.

This module turns scrapes into figures: :func:`parse` reads one scrape,
:func:`window` summarises the histogram between two scrapes (a phase) or
since start, :func:`longest` combines that with the gauges seen over several
scrapes. Pure functions; the scraping itself is the runner's and the load
generator's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "trioagg_loop_stall_seconds"
GAUGE = "trioagg_loop_stall_max_seconds"
#: A heartbeat this late counts as a long stall (``over_10ms``).
LONG_S = 0.010


@dataclass(frozen=True)
class Scrape:
    """The stall figures of one ``/metrics`` answer."""

    #: cumulative histogram: (upper bound in seconds, heartbeats at most that late),
    #: ascending, ending with ``inf``
    buckets: tuple[tuple[float, float], ...] = ()
    #: the longest stall since start, in seconds, by worker pid ("" without a pid label)
    longest: Mapping[str, float] = field(default_factory=dict)


def parse(text: str) -> Scrape:
    """The stall histogram and gauges of a Prometheus text exposition
    (an empty :class:`Scrape` if the server exports neither)."""
    buckets: list[tuple[float, float]] = []
    longest: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == HISTOGRAM:
            buckets = [
                (float(sample.labels["le"]), sample.value)
                for sample in family.samples
                if sample.name == HISTOGRAM + "_bucket"
            ]
        elif family.name == GAUGE:
            for sample in family.samples:
                longest[sample.labels.get("pid", "")] = sample.value
    return Scrape(tuple(sorted(buckets)), longest)


def window(after: Scrape, before: Scrape | None = None) -> dict[str, Any] | None:
    """The heartbeats recorded between two scrapes (or since start): how many, how
    many were late by more than :data:`LONG_S`, and ``at_most_ms``, the upper bound
    of the highest bucket that gained one (``None`` if beyond the last finite bound,
    0 if none was late at all). ``None`` if ``after`` has no histogram."""
    if not after.buckets:
        return None
    previous = dict(before.buckets) if before else {}
    counts = [(bound, count - previous.get(bound, 0.0)) for bound, count in after.buckets]
    total = counts[-1][1]
    at_or_below_long = next((count for bound, count in counts if bound >= LONG_S), total)
    at_most: float | None = 0.0
    below = 0.0
    for bound, count in counts:
        if count > below:
            at_most = None if math.isinf(bound) else round(bound * 1000, 3)
        below = count
    return {
        "heartbeats": int(total),
        "over_10ms": int(total - at_or_below_long),
        "at_most_ms": at_most,
    }


def longest(scrapes: Iterable[Scrape], workers: int) -> dict[str, Any] | None:
    """The longest stall since start over several scrapes of one server: the largest
    gauge seen (``max_ms``), the workers it came from, whether every one of
    ``workers`` was reached, and the histogram of the last scrape (:func:`window`)."""
    seen: dict[str, float] = {}
    last: Scrape | None = None
    for scrape in scrapes:
        if scrape.buckets or scrape.longest:
            last = scrape
        for pid, seconds in scrape.longest.items():
            seen[pid] = max(seen.get(pid, 0.0), seconds)
    if last is None:
        return None
    return {
        "max_ms": round(max(seen.values()) * 1000, 3) if seen else None,
        "by_pid_ms": {pid: round(seconds * 1000, 3) for pid, seconds in sorted(seen.items())},
        "all_workers_seen": len(seen) >= workers,
        **(window(last) or {}),
    }


def bound_ms(phase: Mapping[str, Any] | None, server: Mapping[str, Any] | None) -> float | None:
    """The tightest known upper bound of a phase's longest stall, in ms: the phase's
    histogram bound, or the server's largest gauge if that is lower and every worker's
    gauge was read (the gauge covers the whole run, so it bounds each phase)."""
    candidates = []
    if phase is not None and phase.get("at_most_ms") is not None:
        candidates.append(float(phase["at_most_ms"]))
    if server is not None and server.get("all_workers_seen") and server.get("max_ms") is not None:
        candidates.append(float(server["max_ms"]))
    return min(candidates) if candidates else None
