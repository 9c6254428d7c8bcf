"""The answers of the Python client's queries, typed all the way down.

On the wire (:mod:`trioagg.core.answers`) a bucket is a mapping, its stats named by
the query, and a ``/v1/top`` result a mapping of a key and one total. Here a
bucket is a :class:`Bucket`, each stat an attribute (``msgspec.UNSET`` when the
query did not ask for it, None where the server answered null), percentiles a
mapping by name (``p99.9`` is one of thousands of possible names); a result of
``top()`` is a :class:`Ranked`. :func:`typed` makes an :class:`Aggregates` of
the wire's; :func:`as_sent` gives the wire's back, for callers that show the
server's answer as it was (``trioagg query``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from ..core import answers
from ..core.stats import STATS, is_percentile


class Bucket(msgspec.Struct, gc=False, repr_omit_defaults=True):
    """A bucket's start and the stats the query asked for (the others are UNSET): an
    attribute for each of :data:`~trioagg.core.stats.STATS`, and the percentiles.

    With ``fill=null`` a bucket without events has count 0 and its other stats
    None; ``distinct`` is None where no event had a distinct_id."""

    start: answers.DateTime
    count: int | UnsetType = UNSET
    sum: float | UnsetType | None = UNSET
    min: float | UnsetType | None = UNSET
    max: float | UnsetType | None = UNSET
    avg: float | UnsetType | None = UNSET
    stddev: float | UnsetType | None = UNSET
    distinct: int | UnsetType | None = UNSET
    #: The value of the bucket's latest event (None where unknown: see the docs' Stats).
    last: float | UnsetType | None = UNSET
    #: The percentiles asked for, by their name in the query: ``{"p99": 12.5}``.
    percentiles: dict[str, float | None] = {}

    def stats(self) -> dict[str, float | None]:
        """Every stat the query asked for, by its name in the query (``sum``, ``p99``)."""
        named = {name: getattr(self, name) for name in STATS}
        asked: dict[str, float | None] = {n: v for n, v in named.items() if v is not UNSET}
        return asked | self.percentiles


class Series(msgspec.Struct, gc=False):
    """One result series: a key, merged over its series or one value of group_by."""

    key: str
    #: The query's tag filters, plus the group_by tag's value when grouped.
    tags: dict[str, str]
    buckets: list[Bucket]


class Aggregates(msgspec.Struct, gc=False):
    """The answer of ``aggregates()``: the range widened to whole buckets."""

    start: answers.DateTime = msgspec.field(name="from")
    end: answers.DateTime = msgspec.field(name="to")
    granularity: str
    tz: str
    results: list[Series]


class Ranked(msgspec.Struct, gc=False, repr_omit_defaults=True):
    """A key and its total over the range: ``count`` or ``sum``, as ``Top.stat`` says
    (the other is UNSET)."""

    key: str
    count: int | UnsetType = UNSET
    sum: float | UnsetType = UNSET


class Top(msgspec.Struct, gc=False):
    """The answer of ``top()``: keys, highest first."""

    start: answers.DateTime = msgspec.field(name="from")
    end: answers.DateTime = msgspec.field(name="to")
    stat: str
    results: list[Ranked]


def typed(sent: answers.Aggregates) -> Aggregates:
    """The answer the server sent, its buckets checked and made :class:`Bucket`\\ s."""
    results = [
        Series(series.key, series.tags, [_bucket(stats) for stats in series.buckets])
        for series in sent.results
    ]
    return Aggregates(sent.start, sent.end, sent.granularity, sent.tz, results)


def _bucket(stats: dict[str, Any]) -> Bucket:
    percentiles = {name: value for name, value in stats.items() if is_percentile(name)}
    if percentiles:
        stats = {name: value for name, value in stats.items() if name not in percentiles}
        stats["percentiles"] = percentiles
    return msgspec.convert(stats, Bucket)


def as_sent(answer: Aggregates) -> answers.Aggregates:
    """``answer`` as the server sent it: each bucket a mapping of its stats by name."""
    results = [
        answers.Series(
            series.key, series.tags, [{"start": b.start, **b.stats()} for b in series.buckets]
        )
        for series in answer.results
    ]
    return answers.Aggregates(answer.start, answer.end, answer.granularity, answer.tz, results)
