"""The aggregation math: what a bucket keeps, and how two of them merge. No I/O.

A :class:`Rollup` keeps count, min, max and the first two moments of the
values *shifted* by a constant (the first value it saw): ``s1 = Σ(x - shift)``
and ``s2 = Σ(x - shift)²``. Sum, mean and variance follow from those. Keeping
moments around a value near the data, instead of ``Σx²``, is what keeps the
variance of values like 1e9 ± 0.001 from cancelling to noise. Merging two
rollups with different shifts re-centres one onto the other's shift exactly
(``store`` does the same merge in SQL on every upsert).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: Where a rollup belongs: (key, bucket start in Unix seconds, canonical tags JSON).
Slot = tuple[str, int, str]


class Rollup:
    """Count, min, max and shifted moments of the values of one series and bucket."""

    __slots__ = ("count", "max", "min", "s1", "s2", "shift")

    def __init__(
        self,
        value: float,
        count: int = 1,
        s1: float = 0.0,
        s2: float = 0.0,
        min: float | None = None,
        max: float | None = None,
    ) -> None:
        self.shift = value
        self.count = count
        self.s1 = s1
        self.s2 = s2
        self.min = value if min is None else min
        self.max = value if max is None else max

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.shift
        self.s1 += delta
        self.s2 += delta * delta
        if value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value

    def merge(self, other: Rollup) -> None:
        """Fold ``other`` into this rollup, keeping this rollup's shift."""
        offset = other.shift - self.shift
        self.s2 += other.s2 + 2.0 * offset * other.s1 + other.count * offset * offset
        self.s1 += other.s1 + other.count * offset
        self.count += other.count
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max

    def copy(self) -> Rollup:
        return Rollup(self.shift, self.count, self.s1, self.s2, self.min, self.max)

    @property
    def sum(self) -> float:
        return self.count * self.shift + self.s1

    @property
    def mean(self) -> float:
        return self.shift + self.s1 / self.count

    @property
    def stddev(self) -> float:
        """Population standard deviation (divides by count, not count - 1)."""
        variance = (self.s2 - self.s1 * self.s1 / self.count) / self.count
        return math.sqrt(variance) if variance > 0.0 else 0.0

    def stat(self, name: str) -> float:
        """One of the named statistics of :data:`STATS`."""
        if name == "count":
            return self.count
        if name == "avg":
            return self.mean
        value: float = getattr(self, name)
        return value

    def __repr__(self) -> str:
        return (
            f"Rollup(count={self.count}, sum={self.sum!r}, min={self.min!r}, "
            f"max={self.max!r}, stddev={self.stddev!r})"
        )


#: The statistics a rollup answers, in the order the API lists them.
STATS = ("count", "sum", "min", "max", "avg", "stddev")


def pre_aggregate(
    points: Iterable[tuple[str, float, float, str]], width: int, into: dict[Slot, Rollup]
) -> None:
    """Add events ``(key, ts, value, tags)`` to the rollups of their slots in ``into``."""
    for key, ts, value, tags in points:
        slot = (key, int(ts // width) * width, tags)
        rollup = into.get(slot)
        if rollup is None:
            into[slot] = Rollup(value)
        else:
            rollup.add(value)
