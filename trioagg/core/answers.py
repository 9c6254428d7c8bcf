"""The JSON documents trioagg answers, as msgspec types.

The routes encode these types, and :mod:`trioagg.http.openapi` generates the
response schemas from them, so a documented answer is the answer sent.
A bucket's stats are named by the query (``count``, ``p99``...), so a bucket
is a mapping whose schema is given here by hand.

:class:`PieceWriter` encodes an :class:`Aggregates` answer a block of buckets
at a time into :class:`Pieces`, the same bytes ``msgspec.json.encode`` would
give, so that a big answer never exists as objects and as bytes at once, and
is sent piece by piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

#: An RFC 3339 time stamp in UTC, as answers write them.
DateTime = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]

BUCKET_SCHEMA: Final = {
    "type": "object",
    "required": ["start"],
    "properties": {
        "start": {"type": "string", "format": "date-time"},
        "count": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": {"type": ["number", "null"]},
    "description": "The bucket's start and one member per stat asked for. Stats of a bucket "
    "without events are null with fill=null; distinct is null where no event had a "
    "distinct_id.",
    "examples": [{"start": "2026-11-24T10:00:00Z", "count": 3, "sum": 84.5, "avg": 28.2}],
}

_TOP_ITEM: Final = {
    "type": "object",
    "required": ["key"],
    "properties": {
        "key": {"type": "string"},
        "count": {"type": "integer", "minimum": 0},
        "sum": {"type": "number"},
    },
    "additionalProperties": False,
    "description": "The key and its total: count or sum, as the query's stat says.",
}


class Series(msgspec.Struct, gc=False):
    """One result series: a key, merged over its series or one value of group_by."""

    key: str
    #: The query's tag filters, plus the group_by tag's value when grouped.
    tags: dict[str, str]
    buckets: list[Annotated[dict[str, Any], msgspec.Meta(extra_json_schema=BUCKET_SCHEMA)]]


class Aggregates(msgspec.Struct, gc=False):
    """The answer of ``GET /v1/aggregates``: the range widened to whole buckets."""

    start: DateTime = msgspec.field(name="from")
    end: DateTime = msgspec.field(name="to")
    granularity: str
    tz: str
    results: list[Series]


#: The size of a piece of an encoded answer: what is sent at once, and the most an
#: answer holds besides its pieces (a piece being joined) while it is encoded.
PIECE_BYTES: Final = 256 * 1024


@dataclass(frozen=True, slots=True)
class Pieces:
    """An encoded answer of ``size`` bytes, as ``chunks`` of about :data:`PIECE_BYTES`."""

    chunks: list[bytes]
    size: int

    def joined(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


class PieceWriter:
    """Encodes an :class:`Aggregates` answer as :class:`Pieces`: ``begin(header)`` (its
    ``results`` empty), then for each series ``series(one)`` (its ``buckets`` empty) and
    ``buckets(block)`` as many times as it takes, then ``end()``. Past ``limit`` bytes it
    raises ``too_big()`` at once, having encoded at most a block more."""

    def __init__(self, limit: int, too_big: Callable[[], Exception]) -> None:
        self._limit = limit
        self._too_big = too_big
        self._chunks: list[bytes] = []
        self._parts: list[bytes | memoryview] = []
        self._held = 0
        self._size = 0
        self._in_series = False
        self._bucket_written = False

    def begin(self, header: Aggregates) -> None:
        self._write(_opened(header))

    def series(self, one: Series) -> None:
        if self._in_series:
            self._write(b"]},")
        self._write(_opened(one))
        self._in_series, self._bucket_written = True, False

    def buckets(self, block: list[dict[str, Any]]) -> None:
        if not block:
            return
        if self._bucket_written:
            self._write(b",")
        self._write(memoryview(msgspec.json.encode(block))[1:-1])  # without [ and ]
        self._bucket_written = True

    def end(self) -> Pieces:
        self._write(b"]}]}" if self._in_series else b"]}")
        if self._parts:
            self._chunks.append(b"".join(self._parts))
        return Pieces(self._chunks, self._size)

    def _write(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise self._too_big()
        self._parts.append(data)
        self._held += len(data)
        if self._held >= PIECE_BYTES:
            self._chunks.append(b"".join(self._parts))
            self._parts.clear()
            self._held = 0


def _opened(document: Aggregates | Series) -> bytes:
    """``document`` encoded without the ``]}`` that closes its last member, an empty list."""
    return msgspec.json.encode(document)[:-2]


class KeyInfo(msgspec.Struct, gc=False):
    """A key: its tag names, first and last bucket, and number of series (tag sets)."""

    key: str
    tags: list[str]
    first: DateTime
    last: DateTime
    series: Annotated[int, msgspec.Meta(ge=1)]


class TierInfo(msgspec.Struct, gc=False):
    """A tier of the store (``--tiers``): buckets ``width`` wide, kept until they are
    ``horizon`` old (``forever``), then merged into the next tier's (or deleted). A
    ``1d`` tier's days are those of ``zone``."""

    width: str
    horizon: str
    zone: str | msgspec.UnsetType = msgspec.UNSET


