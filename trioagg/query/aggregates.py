"""``GET /v1/aggregates``: parsing its parameters and merging stored rows into answers.

No I/O: :func:`parse_query` turns query parameters (read through
:data:`trioagg.query.params.AGGREGATES`) into a :class:`Query`, raising
:class:`~trioagg.core.errors.InvalidQuery` with every problem, and :func:`answer`
merges the rows a store returned for it into the encoded response. Coarser
buckets are merged with :meth:`Rollup.merge`: exact for count, min and max,
numerically stable for sum, avg and stddev, and sketch merges for quantiles
and distinct counts. Both hold to a :class:`~trioagg.query.budget.Budget`.

``bucket`` and ``hour`` are fixed widths aligned to UTC. ``day``, ``week``
(Monday first) and ``month`` follow the calendar of ``tz``, so a local day can
last 23 or 25 hours; each of their boundaries must fall on an edge of the
store's native buckets, or the query is refused with the width that would work.
"""

from __future__ import annotations

import bisect
import datetime
import functools
import math
import zoneinfo
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import msgspec

from ..core.answers import Aggregates, Pieces, PieceWriter, Series
from ..core.errors import InvalidQuery
from ..core.rollup import Rollup
from ..core.settings import BUCKET_WIDTHS
from ..core.stats import is_percentile
from ..core.tiers import WIDTH_NAMES, Tiers, span_name, unaligned, widen
from ..core.times import LATEST, rfc3339
from ..store import Row, TierCut
from .budget import DEFAULT_BUDGET, Budget
from .params import AGGREGATES, Problems, parse_args

FIXED: Final = {"bucket": None, "hour": 3600}
DEFAULT_RANGE: Final = 86400
#: Buckets made into objects and encoded at once: at most ~1 MB of objects (16 stats),
#: whatever the size of the answer.
BLOCK_BUCKETS: Final = 1_000

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
    #: The store's tiers, whose coarse buckets a read checks (see :meth:`holds_whole`).
    tiers: Tiers | None = None

    @property
    def start(self) -> int:
        return self.boundaries[0]

    @property
    def end(self) -> int:
        return self.boundaries[-1]

    @property
    def edges_held(self) -> int:
        """How many bucket edges the query holds in memory (none for fixed steps)."""
        return 0 if isinstance(self.boundaries, range) else len(self.boundaries)

    @property
    def buckets_per_series(self) -> int:
        return len(self.boundaries) - 1

    @property
    def needs_sketches(self) -> bool:
        return any(name == "distinct" or is_percentile(name) for name in self.stats)

    def holds_whole(self, bucket: int, width: int) -> bool:
        """Whether a stored bucket of ``width`` seconds from ``bucket`` lies within one
        answer bucket (a bucket of a coarse tier: see :mod:`trioagg.core.tiers`; a local
        day of a zoned ``1d`` tier lasts what that day lasts)."""
        end = bucket + width if self.tiers is None else self.tiers.end_of(bucket, width)
        last = end - 1
        return last < self.end and self.bucket_of(bucket) == self.bucket_of(last)

    def bucket_of(self, moment: int) -> int:
        """The start of the answer bucket holding ``moment``."""
        edges = self.boundaries
        if isinstance(edges, range):
            return edges.start + (moment - edges.start) // edges.step * edges.step
        return edges[bisect.bisect_right(edges, moment) - 1]


def parse_range(values: Mapping[str, Any], problem: Problems, *, now: float) -> tuple[float, float]:
    """``from`` and ``to`` (already parsed) as Unix seconds; by default the last 24 hours."""
    end_at = now if values["to"] is None else values["to"]
    start_at = max(0.0, end_at - DEFAULT_RANGE) if values["from"] is None else values["from"]
    if start_at >= end_at:
        problem("from", "from must be before to")
    return start_at, end_at


