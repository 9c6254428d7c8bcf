"""``GET /v1/aggregates``: parsing its parameters and merging stored rows into answers.

No I/O: :func:`parse_query` turns query parameters into a :class:`Query`
(raising :class:`~trioagg.errors.InvalidQuery` with every problem), and
:func:`answer` merges the rows a store returned for it into the response
document. Coarser buckets are merged with :meth:`Rollup.merge`: exact for
count, min and max, numerically stable for sum, avg and stddev, and sketch
merges for quantiles and distinct counts.

``bucket`` and ``hour`` are fixed widths aligned to UTC. ``day``, ``week``
(Monday first) and ``month`` follow the calendar of ``tz``, so a local day can
last 23 or 25 hours; each of their boundaries must fall on an edge of the
store's native buckets, or the query is refused with the width that would work.
"""

from __future__ import annotations

import bisect
import datetime
import math
import re
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from .errors import InvalidQuery
from .rollup import STATS, Rollup, is_percentile
from .settings import BUCKET_WIDTHS
from .store import Row
from .times import parse_time, rfc3339

FIXED: Final = {"bucket": None, "hour": 3600}
CALENDAR: Final = ("day", "week", "month")
GRANULARITIES: Final = ("bucket", "hour", "day", "week", "month", "all")
FILLS: Final = ("none", "zero", "null")
DEFAULT_STATS: Final = ("count", "sum", "min", "max", "avg")
DEFAULT_RANGE: Final = 86400
MAX_KEYS: Final = 100
#: Most answer buckets one query may ask to be filled in.
MAX_FILLED_BUCKETS: Final = 100_000
_TAG_PARAM = re.compile(r"^tag\.([A-Za-z_][A-Za-z0-9_.-]{0,63})$")
_KNOWN = {"key", "from", "to", "granularity", "group_by", "stats", "tz", "fill"}
_UTC = zoneinfo.ZoneInfo("UTC")

#: A result series within a key: () when merged, (tag value,) with group_by.
Group = tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """A validated aggregates query; ``boundaries`` are the answer buckets' edges."""

    keys: tuple[str, ...]
    granularity: str
    tz: str
    #: Sorted edges: answer bucket i is [boundaries[i], boundaries[i + 1]).
    boundaries: Sequence[int]
    tags: Mapping[str, str]
    group_by: str | None
    stats: tuple[str, ...]
    fill: str

    @property
    def start(self) -> int:
        return self.boundaries[0]

    @property
    def end(self) -> int:
        return self.boundaries[-1]

    @property
    def needs_sketches(self) -> bool:
        return any(name == "distinct" or is_percentile(name) for name in self.stats)

    def bucket_of(self, moment: int) -> int:
        """The start of the answer bucket holding ``moment``."""
        edges = self.boundaries
        if isinstance(edges, FixedEdges):
            return edges.start + (moment - edges.start) // edges.step * edges.step
        return edges[bisect.bisect_right(edges, moment) - 1]


class FixedEdges(Sequence[int]):
    """Edges ``start, start + step, ..., end`` without materializing them."""

    def __init__(self, start: int, end: int, step: int) -> None:
        self.start, self.end, self.step = start, end, step

    def __len__(self) -> int:
        return (self.end - self.start) // self.step + 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.start + index * self.step


class Problems:
    """Every problem of a query's parameters, unknown parameters included."""

    def __init__(self, known: Iterable[str], args: Any, *, tag_filters: bool = False) -> None:
        known = set(known)
        self.items: list[dict[str, Any]] = [
            {"parameter": name, "message": "unknown parameter"}
            for name in args
            if name not in known and not (tag_filters and _TAG_PARAM.match(name))
        ]

    def __call__(self, parameter: str, message: str) -> None:
        self.items.append({"parameter": parameter, "message": message})

    def raise_any(self) -> None:
        if self.items:
            raise InvalidQuery("the query is invalid", self.items)


def parse_range(args: Any, problem: Problems, *, now: float) -> tuple[float, float]:
    """``from`` and ``to`` as Unix seconds; by default the last 24 hours."""
    end_at = _parse_time(args.get("to"), "to", problem)
    end_at = now if end_at is None else end_at
    start_at = _parse_time(args.get("from"), "from", problem)
    start_at = end_at - DEFAULT_RANGE if start_at is None else start_at
    if start_at >= end_at:
        problem("from", "from must be before to")
    return start_at, end_at


