"""What one query may cost, and the refusals that say how to ask for less.

A query is refused (``422 invalid_query``) rather than answered when its
answer would hold more buckets than :attr:`Budget.answer_buckets` (across all
series, empty buckets that ``fill`` adds included), when its range holds more
day, week or month buckets than :attr:`Budget.calendar_buckets`, when
the store holds more than :attr:`Budget.rows` rows for it, or when its JSON
would exceed :attr:`Budget.answer_bytes`. Whatever can be known before reading
the store is checked before reading it; the functions here are pure, so the
budget's arithmetic is tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: Answers of at most this many rows or buckets are built on the event loop; bigger ones
#: in a worker thread, so that no request holds the loop for more than about a millisecond.
INLINE_WORK: Final = 2_000


@dataclass(frozen=True, slots=True)
class Budget:
    """The most one query may cost; the defaults fit a small machine."""

    #: Buckets of the answer, across all its series, empty ones that fill adds included.
    answer_buckets: int = 100_000
    #: Day, week or month buckets of the range; their edges are computed on the event
    #: loop (about 1 us each), once counted.
    calendar_buckets: int = 5_000
    #: Rows read from the store.
    rows: int = 250_000  # about 300 bytes of memory each while an answer is built
    #: Bytes of the answer's JSON.
    answer_bytes: int = 32 * 1024 * 1024

    def calendar_problem(self, granularity: str, buckets: int) -> str | None:
        """Why a range of ``buckets`` day, week or month buckets is too long."""
        if buckets <= self.calendar_buckets:
            return None
        return (
            f"the range holds {buckets} {granularity} buckets, more than the "
            f"{self.calendar_buckets} day, week or month buckets a query may have: shorten "
            "the range or choose a coarser granularity"
        )

    def fill_problem(self, fill: str, series: int, buckets: int) -> str | None:
        """Why filling ``buckets`` per series for ``series`` series is too much."""
        if series * buckets <= self.answer_buckets:
            return None
        return (
            f"fill={fill} would answer {series} series x {buckets} buckets, more than the "
            f"{self.answer_buckets} buckets an answer may have: shorten the range, choose a "
            "coarser granularity, ask for fewer keys (or a group_by tag with fewer values), "
            "or use fill=none"
        )

    def buckets_problem(self) -> str:
        return (
            f"the answer would hold more than the {self.answer_buckets} buckets an answer may "
            "have: shorten the range, choose a coarser granularity, or ask for fewer keys "
            "(or a group_by tag with fewer values)"
        )

    def rows_problem(self) -> str:
        return (
            f"the store holds more than the {self.rows} rows a query may read for these keys "
            "in this range: shorten the range or ask for fewer keys"
        )

    def bytes_problem(self) -> str:
        return (
            f"the answer would be larger than the {self.answer_bytes} bytes an answer may be: "
            "ask for fewer stats or keys, a shorter range or a coarser granularity"
        )


DEFAULT_BUDGET: Final = Budget()