def parse_query(
    args: Any,
    *,
    bucket: int,
    now: float,
    budget: Budget = DEFAULT_BUDGET,
    tiers: Tiers | None = None,
    held: Sequence[tuple[int, int]] = (),
) -> Query:
    """Validate the parameters of ``/v1/aggregates``; every problem is reported at once.
    With ``tiers``, ``held`` says where the coarse ones may hold buckets (see
    :meth:`~trioagg.store.Store.tiers_held`): the answer's buckets must be whole buckets
    of every tier that may hold them (``granularity=all`` widens its range to them)."""
    values, problem = parse_args(AGGREGATES, args)
    start_at, end_at = parse_range(values, problem, now=now)
    keys: tuple[str, ...] = values["key"] or ()
    granularity, zone, fill = values["granularity"], values["tz"], values["fill"]
    boundaries: Sequence[int] = ()
    if not problem.items:
        boundaries = _boundaries(granularity, zone, start_at, end_at, bucket, problem, budget)
    if not problem.items and tiers is not None and held:
        boundaries = _tiered(boundaries, granularity, zone.key, tiers, held, problem)
    if not problem.items and boundaries[-1] >= LATEST:
        problem("to", f"the range widened to whole {granularity} buckets ends after 9999-12-31")
    if not problem.items and fill != "none":
        trouble = budget.fill_problem(fill, len(keys), len(boundaries) - 1)
        if trouble:
            problem("fill", trouble)
    problem.raise_any()
    return Query(
        keys,
        granularity,
        zone.key,
        boundaries,
        values["tag.NAME"],
        values["group_by"],
        values["stats"],
        fill,
        tiers,
    )


def is_timeless(args: Any) -> bool:
    """Whether a query's parameters mean the same whenever it is asked: both ends of its
    range are given (by default ``to`` is now), and nothing else reads the clock."""
    return "from" in args and "to" in args


_Parsed = TypeVar("_Parsed")


class ParsedQueries(Generic[_Parsed]):
    """What parsing a raw query string gave (with whatever else its meaning depends on
    in ``context``, such as the tenant and the budget), so that a repeated hot read is
    not parsed again: a dict look-up instead of ~25 us of parsing and checks.

    Keep only queries that passed every check and are :func:`is_timeless`. Bounded by
    ``entries`` (the oldest put is dropped first), by the length of the strings kept,
    and by the size of what is kept for each (``largest``, e.g. the edges a calendar
    query holds as a list: 5,000 of them are ~190 KB, 2,048 such entries ~400 MB)."""

    def __init__(self, entries: int = 2048, longest: int = 512, largest: int = 100) -> None:
        self.entries = entries
        self.longest = longest
        self.largest = largest
        self._parsed: dict[tuple[bytes, Hashable], _Parsed] = {}

    def __len__(self) -> int:
        return len(self._parsed)

    def get(self, raw: bytes, context: Hashable) -> _Parsed | None:
        return self._parsed.get((raw, context))

    def put(self, raw: bytes, context: Hashable, parsed: _Parsed, size: int = 0) -> None:
        """Keep ``parsed``, which holds ``size`` items (nothing kept past ``largest``)."""
        if len(raw) > self.longest or size > self.largest or self.entries <= 0:
            return
        if len(self._parsed) >= self.entries:
            del self._parsed[next(iter(self._parsed))]
        self._parsed[(raw, context)] = parsed


def _boundaries(
    granularity: str,
    zone: zoneinfo.ZoneInfo,
    start_at: float,
    end_at: float,
    bucket: int,
    problem: Problems,
    budget: Budget,
) -> Sequence[int]:
    """The answer buckets' edges covering ``[start_at, end_at)``, widened to whole buckets."""
    if granularity in FIXED:
        step = FIXED[granularity] or bucket
        start = math.floor(start_at / step) * step
        return range(start, math.ceil(end_at / step) * step + step, step)  # held as 3 ints
    if granularity == "all":
        return [math.floor(start_at / bucket) * bucket, math.ceil(end_at / bucket) * bucket]
    try:
        first, last = _calendar_span(granularity, zone, start_at, end_at)
    except (OverflowError, ValueError):  # a local date before year 1 or after 9999
        problem("to", f"{granularity} boundaries in {zone.key} fall outside years 1-9999")
        return ()
    trouble = budget.calendar_problem(granularity, _calendar_count(granularity, first, last))
    if trouble:
        problem("granularity", trouble)
        return ()
    listed = list(_calendar_edges(granularity, zone, first, last))
    misaligned = [edge for edge in listed if edge % bucket]
    if misaligned:
        width = _widest_dividing(listed)
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
    return listed