def parse_query(args: Any, *, bucket: int, now: float) -> Query:
    """Validate the parameters of ``/v1/aggregates``; every problem is reported at once."""
    problem = Problems(_KNOWN, args, tag_filters=True)
    keys = tuple(dict.fromkeys(args.getlist("key")))
    if not keys:
        problem("key", "at least one key is required (repeat key= for several)")
    elif len(keys) > MAX_KEYS:
        problem("key", f"at most {MAX_KEYS} keys per query")

    granularity = args.get("granularity", "hour")
    if granularity not in GRANULARITIES:
        problem("granularity", f"must be one of {', '.join(GRANULARITIES)}")
        granularity = "hour"

    tz_name = args.get("tz", "UTC")
    try:
        zone = zoneinfo.ZoneInfo(tz_name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problem("tz", f"{tz_name!r} is not an IANA time zone (e.g. Europe/Berlin)")
        zone = _UTC

    fill = args.get("fill", "none")
    if fill not in FILLS:
        problem("fill", f"must be one of {', '.join(FILLS)}")

    start_at, end_at = parse_range(args, problem, now=now)

    stats = tuple(dict.fromkeys(args.get("stats", ",".join(DEFAULT_STATS)).split(",")))
    unknown = [name for name in stats if name not in STATS and not is_percentile(name)]
    if unknown:
        problem(
            "stats",
            f"unknown stat(s) {', '.join(unknown)}; choose from {', '.join(STATS)} "
            "or a percentile such as p50, p99, p99.9",
        )

    tags = {match[1]: args.get(name) for name in args if (match := _TAG_PARAM.match(name))}
    group_by = args.get("group_by") or None

    boundaries: Sequence[int] = ()
    if not problem.items:
        boundaries = _boundaries(granularity, zone, start_at, end_at, bucket, problem)
        if fill != "none" and len(boundaries) - 1 > MAX_FILLED_BUCKETS:
            problem("fill", f"fill would emit more than {MAX_FILLED_BUCKETS} buckets per series")
    problem.raise_any()
    return Query(keys, granularity, tz_name, boundaries, tags, group_by, stats, fill)


def _parse_time(text: str | None, name: str, problem: Problems) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as error:
        problem(name, str(error))
        return None


def _boundaries(
    granularity: str,
    zone: zoneinfo.ZoneInfo,
    start_at: float,
    end_at: float,
    bucket: int,
    problem: Callable[[str, str], None],
) -> Sequence[int]:
    """The answer buckets' edges covering ``[start_at, end_at)``, widened to whole buckets."""
    if granularity in FIXED:
        step = FIXED[granularity] or bucket
        start = math.floor(start_at / step) * step
        return FixedEdges(start, math.ceil(end_at / step) * step, step)
    if granularity == "all":
        return [math.floor(start_at / bucket) * bucket, math.ceil(end_at / bucket) * bucket]
    edges = list(_calendar_edges(granularity, zone, start_at, end_at))
    misaligned = [edge for edge in edges if edge % bucket]
    if misaligned:
        width = _widest_dividing(edges)
        advice = (
            f"a store created with --bucket {width} answers it exactly"
            if width
            else "no bucket width answers it exactly"
        )
        problem(
            "tz",
            f"{granularity} boundaries in {zone.key} fall at {rfc3339(misaligned[0])}, "
            f"which is not on an edge of this store's {_width_name(bucket)} buckets; {advice}",
        )
    return edges


def _calendar_edges(
    granularity: str, zone: zoneinfo.ZoneInfo, start_at: float, end_at: float
) -> Iterator[int]:
    """Local midnights of days, Mondays or first days of months, as Unix seconds."""
    local = datetime.datetime.fromtimestamp(start_at, zone).date()
    if granularity == "week":
        local -= datetime.timedelta(days=local.weekday())
    elif granularity == "month":
        local = local.replace(day=1)
    while True:
        edge = int(datetime.datetime.combine(local, datetime.time(), zone).timestamp())
        yield edge
        if edge >= end_at:
            return
        if granularity == "month":
            local = (local + datetime.timedelta(days=32)).replace(day=1)
        else:
            local += datetime.timedelta(days=7 if granularity == "week" else 1)


def _widest_dividing(edges: Iterable[int]) -> str | None:
    for name, width in sorted(BUCKET_WIDTHS.items(), key=lambda item: -item[1]):
        if all(edge % width == 0 for edge in edges):
            return name
    return None


def _width_name(seconds: int) -> str:
    return next(name for name, width in BUCKET_WIDTHS.items() if width == seconds)


def answer(query: Query, rows: Iterable[Row]) -> dict[str, Any]:
    """Merge stored rows into the response document of ``query``."""
    series: dict[str, dict[Group, dict[int, Rollup]]] = {key: {} for key in query.keys}
    tag_cache: dict[str, dict[str, str]] = {}
    for key, bucket, tags_json, rollup in rows:
        tags = tag_cache.get(tags_json)
        if tags is None:
            tags = tag_cache[tags_json] = msgspec.json.decode(tags_json)
        if any(tags.get(name) != value for name, value in query.tags.items()):
            continue
        group: Group = (tags.get(query.group_by),) if query.group_by else ()
        start = query.bucket_of(bucket)
        buckets = series[key].setdefault(group, {})
        merged = buckets.get(start)
        if merged is None:
            buckets[start] = rollup
        else:
            merged.merge(rollup)

    results = []
    for key, groups in series.items():
        if not groups and not query.group_by:
            groups = {(): {}}
        for group in sorted(groups, key=_group_order):
            tags = dict(query.tags)
            if query.group_by and group[0] is not None:
                tags[query.group_by] = group[0]
            results.append({"key": key, "tags": tags, "buckets": _buckets(query, groups[group])})
    return {
        "from": rfc3339(query.start),
        "to": rfc3339(query.end),
        "granularity": query.granularity,
        "tz": query.tz,
        "results": results,
    }


def _buckets(query: Query, rollups: dict[int, Rollup]) -> list[dict[str, Any]]:
    if query.fill == "none":
        return [_bucket(start, rollups[start], query.stats) for start in sorted(rollups)]
    empty = _empty_bucket(query.stats, query.fill)
    return [
        _bucket(start, rollups[start], query.stats)
        if start in rollups
        else {"start": rfc3339(start), **empty}
        for start in query.boundaries[:-1]
    ]


def _empty_bucket(stats: Sequence[str], fill: str) -> dict[str, Any]:
    """What fill=zero (every stat 0) or fill=null (count 0, the rest null) emits."""
    return {name: 0 if fill == "zero" or name == "count" else None for name in stats}


def _group_order(group: Group) -> tuple[bool, str]:
    return (bool(group) and group[0] is None, group[0] or "" if group else "")


def _bucket(start: int, rollup: Rollup, stats: Sequence[str]) -> dict[str, Any]:
    document: dict[str, Any] = {"start": rfc3339(start)}
    for name in stats:
        document[name] = rollup.stat(name)
    return document
