"""``GET /v1/keys`` and ``GET /v1/top``: their parameters and answers. No I/O.

Keys come from the store's series index (one row per key and tag set, with
its first and last bucket), which the writer widens only when a batch moves
a series' span; top ranks keys over a range read through the rollups' bucket
index. Neither scans every bucket of the store.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from .query import Problems, parse_range
from .store import KeyInfo
from .times import rfc3339

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
TOP_STATS: Final = ("count", "sum")


@dataclass(frozen=True, slots=True)
class KeysQuery:
    prefix: str
    after: str
    limit: int


@dataclass(frozen=True, slots=True)
class TopQuery:
    start: int
    end: int
    stat: str
    prefix: str
    limit: int


def _limit(args: Any, problem: Problems) -> int:
    text = args.get("limit", str(DEFAULT_LIMIT))
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        problem("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
        return DEFAULT_LIMIT
    return int(text)


def parse_keys_query(args: Any) -> KeysQuery:
    problem = Problems({"prefix", "after", "limit"}, args)
    limit = _limit(args, problem)
    problem.raise_any()
    return KeysQuery(args.get("prefix", ""), args.get("after", ""), limit)


def keys_answer(query: KeysQuery, series: Sequence[KeyInfo]) -> dict[str, Any]:
    """One entry per key: its tag names, first and last bucket, and series count."""
    keys: dict[str, dict[str, Any]] = {}
    for key, tags_json, first, last in series:
        entry = keys.get(key)
        if entry is None:
            entry = keys[key] = {
                "key": key,
                "tags": set(),
                "first": first,
                "last": last,
                "series": 0,
            }
        entry["tags"].update(msgspec.json.decode(tags_json))
        entry["first"] = min(entry["first"], first)
        entry["last"] = max(entry["last"], last)
        entry["series"] += 1
    listed = [
        {
            **entry,
            "tags": sorted(entry["tags"]),
            "first": rfc3339(entry["first"]),
            "last": rfc3339(entry["last"]),
        }
        for entry in keys.values()
    ]
    return {"keys": listed, "next": listed[-1]["key"] if len(listed) == query.limit else None}


def parse_top_query(args: Any, *, bucket: int, now: float) -> TopQuery:
    problem = Problems({"from", "to", "stat", "limit", "prefix"}, args)
    start_at, end_at = parse_range(args, problem, now=now)
    stat = args.get("stat", "count")
    if stat not in TOP_STATS:
        problem("stat", f"must be one of {', '.join(TOP_STATS)}")
    limit = _limit(args, problem)
    problem.raise_any()
    return TopQuery(
        math.floor(start_at / bucket) * bucket,
        math.ceil(end_at / bucket) * bucket,
        stat,
        args.get("prefix", ""),
        limit,
    )


def top_answer(query: TopQuery, ranked: Sequence[tuple[str, float]]) -> dict[str, Any]:
    return {
        "from": rfc3339(query.start),
        "to": rfc3339(query.end),
        "stat": query.stat,
        "results": [{"key": key, query.stat: value} for key, value in ranked],
    }
