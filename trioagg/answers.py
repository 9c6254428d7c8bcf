"""The JSON documents trioagg answers, as msgspec types.

The routes encode these types, and :mod:`trioagg.openapi` generates the
response schemas from them, so a documented answer is the answer sent.
A bucket's stats are named by the query (``count``, ``p99``...), so a bucket
is a mapping whose schema is given here by hand.
"""

from __future__ import annotations

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


class KeyInfo(msgspec.Struct, gc=False):
    """A key: its tag names, first and last bucket, and number of series (tag sets)."""

    key: str
    tags: list[str]
    first: DateTime
    last: DateTime
    series: Annotated[int, msgspec.Meta(ge=1)]


class Keys(msgspec.Struct, gc=False):
    """A page of ``GET /v1/keys``; ``next`` is null on the last page."""

    keys: list[KeyInfo]
    next: str | None


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


#: Every answer type, for the OpenAPI document's components.
ANSWERS: Final = (Aggregates, Keys, Top, Accepted, Error, Health, Ready, Status)
