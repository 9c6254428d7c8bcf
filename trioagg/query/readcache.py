"""Recent ``/v1/aggregates`` answers, served on the event loop without a thread hop.

A hot read (the same parsed query again) is answered from memory: no worker
thread, no SELECT. An entry (:class:`CachedAnswer`) keeps what the rollups
table held for the query and the answer as the writers' heads then stood; a
hit whose keys the heads still hold the same way is the answer as it is, and
one whose keys took new batches since is the kept rows merged anew with the
heads' (:meth:`~trioagg.store.Store.overlay`): a read after an acknowledged
write sees it, while the cache changes only when a flush writes the table.
What keeps it exact:

* **Invalidation by key and range**: after each flush the writer calls
  :meth:`ReadCache.committed` with the first and last bucket each key it
  wrote fell in (gathered in the flush's thread, not on the event loop), and
  every cached answer over one of those keys whose range meets that span is
  dropped: an answer over yesterday survives flushes of today's events. An
  entry read before a flush this process made is never used after it (its
  heads' generations differ), dropped or not.
* **No stale insert**: an answer is cached only if no flush touched one of
  its keys while it was being read (:meth:`ReadCache.reading`), so a read that
  raced a flush is answered but not kept.
* **Other processes**: commits by another process sharing the store (another
  hypercorn worker) are not seen here; an answer older than ``ttl`` seconds is
  never served, which bounds how stale such a read can be.

Bounded by ``entries`` and by ``max_bytes`` (answers' bytes and what their keys
cost, :func:`entry_cost`); the least recently used answers are dropped first,
and an entry larger than an eighth of ``max_bytes`` is never kept.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..store import Row
from ..store.head import SKETCH_BYTES
from .aggregates import Query

#: What an entry costs besides its answer's bytes and its key names (the entry, the rest
#: of its cache key).
ENTRY_OVERHEAD = 200
#: What each key name of an entry costs besides its characters: the string, its place in
#: the cache key and in the index of answers by key (about 290 bytes, traced).
NAME_OVERHEAD = 300


def entry_cost(keys: Sequence[str], size: int) -> int:
    """The bytes an entry of an answer of ``size`` bytes is counted for. A query names up
    to 100 keys of up to 255 bytes, so its names can outweigh a small answer many times
    over."""
    return size + ENTRY_OVERHEAD + sum(len(name) + NAME_OVERHEAD for name in keys)


def cache_key(query: Query) -> Hashable:
    """Everything that decides a query's answer. The answer buckets' edges follow from
    the granularity, the zone and the first and last edge (and the store's fixed bucket)."""
    return (
        query.keys,
        query.granularity,
        query.tz,
        query.start,
        query.end,
        tuple(sorted(query.tags.items())),
        query.group_by,
        query.stats,
        query.fill,
    )


#: What a kept row is counted for besides the answer (the row and its rollup).
ROW_OVERHEAD = 250


@dataclass(slots=True)
class CachedAnswer:
    """An answer, and what it was made of: the table's rows (never merged into, so they
    can be merged again) and the heads' generations and versions of its keys then."""

    stored: list[Row]
    generations: tuple[int, ...]
    versions: tuple[int, ...]
    body: bytes = b""

    @property
    def size(self) -> int:
        sketches = sum(
            (r.quantiles is not None) + (r.distinct is not None) for _, _, _, r in self.stored
        )
        return len(self.body) + ROW_OVERHEAD * len(self.stored) + SKETCH_BYTES * sketches


@dataclass(slots=True)
class _Entry:
    keys: tuple[str, ...]
    value: Any
    stored_at: float
    cost: int
    #: the range of buckets the answer read: [start, end)
    start: int
    end: int


class ReadCache:
    """Encoded answers by :func:`cache_key` (see the module)."""

    def __init__(
        self,
        *,
        entries: int,
        max_bytes: int,
        ttl: float,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._answers: OrderedDict[Hashable, _Entry] = OrderedDict()
        #: cached answers by event key, for invalidation
        self._by_key: dict[str, set[Hashable]] = {}
        #: keys being read now: [reads under way, commits that touched the key meanwhile]
        self._reading: dict[str, list[int]] = {}
        #: Per writer, the generation of its head whose flush was told last.
        self._told: dict[int, int] = {}

    @property
    def enabled(self) -> bool:
        return self.entries > 0 and self.max_bytes > 0 and self.ttl > 0

    def __len__(self) -> int:
        return len(self._answers)

    def keeps(self, keys: Sequence[str], size: int) -> bool:
        """Whether an answer of ``size`` bytes over ``keys`` is small enough to keep: a
        bigger one is sent in pieces, never joined into one string (see ``app``)."""
        return self._fits(entry_cost(keys, size))

    def _fits(self, cost: int) -> bool:
        return self.enabled and cost <= self.max_bytes // 8

    def get(self, key: Hashable) -> Any | None:
        """The cached answer, if there is one younger than ``ttl``."""
        entry = self._answers.get(key)
        if entry is None or self.clock() - entry.stored_at >= self.ttl:
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return entry.value

    def refresh(self, key: Hashable, value: Any, size: int) -> None:
        """Replace an entry's answer (of ``size`` bytes), keeping its age: its rows are
        as old as they were."""
        entry = self._answers.get(key)
        if entry is None:
            return
        self._drop(key)
        cost = entry_cost(entry.keys, size)
        self._put(key, _Entry(entry.keys, value, entry.stored_at, cost, entry.start, entry.end))

    @contextlib.contextmanager
    def reading(
        self, keys: Sequence[str], start: int, end: int
    ) -> Iterator[Callable[[Hashable, Any, int], None]]:
        """For the body of the ``with``, a read of ``keys`` over the buckets in
        ``[start, end)`` is under way; it yields ``keep(cache_key, answer, size)``, which
        caches the answer (of ``size`` bytes) unless a flush touched one of ``keys`` (in
        any bucket) since the ``with`` began."""
        counts = [self._reading.setdefault(key, [0, 0]) for key in keys]
        touches = []
        for count in counts:
            count[0] += 1
            touches.append(count[1])
        started = self.clock()

        def keep(cache_key: Hashable, answer: Any, size: int) -> None:
            if all(count[1] == seen for count, seen in zip(counts, touches, strict=True)):
                names = tuple(keys)
                entry = _Entry(names, answer, started, entry_cost(names, size), start, end)
                self._put(cache_key, entry)

        try:
            yield keep
        finally:
            for key, count in zip(keys, counts, strict=True):
                count[0] -= 1
                if not count[0]:
                    del self._reading[key]

    def current(self, read_at: Sequence[int], now: Sequence[int]) -> bool:
        """Whether rows read at head generations ``read_at`` still hold at ``now``: every
        writer's head is where it was then, or each flush since was told (and dropped the
        answers it made stale), so an answer still here survived them."""
        told = self._told
        return all(
            then == current or told.get(shard) == current
            for shard, (then, current) in enumerate(zip(read_at, now, strict=True))
        )

    def committed(
        self, touched: Mapping[str, tuple[int, int]], shard: int = 0, generation: int = 0
    ) -> None:
        """Writer ``shard``'s flush (its head now at ``generation``) wrote rows of the keys
        of ``touched``, each from its first to its last bucket: drop every answer over one
        of them whose range meets that span, and count a touch on each of them being
        read. (Key sets intersected: it costs the smaller side, not the flush's rows.)"""
        for key in touched.keys() & self._reading.keys():
            self._reading[key][1] += 1
        try:
            self._invalidate(touched)
        except BaseException:
            # Whatever went wrong, an answer that should have gone may still be here: only
            # an empty cache is sure to serve nothing stale.
            self.clear()
            raise
        self._told[shard] = generation

    def _invalidate(self, touched: Mapping[str, tuple[int, int]]) -> None:
        expired = self.clock() - self.ttl
        for key in touched.keys() & self._by_key.keys():
            first, last = touched[key]
            # Dropping an answer over several keys may drop a later key's last answer
            # (and its entry in _by_key) before the loop reaches it.
            for cached in list(self._by_key.get(key, ())):
                entry = self._answers[cached]
                # Expired answers go too: those over past ranges outlive the commits,
                # and this walk must stay as short as the ttl keeps them.
                if (first < entry.end and last >= entry.start) or entry.stored_at <= expired:
                    self._drop(cached)

    def clear(self) -> None:
        """Drop every answer (reads under way still count their touches)."""
        self._answers.clear()
        self._by_key.clear()
        self.bytes = 0

    def _put(self, key: Hashable, entry: _Entry) -> None:
        if not self._fits(entry.cost):
            return
        if key in self._answers:
            self._drop(key)
        self._answers[key] = entry
        self.bytes += entry.cost
        for name in entry.keys:
            self._by_key.setdefault(name, set()).add(key)
        while len(self._answers) > self.entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._answers)))

    def _drop(self, key: Hashable) -> None:
        entry = self._answers.pop(key)
        self.bytes -= entry.cost
        for name in entry.keys:
            cached = self._by_key[name]
            cached.discard(key)
            if not cached:
                del self._by_key[name]
