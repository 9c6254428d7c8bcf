"""Event-loop stalls and long task steps of a trioagg server, from its ``/metrics``.

Every trioagg process wakes a 10 ms heartbeat and records how late it woke
(the time one task held the event loop): the histogram
``trioagg_loop_stall_seconds`` and the gauge ``trioagg_loop_stall_max_seconds``
(the longest since the process started; one sample per worker, labelled
``pid``, when ``PROMETHEUS_MULTIPROC_DIR`` is set). The harness runs every
trioagg server with a multiprocess folder of its own, so the histogram is
the sum over workers whichever worker answers a scrape.

Every trioagg process also times the event loop's task steps on the loop
thread's CPU clock while it samples (``--loop-step-sampling``, see
``trioagg/service/loopwatch.py``): ``trioagg_loop_step_cpu_seconds`` counts the steps
that used at least 1 ms of CPU, ``trioagg_loop_steps_timed_total`` all steps
timed, and ``trioagg_loop_step_cpu_max_seconds`` is the longest since start.
A stall with no long CPU step is the process waiting for a core (or the GIL),
not a task holding the loop.

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
STEP_HISTOGRAM = "trioagg_loop_step_cpu_seconds"
STEP_GAUGE = "trioagg_loop_step_cpu_max_seconds"
STEPS_TIMED = "trioagg_loop_steps_timed"
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
    #: the long task steps' CPU histogram, as ``buckets`` (empty: not exported)
    step_buckets: tuple[tuple[float, float], ...] = ()
    #: the most CPU one task step used since start, in seconds, by worker pid
    step_longest: Mapping[str, float] = field(default_factory=dict)
    #: task steps timed since start (long or not)
    steps_timed: float = 0.0


def parse(text: str) -> Scrape:
    """The stall and step histograms and gauges of a Prometheus text exposition
    (an empty :class:`Scrape` if the server exports none)."""
    buckets: dict[str, tuple[tuple[float, float], ...]] = {}
    longest: dict[str, dict[str, float]] = {GAUGE: {}, STEP_GAUGE: {}}
    timed = 0.0
    for family in text_string_to_metric_families(text):
        if family.name in (HISTOGRAM, STEP_HISTOGRAM):
            buckets[family.name] = tuple(
                sorted(
                    (float(sample.labels["le"]), sample.value)
                    for sample in family.samples
                    if sample.name == family.name + "_bucket"
                )
            )
        elif family.name in longest:
            for sample in family.samples:
                longest[family.name][sample.labels.get("pid", "")] = sample.value
        elif family.name == STEPS_TIMED:
            timed = sum(s.value for s in family.samples if s.name == STEPS_TIMED + "_total")
    return Scrape(
        buckets.get(HISTOGRAM, ()),
        longest[GAUGE],
        buckets.get(STEP_HISTOGRAM, ()),
        longest[STEP_GAUGE],
        timed,
    )


def _highest(
    after: tuple[tuple[float, float], ...], before: tuple[tuple[float, float], ...]
) -> tuple[list[tuple[float, float]], float | None]:
    """The counts each bucket gained from ``before`` to ``after``, and the upper bound
    in ms of the highest bucket that gained one (None if beyond the last finite bound,
    0 if none gained)."""
    previous = dict(before)
    counts = [(bound, count - previous.get(bound, 0.0)) for bound, count in after]
    at_most: float | None = 0.0
    below = 0.0
    for bound, count in counts:
        if count > below:
            at_most = None if math.isinf(bound) else round(bound * 1000, 3)
        below = count
    return counts, at_most


def window(after: Scrape, before: Scrape | None = None) -> dict[str, Any] | None:
    """The heartbeats recorded between two scrapes (or since start): how many, how
    many were late by more than :data:`LONG_S`, and ``at_most_ms``, the upper bound
    of the highest bucket that gained one (``None`` if beyond the last finite bound,
    0 if none was late at all). ``None`` if ``after`` has no histogram.

    With the step histogram, also ``cpu_steps_timed`` (task steps timed),
    ``cpu_steps_over_1ms`` and ``cpu_step_at_most_ms``, the same bound for the
    most CPU one task step used (0: every step timed used less than 1 ms;
    ``None`` when no step was timed, or beyond the last finite bound)."""
    if not after.buckets:
        return None
    counts, at_most = _highest(after.buckets, before.buckets if before else ())
    total = counts[-1][1]
    at_or_below_long = next((count for bound, count in counts if bound >= LONG_S), total)
    result: dict[str, Any] = {
        "heartbeats": int(total),
        "over_10ms": int(total - at_or_below_long),
        "at_most_ms": at_most,
    }
    if after.step_buckets:
        steps, step_at_most = _highest(after.step_buckets, before.step_buckets if before else ())
        result["cpu_steps_timed"] = int(after.steps_timed - (before.steps_timed if before else 0))
        result["cpu_steps_over_1ms"] = int(steps[-1][1])
        result["cpu_step_at_most_ms"] = (
            step_at_most if result["cpu_steps_timed"] or steps[-1][1] else None
        )
    return result


def longest(scrapes: Iterable[Scrape], workers: int) -> dict[str, Any] | None:
    """The longest stall since start over several scrapes of one server: the largest
    gauge seen (``max_ms``), the workers it came from, whether every one of
    ``workers`` was reached, and the histogram of the last scrape (:func:`window`);
    with the step gauge, the same for the longest CPU step (``cpu_step_max_ms``,
    ``cpu_step_by_pid_ms``)."""
    seen: dict[str, float] = {}
    steps: dict[str, float] = {}
    last: Scrape | None = None
    for scrape in scrapes:
        if scrape.buckets or scrape.longest:
            last = scrape
        for pid, seconds in scrape.longest.items():
            seen[pid] = max(seen.get(pid, 0.0), seconds)
        for pid, seconds in scrape.step_longest.items():
            steps[pid] = max(steps.get(pid, 0.0), seconds)
    if last is None:
        return None
    result = {
        "max_ms": round(max(seen.values()) * 1000, 3) if seen else None,
        "by_pid_ms": {pid: round(seconds * 1000, 3) for pid, seconds in sorted(seen.items())},
        "all_workers_seen": len(seen) >= workers,
        **(window(last) or {}),
    }
    if steps:
        result["cpu_step_max_ms"] = round(max(steps.values()) * 1000, 3)
        result["cpu_step_by_pid_ms"] = {
            pid: round(seconds * 1000, 3) for pid, seconds in sorted(steps.items())
        }
    return result


def bound_ms(phase: Mapping[str, Any] | None, server: Mapping[str, Any] | None) -> float | None:
    """The tightest known upper bound of a phase's longest stall, in ms: the phase's
    histogram bound, or the server's largest gauge if that is lower and every worker's
    gauge was read (the gauge covers the whole run, so it bounds each phase)."""
    return _bound(phase, server, "at_most_ms", "max_ms")


def step_bound_ms(
    phase: Mapping[str, Any] | None, server: Mapping[str, Any] | None
) -> float | None:
    """:func:`bound_ms` for the most CPU one task step used in a phase (0: under 1 ms;
    None if the phase timed no step)."""
    if phase is None or not (phase.get("cpu_steps_timed") or phase.get("cpu_steps_over_1ms")):
        return None
    return _bound(phase, server, "cpu_step_at_most_ms", "cpu_step_max_ms")


def _bound(
    phase: Mapping[str, Any] | None, server: Mapping[str, Any] | None, bound: str, gauge: str
) -> float | None:
    candidates = []
    if phase is not None and phase.get(bound) is not None:
        candidates.append(float(phase[bound]))
    if server is not None and server.get("all_workers_seen") and server.get(gauge) is not None:
        candidates.append(float(server[gauge]))
    return min(candidates) if candidates else None
