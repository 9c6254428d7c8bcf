"""Retention and downsampling tiers: what ``--tiers`` declares, and which tier holds a
bucket. No I/O.

``--tiers "1m for 7d, 1h for 400d, 1d forever"`` keeps 1-minute buckets for 7 days,
then 1-hour buckets up to 400 days old, then 1-day buckets for ever. Tier 0 (the
finest, whose width is the store's ``--bucket``) is the ``rollups`` table; tier ``i``
is ``rollups_<width in seconds>``. A roll (see :mod:`trioagg.store.base`) moves the
rows of tier ``i`` whose buckets passed its horizon into tier ``i + 1``, merged into
that tier's wider buckets, and deletes them from tier ``i`` in the same transaction.

Each store file records, per tier ``i`` but the last, where tier ``i`` ends: its
*rolled* mark. Every bucket of tier ``i`` starts at or after ``rolled[i]``; a bucket
before it lives in a coarser tier (:func:`route`), so a late event is written where
the roll would have put it, and a bucket is in exactly one tier at any time. A mark
is a multiple of the next tier's width and only moves forward.

The last tier's horizon, unless ``forever``, is the store's retention: its rows older
than that are deleted, and events older than that are refused at the door.

A ``1d`` tier keeps the calendar days of a time zone (``1d in Europe/Paris forever``;
UTC by default): its buckets start at local midnights and last 23, 24 or 25 hours, so
bucket arithmetic goes through :meth:`Tiers.floor` and :meth:`Tiers.after`, never
``bucket // width * width``. A zone is allowed only where its local midnights are
edges of every finer tier's buckets, so that a local day is a union of them.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

#: Tier widths a store may keep: whole minutes that divide a UTC day, and the day.
WIDTHS: Final = {
    "1m": 60,
    "2m": 120,
    "5m": 300,
    "10m": 600,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "2h": 7200,
    "3h": 10800,
    "6h": 21600,
    "12h": 43200,
    "1d": 86400,
}
WIDTH_NAMES: Final = {seconds: name for name, seconds in WIDTHS.items()}

#: Queries take a coarse tier to hold buckets from this many seconds later than where
#: it holds them now: a roll starting while a query runs, or in a process whose clock
#: is ahead, cannot reach past that, so no query reads a wide bucket as a narrow one.
QUERY_MARGIN: Final = 300

_UNITS: Final = {"m": 60, "h": 3600, "d": 86400}
_TIER = re.compile(
    r"\s*(?P<width>\S+)(?:\s+in\s+(?P<zone>\S+))?\s+(?:for\s+(?P<horizon>\S+)|(?P<forever>forever))\s*",
    re.IGNORECASE,
)
#: The years whose UTC offsets a tier's zone is checked over (see :func:`_offsets`).
_ZONE_YEARS: Final = (1970, 2100)
_HORIZON = re.compile(r"([1-9][0-9]{0,6})(m|h|d)")


@dataclass(frozen=True, slots=True)
class Tier:
    """Buckets of ``width`` seconds, kept until they are ``horizon`` seconds old (None:
    for ever)."""

    width: int
    horizon: int | None
    #: The time zone of a ``1d`` tier's days (an IANA name); UTC for every other tier.
    zone: str = "UTC"

    def __str__(self) -> str:
        width = WIDTH_NAMES[self.width]
        if self.zone != "UTC":
            width = f"{width} in {self.zone}"
        return f"{width} forever" if self.horizon is None else f"{width} for {_span(self.horizon)}"

    @property
    def local(self) -> zoneinfo.ZoneInfo | None:
        """The zone of its days, for a day tier in another zone than UTC (else None:
        its buckets are multiples of its width)."""
        return None if self.zone == "UTC" else _zone(self.zone)


@dataclass(frozen=True, slots=True)
class Tiers:
    """A store's tiers, finest first; at least two (one tier is no tiers at all)."""

    tiers: tuple[Tier, ...]

    def __str__(self) -> str:
        return ", ".join(str(tier) for tier in self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(tier.width for tier in self.tiers)

    @property
    def retention(self) -> int | None:
        """The age past which nothing is kept (None: for ever)."""
        return self.tiers[-1].horizon

    def table(self, index: int) -> str:
        """The table of tier ``index``."""
        return "rollups" if index == 0 else f"rollups_{self.tiers[index].width}"

    @property
    def zone(self) -> str:
        """The zone of the last tier's buckets (UTC unless a ``1d`` tier names one)."""
        return self.tiers[-1].zone

    def floor(self, index: int, moment: float) -> int:
        """The start of the bucket of tier ``index`` that holds ``moment``."""
        tier = self.tiers[index]
        local = tier.local
        if local is None:
            return math.floor(moment / tier.width) * tier.width
        day = datetime.datetime.fromtimestamp(moment, local).date()
        start = midnight(day, local)
        while start > moment:
            day -= datetime.timedelta(days=1)
            start = midnight(day, local)
        # A clock that fell back across midnight (Moncton's 00:01 to 23:01 of the day
        # before) shows the day before in the hour after the next midnight.
        following = midnight(day + datetime.timedelta(days=1), local)
        while following <= moment:
            day += datetime.timedelta(days=1)
            start, following = following, midnight(day + datetime.timedelta(days=1), local)
        return start

    def after(self, index: int, start: int) -> int:
        """The start of the bucket of tier ``index`` after the one starting at ``start``."""
        tier = self.tiers[index]
        local = tier.local
        if local is None:
            return start + tier.width
        day = datetime.datetime.fromtimestamp(start, local).date()
        end = start
        while end <= start:
            day += datetime.timedelta(days=1)
            end = midnight(day, local)
        return end

    def end_of(self, bucket: int, width: int) -> int:
        """Where a stored bucket of ``width`` seconds from ``bucket`` ends: a bucket of
        a day tier in a zone may last 23 or 25 hours."""
        if width == self.tiers[-1].width:
            return self.after(len(self.tiers) - 1, bucket)
        return bucket + width

    def cut(self, index: int, now: float) -> int:
        """Where tier ``index`` (not the last) ends at ``now``: its buckets that start
        before this moment are past its horizon, to be rolled into the next tier. A
        bucket edge of the next tier, so that a wider bucket is rolled whole."""
        horizon = self.tiers[index].horizon
        assert horizon is not None, "only the last tier keeps its buckets for ever"
        return self.floor(index + 1, now - horizon)

    def drop_cut(self, now: float) -> int | None:
        """Where the last tier's buckets start to be kept at ``now`` (None: for ever)."""
        last = self.tiers[-1]
        if last.horizon is None:
            return None
        return self.floor(len(self.tiers) - 1, now - last.horizon)


def route(bucket: int, rolled: Sequence[int], first: int = 0) -> int:
    """The tier holding a bucket that starts at ``bucket`` (a bucket of tier ``first``
    or finer): the first tier from ``first`` on whose rolled mark it is not before."""
    index = first
    while index < len(rolled) and bucket < rolled[index]:
        index += 1
    return index


def holding(tiers: Tiers, rolled: Sequence[int], now: float) -> list[tuple[int, int]]:
    """For queries, (``since``, tier index) of every tier but the finest: buckets before
    ``since`` may be held by that tier or a coarser one. ``since`` is the later of the
    tier's cut at ``now`` and the rolled mark this process knows (an operator may have
    lengthened a horizon since the roll went further)."""
    return [
        (max(tiers.cut(index - 1, now), rolled[index - 1] if rolled else 0), index)
        for index in range(1, len(tiers))
    ]


def unaligned(
    edges: Iterable[int], tiers: Tiers, held: Sequence[tuple[int, int]]
) -> tuple[int, int] | None:
    """The first answer edge that would cut a bucket of a coarse tier in two, with that
    tier's index: an edge before where a tier may hold buckets must be on one of its
    bucket edges. None when every edge is."""
    for edge in edges:
        for since, index in reversed(held):  # the coarsest tier first
            if edge < since and tiers.floor(index, edge) != edge:
                return edge, index
    return None


def widen(start: int, end: int, tiers: Tiers, held: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``[start, end)`` widened so that no bucket of a coarse tier that may hold it is
    cut by either end (what ``granularity=all`` answers)."""
    for since, index in reversed(held):  # the coarsest first: its buckets are unions
        if start < since:
            start = tiers.floor(index, start)
            break
    for since, index in reversed(held):
        if end < since:
            floor = tiers.floor(index, end)
            end = end if floor == end else tiers.after(index, floor)
            break
    return start, end


def parse_tiers(text: str) -> Tiers | None:
    """Parse ``--tiers``: a comma list of ``WIDTH for HORIZON``, the last one maybe
    ``WIDTH forever``; ``none`` or empty for no tiers. Widths are among :data:`WIDTHS`,
    each a multiple of the one before; horizons are whole minutes, hours or days
    (``90m``, ``36h``, ``7d``), each longer than the one before and than the next
    tier's width. A ``1d`` tier may name the zone of its days (``1d in Europe/Paris
    forever``), one whose local midnights are edges of every finer tier's buckets."""
    if text.strip().lower() in ("", "none"):
        return None
    tiers: list[Tier] = []
    parts = text.split(",")
    for number, part in enumerate(parts):
        match = _TIER.fullmatch(part)
        if match is None:
            raise ValueError(
                f"{part.strip()!r} is not a tier: write WIDTH for HORIZON (1m for 7d), or "
                "WIDTH forever for the last one; a 1d tier may name its zone: 1d in "
                "Europe/Paris forever"
            )
        width_text, horizon_text = match["width"], match["horizon"]
        width = WIDTHS.get(width_text.lower())
        if width is None:
            raise ValueError(
                f"{width_text!r} is not a tier width (choose one of {', '.join(WIDTHS)})"
            )
        horizon = None if horizon_text is None else _parse_horizon(horizon_text)
        zone = "UTC" if match["zone"] is None else _tier_zone(match["zone"], width, tiers)
        if horizon is None and number != len(parts) - 1:
            raise ValueError(
                f"only the last tier may be kept forever, not {part.strip()!r}: a tier is "
                "rolled into the next once its buckets pass its horizon"
            )
        if tiers:
            before = tiers[-1]
            if width <= before.width or width % before.width:
                raise ValueError(
                    f"the width of {part.strip()!r} must be a multiple of the width before "
                    f"it ({WIDTH_NAMES[before.width]}), and wider"
                )
            assert before.horizon is not None
            if horizon is not None and horizon <= before.horizon:
                raise ValueError(
                    f"the horizon of {part.strip()!r} must be longer than the one before "
                    f"it ({_span(before.horizon)}): each tier keeps older buckets"
                )
            if before.horizon < width:
                raise ValueError(
                    f"the tier before {part.strip()!r} keeps {_span(before.horizon)}, less "
                    f"than one of its {WIDTH_NAMES[width]} buckets: keep it at least that long"
                )
        tiers.append(Tier(width, horizon, zone))
    if len(tiers) < 2:
        raise ValueError(
            f"{text.strip()!r} declares one tier: give at least two (e.g. 1m for 7d, 1h "
            "forever); a store without tiers keeps its --bucket for ever"
        )
    return Tiers(tuple(tiers))


def check_bucket(tiers: Tiers | None, bucket: int) -> str | None:
    """Why ``tiers`` cannot be the tiers of a store of ``bucket``-second buckets (None:
    they can): the finest tier receives the writes, at the store's bucket width."""
    if tiers is None or tiers.tiers[0].width == bucket:
        return None
    finest = WIDTH_NAMES[tiers.tiers[0].width]
    return (
        f"the finest tier of --tiers ({tiers.tiers[0]}) must have the store's bucket width, "
        f"but --bucket is {WIDTH_NAMES.get(bucket, f'{bucket}s')}: give --bucket {finest}"
    )


def changed(recorded: Tiers | None, declared: Tiers | None) -> str | None:
    """Why a store that records ``recorded`` cannot run with ``declared`` (None: it can;
    then ``declared`` replaces the record). The widths stay those the store was given
    (its rows are in their tables); horizons may change; tiers may be added to a store
    that had none, whose rows are then tier 0's."""
    if recorded is None or (
        declared is not None
        and declared.widths == recorded.widths
        and declared.zone == recorded.zone
    ):
        return None
    if declared is None:
        return f"--tiers is none, but the store keeps the tiers {recorded}"
    if declared.widths == recorded.widths:
        return (
            f"--tiers is {declared}, but the store keeps the tiers {recorded}: the zone of "
            f"a store's days cannot change (its 1d rows are days of {recorded.zone})"
        )
    return (
        f"--tiers is {declared}, but the store keeps the tiers {recorded}: the widths "
        "of a store's tiers cannot change (their horizons can)"
    )


def _tier_zone(text: str, width: int, finer: Sequence[Tier]) -> str:
    """The zone a tier of ``width`` names, after the ``finer`` tiers: a ``1d`` tier's,
    whose local midnights (over the years :data:`_ZONE_YEARS`) are all edges of the
    finer tiers' buckets; ValueError saying why not."""
    if width != WIDTHS["1d"]:
        raise ValueError(
            f"only a 1d tier may name a time zone, not {WIDTH_NAMES[width]} in {text}: "
            "other widths are fixed spans of UTC time"
        )
    try:
        zone = _zone(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder
        raise ValueError(
            f"{text[:64]!r} is not an IANA time zone (e.g. Europe/Paris) for the 1d tier"
        ) from None
    if zone.key == "UTC":
        return "UTC"
    for tier in finer:
        if 3600 % tier.width:
            raise ValueError(
                f"a 1d tier in {zone.key} needs every finer tier's width to divide an hour "
                f"(its local days must be whole buckets of them), not {WIDTH_NAMES[tier.width]}"
            )
    widest = max((tier.width for tier in finer), default=60)
    odd = sorted(offset for offset in _offsets(zone.key) if offset % widest)
    if odd:
        raise ValueError(
            f"the local days of {zone.key} do not start on edges of the "
            f"{WIDTH_NAMES[widest]} tier's buckets (its UTC offset is "
            f"{_offset_name(odd[0])} at times): a finer tier that divides it is needed"
        )
    return zone.key


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    if not name or name.startswith(("/", ".")) or ".." in name:
        raise ValueError(name)
    return zoneinfo.ZoneInfo(name)


@functools.lru_cache(maxsize=64)
def _offsets(name: str) -> frozenset[int]:
    """Every UTC offset, in seconds, ``name`` has over :data:`_ZONE_YEARS` (read twice a
    day: no zone changed its offset for less than that)."""
    zone = _zone(name)
    first, last = (
        int(datetime.datetime(year, 1, 1, tzinfo=datetime.UTC).timestamp()) for year in _ZONE_YEARS
    )
    found = set()
    for moment in range(first, last, 43200):
        offset = datetime.datetime.fromtimestamp(moment, zone).utcoffset()
        assert offset is not None
        found.add(int(offset.total_seconds()))
    return frozenset(found)


def _offset_name(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    minutes = abs(seconds) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def midnight(day: datetime.date, zone: zoneinfo.ZoneInfo) -> int:
    """The local midnight starting ``day`` in ``zone``, as Unix seconds (where a clock
    skips midnight, the moment after the gap), as queries' calendar edges are."""
    return int(datetime.datetime.combine(day, datetime.time(), zone).timestamp())


def _parse_horizon(text: str) -> int:
    match = _HORIZON.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a horizon (whole minutes, hours or days: 90m, 36h, 7d)")
    return int(match[1]) * _UNITS[match[2]]


def _span(seconds: int) -> str:
    """A horizon as its shortest whole unit: 7d, 36h, 90m."""
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds // 60}m"


def span_name(seconds: int | None) -> str:
    """A horizon as ``--tiers`` writes it, ``forever`` for None."""
    return "forever" if seconds is None else _span(seconds)
