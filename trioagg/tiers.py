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
"""

from __future__ import annotations

import math
import re
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
_TIER = re.compile(r"\s*(\S+)\s+for\s+(\S+)\s*|\s*(\S+)\s+(forever)\s*", re.IGNORECASE)
_HORIZON = re.compile(r"([1-9][0-9]{0,6})(m|h|d)")


@dataclass(frozen=True, slots=True)
class Tier:
    """Buckets of ``width`` seconds, kept until they are ``horizon`` seconds old (None:
    for ever)."""

    width: int
    horizon: int | None

    def __str__(self) -> str:
        width = WIDTH_NAMES[self.width]
        return f"{width} forever" if self.horizon is None else f"{width} for {_span(self.horizon)}"


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

    def cut(self, index: int, now: float) -> int:
        """Where tier ``index`` (not the last) ends at ``now``: its buckets that start
        before this moment are past its horizon, to be rolled into the next tier. A
        multiple of the next tier's width, so that a wider bucket is rolled whole."""
        horizon = self.tiers[index].horizon
        assert horizon is not None, "only the last tier keeps its buckets for ever"
        wider = self.tiers[index + 1].width
        return math.floor((now - horizon) / wider) * wider

    def drop_cut(self, now: float) -> int | None:
        """Where the last tier's buckets start to be kept at ``now`` (None: for ever)."""
        last = self.tiers[-1]
        if last.horizon is None:
            return None
        return math.floor((now - last.horizon) / last.width) * last.width


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
            if edge < since and edge % tiers.tiers[index].width:
                return edge, index
    return None


def widen(start: int, end: int, tiers: Tiers, held: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``[start, end)`` widened so that no bucket of a coarse tier that may hold it is
    cut by either end (what ``granularity=all`` answers)."""
    for since, index in reversed(held):  # the coarsest first: its width is a multiple
        if start < since:
            width = tiers.tiers[index].width
            start = math.floor(start / width) * width
            break
    for since, index in reversed(held):
        if end < since:
            width = tiers.tiers[index].width
            end = math.ceil(end / width) * width
            break
    return start, end


def parse_tiers(text: str) -> Tiers | None:
    """Parse ``--tiers``: a comma list of ``WIDTH for HORIZON``, the last one maybe
    ``WIDTH forever``; ``none`` or empty for no tiers. Widths are among :data:`WIDTHS`,
    each a multiple of the one before; horizons are whole minutes, hours or days
    (``90m``, ``36h``, ``7d``), each longer than the one before and than the next
    tier's width."""
    if text.strip().lower() in ("", "none"):
        return None
    tiers: list[Tier] = []
    parts = text.split(",")
    for number, part in enumerate(parts):
        match = _TIER.fullmatch(part)
        if match is None:
            raise ValueError(
                f"{part.strip()!r} is not a tier: write WIDTH for HORIZON (1m for 7d), or "
                "WIDTH forever for the last one"
            )
        width_text, horizon_text = (match[1], match[2]) if match[1] else (match[3], None)
        width = WIDTHS.get(width_text.lower())
        if width is None:
            raise ValueError(
                f"{width_text!r} is not a tier width (choose one of {', '.join(WIDTHS)})"
            )
        horizon = None if horizon_text is None else _parse_horizon(horizon_text)
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
        tiers.append(Tier(width, horizon))
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
    if recorded is None or (declared is not None and declared.widths == recorded.widths):
        return None
    if declared is None:
        return f"--tiers is none, but the store keeps the tiers {recorded}"
    return (
        f"--tiers is {declared}, but the store keeps the tiers {recorded}: the widths "
        "of a store's tiers cannot change (their horizons can)"
    )


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
