"""An event as every part of trioagg after the edge sees it, and the limits of one.

The HTTP decoder (:mod:`~trioagg.ingest`), the StatsD and OTLP receivers make
:class:`Point` values; the writers, the journal, the planner and the store take
them. The tenant tag and the tag limits live here too, beside the event they
bound, so that none of those parts imports a body decoder. Imports nothing of
trioagg.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class Point(NamedTuple):
    """One validated event: a tuple with names. Hot loops unpack it as a tuple, and
    make one with ``tuple.__new__(Point, fields)`` rather than ``Point(...)``, whose
    constructor is a Python function: decoding 1,000 events then costs about 1,000 more
    instructions per event than plain tuples did (12,800 against 11,800, callgrind),
    against 1,500 more through a function."""

    key: str
    #: Unix seconds.
    ts: float
    value: float
    #: Canonical tags JSON: compact, names sorted (:data:`NO_TAGS` without tags).
    tags: str
    distinct_id: str | None
    #: The idempotency id, or None.
    id: str | None


NO_TAGS: Final = "{}"
#: The tag a tenant's API key stamps on what it sends and filters what it reads by.
TENANT_TAG: Final = "tenant"

#: The largest magnitude of an event's value. Squares of values (the spread's
#: moments) summed over any realistic count of events stay finite: 1e100 ** 2
#: * 1e18 events ~ 1e218, far below float's 1.8e308.
MAX_ABS_VALUE: Final = 1e100
#: The most tags of an event, and so of a series (a tenant's stamped tag included).
MAX_TAGS: Final = 16
#: The most UTF-8 bytes of a tag's value.
TAG_VALUE_BYTES: Final = 255
#: The most UTF-8 bytes of an event's tags together, as stored (compact JSON, names
#: sorted, a tenant's stamped tag included). Every store can index a series by its key
#: and tags then: PostgreSQL refuses an index entry over 2,704 bytes (its key, bucket
#: and tags; the key is at most 255 bytes), and 16 tags of 255-byte values would make
#: one of over 4 KB, failing at commit what validation had accepted.
TAGS_BYTES: Final = 2048