class Keys(msgspec.Struct, gc=False):
    """A page of ``GET /v1/keys``; ``next`` is null on the last page. ``tiers``, only on
    a store with tiers: its tiers, finest first."""

    keys: list[KeyInfo]
    next: str | None
    tiers: list[TierInfo] | msgspec.UnsetType = msgspec.UNSET


class Top(msgspec.Struct, gc=False):
    """The answer of ``GET /v1/top``: keys, highest first."""

    start: DateTime = msgspec.field(name="from")
    end: DateTime = msgspec.field(name="to")
    stat: str
    results: list[Annotated[dict[str, Any], msgspec.Meta(extra_json_schema=_TOP_ITEM)]]


class Accepted(msgspec.Struct, omit_defaults=True):
    """The answer of ``POST /v1/events``."""

    accepted: Annotated[int, msgspec.Meta(ge=0, description="Events of the request.")]
    duplicates: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="Of those, events whose id was already stored within the dedup "
            "window: acknowledged, not counted again (durable answers only).",
        ),
    ] = 0


_PROBLEM: Final = {
    "anyOf": [
        {
            "type": "object",
            "required": ["index", "field", "message"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "field": {"type": ["string", "null"]},
                "message": {"type": "string"},
            },
            "description": "invalid_events: which event (0-based), which field (null when "
            "the event as a whole is wrong), what is wrong.",
        },
        {
            "type": "object",
            "required": ["parameter", "message"],
            "properties": {"parameter": {"type": "string"}, "message": {"type": "string"}},
            "description": "invalid_query: which parameter, what is wrong.",
        },
    ]
}


class ErrorBody(msgspec.Struct):
    code: Annotated[str, msgspec.Meta(examples=["invalid_query"])]
    message: str
    details: list[Annotated[dict[str, Any], msgspec.Meta(extra_json_schema=_PROBLEM)]]


class Error(msgspec.Struct):
    """The one error envelope of every 4xx and 5xx answer."""

    error: ErrorBody


class Health(msgspec.Struct):
    status: str


class ReadyChecks(msgspec.Struct):
    store: str
    writer: str
    queue: str


class Ready(msgspec.Struct):
    """``ready`` or ``not ready``, and each check's state."""

    status: str
    checks: ReadyChecks


_Total = Annotated[int, msgspec.Meta(ge=0)]


class Status(msgspec.Struct):
    """The figures of ``/metrics`` a dashboard shows at a glance, and what the page needs
    to know of the server. Totals count since the process started (across workers with
    PROMETHEUS_MULTIPROC_DIR); the queue is this process's."""

    version: str
    time: Annotated[float, msgspec.Meta(description="The server's clock, in Unix seconds.")]
    bucket_seconds: Annotated[
        int, msgspec.Meta(ge=60, description="The store's bucket width, in seconds.")
    ]
    quantiles: Annotated[
        list[str],
        msgspec.Meta(description="Glob patterns of the keys that keep quantiles (--quantiles)."),
    ]
    events_accepted: _Total
    events_committed: _Total
    events_rejected: _Total
    events_lost: _Total
    queue_depth: Annotated[int, msgspec.Meta(ge=0, description="Requests waiting to commit.")]
    queue_capacity: Annotated[int, msgspec.Meta(ge=0, description="Requests the queue holds.")]
    commits: Annotated[int, msgspec.Meta(ge=0, description="Batches committed.")]
    commit_seconds_sum: Annotated[
        float, msgspec.Meta(ge=0, description="Time spent committing them, in seconds.")
    ]
    loop_stall_max_seconds: Annotated[
        float,
        msgspec.Meta(ge=0, description="The longest one task held the event loop."),
    ]
    statsd_datagrams: Annotated[
        int, msgspec.Meta(ge=0, description="StatsD datagrams received (--statsd).")
    ] = 0
    statsd_lines_parsed: Annotated[
        int, msgspec.Meta(ge=0, description="StatsD lines parsed into events.")
    ] = 0
    statsd_lines_refused: Annotated[
        int,
        msgspec.Meta(
            ge=0, description="StatsD lines refused (by reason in trioagg_statsd_lines_refused)."
        ),
    ] = 0
    statsd_events_dropped: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            description="Events of StatsD lines dropped, the writers' queue being full or the "
            "store unavailable (UDP has no answer to retry on).",
        ),
    ] = 0
    otlp_points_accepted: Annotated[
        int, msgspec.Meta(ge=0, description="OTLP data points stored (POST /v1/metrics).")
    ] = 0
    otlp_points_rejected: Annotated[
        int,
        msgspec.Meta(
            ge=0, description="OTLP data points refused (rejected_data_points of partial success)."
        ),
    ] = 0


#: Every answer type, for the OpenAPI document's components.
ANSWERS: Final = (Aggregates, Keys, Top, Accepted, Error, Health, Ready, Status)
