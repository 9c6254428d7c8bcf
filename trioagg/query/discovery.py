"""``GET /v1/keys`` and ``GET /v1/top``: their parameters and answers. No I/O.

Keys come from the store's series index (one row per key and tag set, with
its first and last bucket), which the writer widens only when a batch moves
a series' span; top ranks keys over a range read through the rollups' bucket
index. Neither scans every bucket of the store. Parameters are read through
the tables of :mod:`trioagg.query.params`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ..core.answers import KeyInfo, Keys, TierInfo, Top
from ..core.tiers import WIDTH_NAMES, Tiers, span_name, widen
from ..core.times import LATEST, rfc3339
from ..store import KeyInfo as StoredKey
from .aggregates import parse_range
from .params import KEYS, TOP, parse_args


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


def parse_keys_query(args: Any) -> KeysQuery:
    values, problem = parse_args(KEYS, args)
    problem.raise_any()
    return KeysQuery(values["prefix"], values["after"], values["limit"])


def keys_answer(query: KeysQuery, series: Sequence[StoredKey], tiers: Tiers | None = None) -> bytes:
    """One entry per key: its tag names, first and last bucket, and series count; and
    the store's ``tiers``, if it has any."""
    keys: dict[str, dict[str, Any]] = {}
    for key, tags_json, first, last in series:
        entry = keys.get(key)
        if entry is None:
            entry = keys[key] = {"tags": set(), "first": first, "last": last, "series": 0}
        entry["tags"].update(msgspec.json.decode(tags_json))
        entry["first"] = min(entry["first"], first)
        entry["last"] = max(entry["last"], last)
        entry["series"] += 1
    listed = [
        KeyInfo(
            key,
            sorted(entry["tags"]),
            rfc3339(entry["first"]),
            rfc3339(entry["last"]),
            entry["series"],
        )
        for key, entry in keys.items()
    ]
    page = Keys(listed, listed[-1].key if len(listed) == query.limit else None)
    if tiers is not None:
        page.tiers = [
            TierInfo(
                WIDTH_NAMES[tier.width],
                span_name(tier.horizon),
                tier.zone if tier.width == 86400 else msgspec.UNSET,
            )
            for tier in tiers.tiers
        ]
    return msgspec.json.encode(page)


def parse_top_query(
    args: Any,
    *,
    bucket: int,
    now: float,
    tiers: Tiers | None = None,
    held: Sequence[tuple[int, int]] = (),
) -> TopQuery:
    """The range is widened to whole buckets, of the coarse tiers where they may hold it
    (``held``: see :meth:`~trioagg.store.Store.tiers_held`)."""
    values, problem = parse_args(TOP, args)
    start_at, end_at = parse_range(values, problem, now=now)
    start = math.floor(start_at / bucket) * bucket
    end = math.ceil(end_at / bucket) * bucket
    if tiers is not None:
        start, end = widen(start, end, tiers, held)
    if not problem.items and end >= LATEST:
        problem("to", "the range widened to whole buckets ends after 9999-12-31")
    problem.raise_any()
    return TopQuery(
        start,
        end,
        values["stat"],
        values["prefix"],
        values["limit"],
    )


def top_answer(query: TopQuery, ranked: Sequence[tuple[str, float]]) -> bytes:
    results = [{"key": key, query.stat: value} for key, value in ranked]
    return msgspec.json.encode(Top(rfc3339(query.start), rfc3339(query.end), query.stat, results))
