"""``GET /v1/aggregates``: parsing its parameters and merging stored rows into answers.

No I/O: :func:`parse_query` turns query parameters into a :class:`Query`
(raising :class:`~trioagg.errors.InvalidQuery` with every problem), and
:func:`answer` merges the rows a store returned for it into the response
document. Coarser buckets are merged with :meth:`Rollup.merge`, which is
exact for count, min and max and numerically stable for sum, avg and stddev.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from .errors import InvalidQuery
from .rollup import STATS, Rollup
from .store import Row
from .times import parse_time, rfc3339

GRANULARITIES: Final = {"bucket": None, "hour": 3600, "day": 86400, "all": None}
DEFAULT_STATS: Final = ("count", "sum", "min", "max", "avg")
DEFAULT_RANGE: Final = 86400
MAX_KEYS: Final = 100
_TAG_PARAM = re.compile(r"^tag\.([A-Za-z_][A-Za-z0-9_.-]{0,63})$")
#: A result series within a key: () when merged, (tag value,) with group_by.
Group = tuple[str | None, ...]
_KNOWN = {"key", "from", "to", "granularity", "group_by", "stats"}


@dataclass(frozen=True, slots=True)
class Query:
    """A validated aggregates query. ``start``/``end`` are aligned to ``step``."""

    keys: tuple[str, ...]
    start: int
    end: int
    granularity: str
    #: Width of an answer bucket in seconds; the whole range for ``all``.
    step: int
    tags: Mapping[str, str]
    group_by: str | None
    stats: tuple[str, ...]


def parse_query(args: Any, *, bucket: int, now: float) -> Query:
    """Validate the parameters of ``/v1/aggregates``; every problem is reported at once."""
    problems: list[dict[str, Any]] = []

    def problem(parameter: str, message: str) -> None:
        problems.append({"parameter": parameter, "message": message})

    keys = tuple(dict.fromkeys(args.getlist("key")))
    if not keys:
        problem("key", "at least one key is required (repeat key= for several)")
    elif len(keys) > MAX_KEYS:
        problem("key", f"at most {MAX_KEYS} keys per query")

    granularity = args.get("granularity", "hour")
    if granularity not in GRANULARITIES:
        problem("granularity", f"must be one of {', '.join(GRANULARITIES)}")
        granularity = "hour"
    width = GRANULARITIES[granularity] or bucket
    if width < bucket:
        problem("granularity", f"{granularity} is finer than this store's {bucket}s buckets")

    end_at = _parse_time(args.get("to"), "to", problem)
    end_at = now if end_at is None else end_at
    start_at = _parse_time(args.get("from"), "from", problem)
    start_at = end_at - DEFAULT_RANGE if start_at is None else start_at
    align = width if granularity != "all" else bucket
    if start_at >= end_at:
        problem("from", "from must be before to")
    start = math.floor(start_at / align) * align
    end = math.ceil(end_at / align) * align

    stats = tuple(dict.fromkeys(args.get("stats", ",".join(DEFAULT_STATS)).split(",")))
    unknown = [name for name in stats if name not in STATS]
    if unknown:
        problem("stats", f"unknown stat(s) {', '.join(unknown)}; choose from {', '.join(STATS)}")

    tags: dict[str, str] = {}
    for name in args:
        match = _TAG_PARAM.match(name)
        if match:
            tags[match[1]] = args.get(name)
        elif name not in _KNOWN:
            problem(name, "unknown parameter")
    group_by = args.get("group_by") or None

    if problems:
        raise InvalidQuery("the query is invalid", problems)
    return Query(
        keys,
        start,
        end,
        granularity,
        width if granularity != "all" else end - start,
        tags,
        group_by,
        stats,
    )


def _parse_time(text: str | None, name: str, problem: Any) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as error:
        problem(name, str(error))
        return None


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
        start = query.start + (bucket - query.start) // query.step * query.step
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
            results.append(
                {
                    "key": key,
                    "tags": tags,
                    "buckets": [
                        _bucket(start, rollup, query.stats)
                        for start, rollup in sorted(groups[group].items())
                    ],
                }
            )
    return {
        "from": rfc3339(query.start),
        "to": rfc3339(query.end),
        "granularity": query.granularity,
        "tz": "UTC",
        "results": results,
    }


def _group_order(group: Group) -> tuple[bool, str]:
    return (bool(group) and group[0] is None, group[0] or "" if group else "")


def _bucket(start: int, rollup: Rollup, stats: Sequence[str]) -> dict[str, Any]:
    document: dict[str, Any] = {"start": rfc3339(start)}
    for name in stats:
        document[name] = rollup.stat(name)
    return document
