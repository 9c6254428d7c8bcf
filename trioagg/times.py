"""Time stamps in and out: RFC 3339 with an offset, or Unix seconds."""

from __future__ import annotations

import datetime
import functools

import msgspec

#: 10000-01-01T00:00:00Z, the first instant RFC 3339 cannot write.
LATEST: float = 253402300800.0


@functools.lru_cache(maxsize=65536)  # answers repeat the same bucket starts
def rfc3339(seconds: float) -> str:
    """``2026-11-24T10:00:00Z``; times RFC 3339 cannot write are given as Unix time."""
    if not 0 <= seconds < LATEST:
        return f"Unix time {seconds:g}"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """Unix seconds from RFC 3339 with an offset or from a decimal number of seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = msgspec.convert(text, datetime.datetime)
    except msgspec.ValidationError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValueError("must be RFC 3339 with an offset (2026-11-24T10:00:00Z) or Unix seconds")
    return moment.timestamp()
