"""Time stamps in and out: RFC 3339 with an offset, or Unix seconds.

Times a client sends in a query must lie in ``[0, LATEST)``: from
1970-01-01T00:00:00Z to the last second of 9999-12-31, the span RFC 3339 and
Python's calendar can both write. A number that is too large to be seconds
but a plausible date in milliseconds is refused with advice, because that is
what dashboards such as Grafana send by default.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
from typing import Final

import msgspec

#: 10000-01-01T00:00:00Z, the first instant RFC 3339 cannot write.
LATEST: float = 253402300800.0
#: 0001-01-01T00:00:00Z, the first instant RFC 3339 can write (answers' first bucket
#: may start before 1970: a week or a month holding 1970-01-01).
EARLIEST: Final = -62135596800.0
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
#: Unix seconds from here on are refused as probable epoch milliseconds (year 5138 in seconds).
MILLISECONDS_FROM: Final = 1e11
#: Longest time stamp accepted in a query, in characters.
MAX_TIME_LENGTH: Final = 64
#: What a number of Unix seconds looks like: ASCII digits, an optional fraction and exponent.
SECONDS_PATTERN: Final = r"[0-9]{1,20}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?"
_SECONDS = re.compile(f"^-?{SECONDS_PATTERN}$")
RANGE_TEXT: Final = "1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


@functools.lru_cache(maxsize=65536)  # answers repeat the same bucket starts
def rfc3339(seconds: float) -> str:
    """``2026-11-24T10:00:00Z``; times RFC 3339 cannot write are given as Unix time."""
    if not EARLIEST <= seconds < LATEST:
        return f"Unix time {seconds:g}"
    moment = _EPOCH + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def milliseconds_mistake(seconds: float, shown: str) -> str | None:
    """What to tell a client whose number of Unix seconds is probably epoch milliseconds
    (``shown`` as it sent it); None when it cannot be."""
    if not MILLISECONDS_FROM <= seconds < LATEST * 1000:
        return None
    return (
        f"{shown} looks like epoch milliseconds ({rfc3339(seconds / 1000)}); "
        "send Unix seconds or RFC 3339"
    )


def parse_time(text: str) -> float:
    """Unix seconds from RFC 3339 with an offset or from a decimal number of seconds,
    inside ``[0, LATEST)``; :class:`ValueError` says what is wrong and how to fix it."""
    if len(text) > MAX_TIME_LENGTH:
        raise ValueError(f"at most {MAX_TIME_LENGTH} characters")
    if _SECONDS.match(text):
        seconds = float(text)
        mistaken = milliseconds_mistake(seconds, text)
        if mistaken is not None:
            raise ValueError(
                mistaken + " (in Grafana: ${__from:date:seconds} and ${__to:date:seconds})"
            )
    else:
        try:
            moment = msgspec.convert(text, datetime.datetime)
        except msgspec.ValidationError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise ValueError(
                "must be RFC 3339 with an offset (2026-11-24T10:00:00Z) or Unix seconds"
            )
        seconds = moment.timestamp()
    if not (math.isfinite(seconds) and 0 <= seconds < LATEST):
        raise ValueError(f"out of range: times from {RANGE_TEXT} are accepted")
    return seconds
