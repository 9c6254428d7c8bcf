"""Recent ``/v1/aggregates`` answers, served on the event loop without a thread hop.

A hot read (the same parsed query again) is answered from memory: no worker
thread, no SELECT. An entry (:class:`CachedAnswer`) keeps what the rollups
table held for the query and the answer as the writers' heads then stood; a
hit whose keys the heads still hold the same way is the answer as it is, and
one whose keys took new batches since is the kept rows merged anew with the
heads' (:meth:`~trioagg.store.Store.overlay`): a read after an acknowledged
write sees it, while the cache changes only when a flush writes the table.
What keeps it exact:

* **Kept current by key and range**: after each flush the writer calls
  :meth:`ReadCache.committed` with the first and last bucket each key it
  wrote fell in (gathered in the flush's thread, not on the event loop) and
  the rollups it wrote, by key. A cached answer over one of those keys whose
  range meets that span takes them in (:meth:`CachedAnswer.took_flush`: a
  reference per key, merged into its kept rows at its next use), so that hot
  reads stay hits while batches stream in; one that cannot (its value is not
  a :class:`CachedAnswer`, the flush set rows aside, it missed a flush) is
  dropped. An answer over yesterday is left alone by flushes of today's
  events. An entry read before a flush this process made is never used after
  it unless it took that flush (its heads' generations say which).
* **No stale insert**: an answer is cached only if no flush touched one of
  its keys while it was being read (:meth:`ReadCache.reading`), so a read that
  raced a flush is answered but not kept.
* **Other processes**: commits by another process sharing the store (another
  hypercorn worker) are not seen here; an answer older than ``ttl`` seconds is
  served only while the store is known to have taken no commit at all since it
  was read (:meth:`ReadCache.store_checked`, fed by :func:`watch_store` from a
  look at the store at least every ``ttl / 4`` seconds, where the backend can
  tell: SQLite), which bounds how stale such a read can be by ``ttl`` either way.
  Any commit, this process's own included, ends that: an idle store's answers
  stay hits, a busy one's expire at ``ttl``.

Bounded by ``entries`` and by ``max_bytes`` (answers' bytes and what their keys
cost, :func:`entry_cost`); the least recently used answers are dropped first,
and an entry larger than an eighth of ``max_bytes`` is never kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ..core.rollup import Rollup
from ..store import Row, Store
from ..store.head import SKETCH_BYTES, tags_hold_tenant
from ..store.plan import Flushed
from .aggregates import Query

log = logging.getLogger("trioagg")

#: A flushed head's rollups of one key, by (bucket, tags), as the flush left them (no
#: one changes them after it).
KeyRollups = Mapping[tuple[int, str], Rollup]

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
    #: The tenant whose rows it holds (None: every tenant's).
    tenant: str | None = None
    #: What flushes of this process wrote of its keys since it was read, not yet in
    #: :attr:`stored` (see :meth:`took_flush` and :meth:`stored_now`).
    flushed: list[tuple[str, KeyRollups]] = field(default_factory=list)
    #: The bytes :attr:`flushed` holds: a key's whole dictionary (all the buckets the
    #: flush wrote of it, in the answer's range or not), as the flush sized it.
    flushed_bytes: int = 0
    #: The bytes :attr:`stored` holds (counted once, as it is made).
    stored_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        sketches = sum(
            (r.quantiles is not None) + (r.distinct is not None) for _, _, _, r in self.stored
        )
        self.stored_bytes = ROW_OVERHEAD * len(self.stored) + SKETCH_BYTES * sketches

    @property
    def size(self) -> int:
        return len(self.body) + self.stored_bytes + self.flushed_bytes

    def took_flush(
        self, shard: int, generation: int, key: str, rollups: KeyRollups, size: int
    ) -> None:
        """Writer ``shard``'s flush, its head now at ``generation``, wrote ``rollups`` of
        ``key`` (``size`` bytes of them) to the table: the table now holds what
        :attr:`stored` holds plus them. The answer kept is no longer its answer (the
        next use makes it again)."""
        self.flushed.append((key, rollups))
        self.flushed_bytes += size
        self.generations = (
            *self.generations[:shard],
            generation,
            *self.generations[shard + 1 :],
        )
        self.versions = ()  # equal to no key's versions: the overlay is merged again
        self.body = b""

    def stored_now(self, start: int, end: int) -> list[Row]:
        """The table's rows of the answer's keys in buckets ``[start, end)``, as this
        process wrote them: what was read, and what flushes wrote since."""
        rows = list(self.stored)
        tenant = self.tenant
        for key, rollups in self.flushed:
            rows.extend(
                (key, bucket, tags, rollup)
                for (bucket, tags), rollup in rollups.items()
                if start <= bucket < end and (tenant is None or tags_hold_tenant(tags, tenant))
            )
        return rows


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
        #: The store took no commit after ``_changed_by`` up to ``_checked``, as far as
        #: :meth:`store_checked` was told (nothing is vouched for until it is).
        self._changed_by = math.inf
        self._checked = -math.inf

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
        """The cached answer, if there is one younger than ``ttl``, or older and read
        after the store's last commit (see :meth:`store_checked`)."""
        entry = self._answers.get(key)
        now = self.clock()
        # Read strictly after the change was seen: a read begun at the same reading (a
        # clock that did not move, as a mock one does while threads run) may have taken
        # its snapshot before that commit.
        if entry is None or (
            now - entry.stored_at >= self.ttl
            and not (entry.stored_at > self._changed_by and now - self._checked < self.ttl)
        ):
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return entry.value

    def discard(self, key: Hashable) -> None:
        """Drop the entry of ``key``, if there is one."""
        if key in self._answers:
            self._drop(key)

    def holds(self, key: Hashable, value: Any) -> bool:
        """Whether the entry of ``key`` is ``value`` (not dropped or replaced since)."""
        entry = self._answers.get(key)
        return entry is not None and entry.value is value

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

    def store_checked(self, started: float, changed: bool) -> None:
        """A look at the store that began at ``started`` (a clock reading) found that it
        ``changed`` since the previous look (or could not tell: the first look, a failed
        one), or that it did not. Unchanged, every answer read after the last change
        is as current as at ``started``, and may be served up to ``ttl`` after it."""
        if changed:
            self._changed_by = self.clock()  # whatever changed had committed by now
        self._checked = started

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
        self,
        touched: Mapping[str, tuple[int, int]],
        shard: int,
        generation: int,
        flushed: Flushed | None = None,
    ) -> None:
        """Writer ``shard``'s flush (its head now at ``generation``) wrote rows of the keys
        of ``touched``, each from its first to its last bucket, and ``flushed`` holds them
        by key (None: it set some aside, or the caller cannot tell): every answer over one
        of those keys whose range meets that span takes them in, or is dropped (see the
        module), and a touch is counted on each of them being read. (Key sets
        intersected: it costs the smaller side, not the flush's rows.)"""
        for key in touched.keys() & self._reading.keys():
            self._reading[key][1] += 1
        try:
            self._follow(touched, shard, generation, flushed)
        except BaseException:
            # Whatever went wrong, an answer that should have gone may still be here: only
            # an empty cache is sure to serve nothing stale.
            self.clear()
            raise
        self._told[shard] = generation

    def _follow(
        self,
        touched: Mapping[str, tuple[int, int]],
        shard: int,
        generation: int,
        flushed: Flushed | None,
    ) -> None:
        if self._told.get(shard, 0) != generation - 1:
            # The head moved on without telling (a flush whose COMMIT was uncertain and
            # did commit, a head rebuilt from its journal): which answers that made stale
            # is not known, and current() is about to take this generation as told.
            self.clear()
        expired = self.clock() - self.ttl
        taking: set[Hashable] = set()  # answers taking this flush in (for each of its keys)
        for key in touched.keys() & self._by_key.keys():
            first, last = touched[key]
            # Dropping an answer over several keys may drop a later key's last answer
            # (and its entry in _by_key) before the loop reaches it.
            for cached in list(self._by_key.get(key, ())):
                entry = self._answers.get(cached)
                if entry is None:
                    continue
                # Expired answers go too: those over past ranges outlive the commits,
                # and this walk must stay as short as the ttl keeps them.
                if entry.stored_at <= expired:
                    self._drop(cached)
                    continue
                if not (first < entry.end and last >= entry.start):
                    continue
                answer = entry.value
                rollups = None if flushed is None else flushed.rollups.get(key)
                if not isinstance(answer, CachedAnswer) or rollups is None:
                    self._drop(cached)
                elif cached in taking or answer.generations[shard] == generation - 1:
                    assert flushed is not None
                    answer.took_flush(shard, generation, key, rollups, flushed.sizes[key])
                    cost = entry_cost(entry.keys, answer.size)
                    if not self._fits(cost):
                        self._drop(cached)  # grown past what one answer may hold
                        continue
                    self.bytes += cost - entry.cost
                    entry.cost = cost
                    taking.add(cached)
                elif answer.generations[shard] != generation:
                    self._drop(cached)  # it missed a flush: its rows cannot be made whole
                # else read after this flush committed: its rows hold it already
        if taking:
            self._bound()

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
        self._bound()

    def _bound(self) -> None:
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


async def watch_store(store: Store, cache: ReadCache) -> None:
    """Look at the store every ``cache.ttl / 4`` seconds (at most every second) and tell
    ``cache`` whether it changed (:meth:`ReadCache.store_checked`), until cancelled;
    returns at once where the backend cannot tell. A failed look counts as a change."""
    interval = min(cache.ttl / 4, 1.0)
    previous = None
    while True:
        started = cache.clock()
        try:
            stamp = await store.change_stamp()
        except Exception as failure:
            log.debug("looking for changes to the store failed: %s", failure)
            cache.store_checked(started, changed=True)
            # Stamps compare only within one connection's life: the next look, maybe on
            # a connection made afresh, starts over.
            previous = None
        else:
            if stamp is None:
                return
            cache.store_checked(started, changed=stamp != previous)
            previous = stamp
        await trio.sleep(interval)