def _tiered(
    boundaries: Sequence[int],
    granularity: str,
    zone: str,
    tiers: Tiers,
    held: Sequence[tuple[int, int]],
    problem: Problems,
) -> Sequence[int]:
    """``boundaries`` as the tiers can answer them: ``all`` widened to whole buckets of
    the tiers at its ends, any other granularity refused where an edge would cut a
    coarse tier's bucket in two."""
    if granularity == "all":
        return list(widen(boundaries[0], boundaries[-1], tiers, held))
    found = unaligned(boundaries, tiers, held)
    if found is not None:
        edge, index = found
        since = next(moment for moment, tier in held if tier == index)
        tier = tiers.tiers[index]
        width = WIDTH_NAMES[tier.width]
        after = span_name(tiers.tiers[index - 1].horizon)
        where = "" if granularity in FIXED else f" in {zone}"
        if granularity not in FIXED and tier.zone != zone and tier.width == 86400:
            # Another zone's days would cut the tier's local days: say so, not "finer".
            problem(
                "tz",
                f"{granularity} buckets in {zone} cut the days this store keeps before "
                f"{rfc3339(since)}: its tier '{tier}' holds days of {tier.zone}, of data "
                f"older than {after} (an answer bucket would start at {rfc3339(edge)}); "
                f"ask with tz={tier.zone} (or for granularity=all), or for a range from "
                f"{rfc3339(since)} on",
            )
            return ()
        problem(
            "granularity",
            f"{granularity} buckets{where} are finer than this store keeps before "
            f"{rfc3339(since)}: its tier '{tier}' holds {width} buckets of "
            f"data older than {after} (an answer bucket would start at {rfc3339(edge)}); "
            f"ask for {_coarse_enough(tier.width, tier.zone)} or all, or a range from "
            f"{rfc3339(since)} on",
        )
        return ()
    return boundaries


def _coarse_enough(width: int, zone: str = "UTC") -> str:
    """The finest granularity whose buckets are whole buckets of ``width`` seconds (of
    days in ``zone``)."""
    return "granularity=hour" if 3600 % width == 0 else f"granularity=day (in {zone})"


def _calendar_span(
    granularity: str, zone: zoneinfo.ZoneInfo, start_at: float, end_at: float
) -> tuple[datetime.date, datetime.date]:
    """The local dates of the first and the last edge of the day, week or month buckets
    covering ``[start_at, end_at)``: the bucket holding ``start_at``, and the first edge
    at or after ``end_at``."""
    first = _calendar_floor(granularity, datetime.datetime.fromtimestamp(start_at, zone).date())
    last = _calendar_floor(granularity, datetime.datetime.fromtimestamp(end_at, zone).date())
    # A second step where a clock fell back across midnight (Moncton's 00:01 to 23:01 of
    # the day before): an end_at in the repeated hour comes after the next midnight.
    while _midnight(last, zone) < end_at:
        last = _calendar_next(granularity, last)
    return first, last


def _calendar_count(granularity: str, first: datetime.date, last: datetime.date) -> int:
    """The buckets from edge ``first`` to edge ``last``: arithmetic on dates, no walk."""
    if granularity == "month":
        return (last.year - first.year) * 12 + last.month - first.month
    return (last - first).days // (7 if granularity == "week" else 1)


def _calendar_edges(
    granularity: str, zone: zoneinfo.ZoneInfo, first: datetime.date, last: datetime.date
) -> Iterator[int]:
    """Local midnights of days, Mondays or first days of months, as Unix seconds."""
    local = first
    while True:
        yield _midnight(local, zone)
        if local >= last:
            return
        local = _calendar_next(granularity, local)


def _calendar_floor(granularity: str, local: datetime.date) -> datetime.date:
    """The first day of the day, week (from Monday) or month holding ``local``."""
    if granularity == "week":
        return local - datetime.timedelta(days=local.weekday())
    if granularity == "month":
        return local.replace(day=1)
    return local


def _calendar_next(granularity: str, local: datetime.date) -> datetime.date:
    """The first day of the next bucket after the one starting on ``local``."""
    if granularity == "month":
        return (local + datetime.timedelta(days=32)).replace(day=1)
    return local + datetime.timedelta(days=7 if granularity == "week" else 1)


def _midnight(local: datetime.date, zone: zoneinfo.ZoneInfo) -> int:
    return int(datetime.datetime.combine(local, datetime.time(), zone).timestamp())


def _widest_dividing(edges: Iterable[int]) -> str | None:
    for name, width in sorted(BUCKET_WIDTHS.items(), key=lambda item: -item[1]):
        if all(edge % width == 0 for edge in edges):
            return name
    return None


