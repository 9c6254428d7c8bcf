"""The tests' wall clock: the one place a test reads the time of day.

The servers under test take ``time.time()`` as now: they refuse events more than
``max_future`` (1 h) ahead of it, and a query without ``to`` ends at it. A test that
sends events at given times takes them from here, as whole UTC periods that have
all ended before now, so they hold at any hour. ``DAY = (now // 86400 - 2) * 86400``
followed by 50 hours of events, say, reaches past now between 00:00 and 02:00 UTC
and is refused then; ``whole_days_ago(2)`` says how far it may go: two days.

tests/conftest.py marks ``wall_clock`` the tests of every module that imports this one,
and tests/test_any_hour.py runs them again under libfaketime at 00:05 and 23:50 UTC;
its ``test_only_the_clock_reads_the_wall_clock`` keeps the wall clock read here only.
"""

from __future__ import annotations

import time

HOUR = 3600
DAY = 24 * HOUR


def now() -> float:
    """The wall clock, as the servers under test read it."""
    return time.time()


def now_ns() -> int:
    """:func:`now` in whole nanoseconds, as OpenTelemetry stamps its points."""
    return time.time_ns()


def whole_periods_ago(width: int, count: int) -> int:
    """The start of ``count`` whole periods of ``width`` seconds (aligned on the Unix
    epoch, as buckets are) that have all ended by now: times from it up to
    ``count * width`` seconds later are in the past at any hour of the day."""
    return (int(now()) // width - count) * width


def whole_days_ago(days: int) -> int:
    """The UTC midnight that starts ``days`` whole UTC days all ended by now."""
    return whole_periods_ago(DAY, days)


def whole_hours_ago(hours: int) -> int:
    """The start of ``hours`` whole UTC hours all ended by now."""
    return whole_periods_ago(HOUR, hours)