def _width_name(seconds: int) -> str:
    return next(name for name, width in BUCKET_WIDTHS.items() if width == seconds)


def answer(query: Query, rows: list[Row], budget: Budget = DEFAULT_BUDGET) -> Pieces:
    """Merge stored rows into the encoded response of ``query``, within ``budget``.

    ``rows`` are consumed: merged into one another, and the list emptied once merged (or
    refused), so that they, the bulk of a big query's memory, are gone before the answer
    is encoded, whatever the caller holds. Of the answer, the bucket objects of one block
    at a time exist (see :class:`PieceWriter`)."""
    try:
        series = _merged(query, rows, budget)
    finally:
        rows.clear()
    writer = PieceWriter(budget.answer_bytes, functools.partial(_too_big, budget))
    writer.begin(
        Aggregates(rfc3339(query.start), rfc3339(query.end), query.granularity, query.tz, [])
    )
    for key, groups in series.items():
        for group in sorted(groups, key=_group_order):
            tags = dict(query.tags)
            if query.group_by and group[0] is not None:
                tags[query.group_by] = group[0]
            writer.series(Series(key, tags, []))
            for block in _bucket_blocks(query, groups[group]):
                writer.buckets(block)
    return writer.end()


def _merged(
    query: Query, rows: Sequence[Row], budget: Budget
) -> dict[str, dict[Group, dict[int, Rollup]]]:
    """The rollups of each answer bucket, by key and group, within ``budget``."""
    if len(rows) > budget.rows:
        raise InvalidQuery("the query is invalid", [_problem("from", budget.rows_problem())])
    series: dict[str, dict[Group, dict[int, Rollup]]] = {key: {} for key in query.keys}
    tag_cache: dict[str, dict[str, str]] = {}
    buckets_left = budget.answer_buckets
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
            buckets_left -= 1
            if buckets_left < 0:
                message = budget.buckets_problem()
                raise InvalidQuery("the query is invalid", [_problem("granularity", message)])
            buckets[start] = rollup
        else:
            merged.merge(rollup)
    for groups in series.values():
        if not groups and not query.group_by:
            groups[()] = {}
    if query.fill != "none":
        count = sum(len(groups) for groups in series.values())
        trouble = budget.fill_problem(query.fill, count, query.buckets_per_series)
        if trouble:
            raise InvalidQuery("the query is invalid", [_problem("fill", trouble)])
    return series


def tier_cut_problem(query: Query, cut: TierCut) -> InvalidQuery:
    """The refusal of a read that found a coarse tier's bucket an answer bucket cuts."""
    width = WIDTH_NAMES.get(cut.width, f"{cut.width}s")
    zone = query.tiers.zone if query.tiers is not None else "UTC"
    message = (
        f"the store holds a {width} bucket from {rfc3339(cut.bucket)}, which "
        f"{query.granularity} buckets would cut in two: a process of this store rolled its "
        "tiers further than this one expected (their --tiers horizons or clocks differ); "
        f"ask for whole {width} buckets ({_coarse_enough(cut.width, zone)} or all)"
    )
    return InvalidQuery("the query is invalid", [_problem("granularity", message)])


def _too_big(budget: Budget) -> InvalidQuery:
    return InvalidQuery("the query is invalid", [_problem("stats", budget.bytes_problem())])


def _problem(parameter: str, message: str) -> dict[str, str]:
    return {"parameter": parameter, "message": message}


def work(query: Query, rows: Sequence[Row]) -> int:
    """About how many rows and buckets answering ``query`` with ``rows`` handles."""
    if query.fill == "none":
        return len(rows)
    return len(rows) + query.buckets_per_series * max(len(query.keys), len(rows))


def _bucket_blocks(query: Query, rollups: dict[int, Rollup]) -> Iterator[list[dict[str, Any]]]:
    """The buckets of one series, :data:`BLOCK_BUCKETS` at a time."""
    starts: Sequence[int] = sorted(rollups) if query.fill == "none" else query.boundaries
    count = len(rollups) if query.fill == "none" else query.buckets_per_series
    empty = _empty_bucket(query.stats, query.fill)
    for at in range(0, count, BLOCK_BUCKETS):
        yield [
            _bucket(start, rollups[start], query.stats)
            if start in rollups
            else {"start": rfc3339(start), **empty}
            for start in starts[at : min(at + BLOCK_BUCKETS, count)]
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
