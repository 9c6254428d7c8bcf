"""The head: the rollups of journalled batches that are not flushed yet.

Each writer appends every batch it commits to the journal (one row per batch,
:func:`encode_batch`) and folds the batch's rollups into its :class:`Head`,
in memory. A flush writes the head's rows to the ``rollups`` table and
deletes the journal rows they came from in one transaction, then empties the
head (:meth:`Head.flushed`). So a row costs one UPSERT per flush window, not
one per batch, and whatever was acknowledged is in exactly one of two
places: the journal (its rollups in some process's head), or the table.

A read of this process adds the head to what the table holds
(:meth:`Head.overlay`); :meth:`Head.mark` and :meth:`Head.unchanged_since`
tell a read whether a flush committed while it read the table, in which case
it may have counted the flushed rows twice or not at all, and must read again.

The head is folded into by the writer's thread and read by read threads (and,
without blocking, by the event loop): :attr:`Head.lock` guards it. Pure but
for that lock: no I/O.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from ..core.events import Point
from ..core.rollup import (
    Rollup,
    Slot,
    decode_distinct,
    decode_quantiles,
    encode_distinct,
    encode_quantiles,
    pre_aggregate,
)

#: A stored row, as :meth:`~trioagg.store.base.Backend.fetch` returns it.
Row = tuple[str, int, str, Rollup]
#: What a journal row holds per event: an event as it was accepted (its id, claimed
#: when the row was appended, is not used again).
JournalEvent = tuple[str, float, float, str, str | None, str | None]

#: What a rollup of the head is taken to hold in memory (the rollup, its slot and the
#: two dictionaries that index it), and a sketch besides (a KLL of k=200 or an HLL of
#: lg_k=12 holds a few KB).
ROW_BYTES = 400
SKETCH_BYTES = 4096

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[JournalEvent])
#: Head versions of keys come from one counter, so a version is never seen twice.
_versions = itertools.count(1)


def key_sizes(by_key: Mapping[str, Mapping[tuple[int, str], Rollup]]) -> dict[str, int]:
    """About how many bytes each key's rollups take (:data:`ROW_BYTES` a rollup,
    :data:`SKETCH_BYTES` a sketch)."""
    return {
        key: sum(
            ROW_BYTES
            + SKETCH_BYTES * ((rollup.quantiles is not None) + (rollup.distinct is not None))
            for rollup in rollups.values()
        )
        for key, rollups in by_key.items()
    }


def encode_batch(points: Sequence[Point]) -> bytes:
    """A journal row's blob: the events, as MessagePack."""
    return _encoder.encode(points)


def decode_batch(blob: bytes) -> list[JournalEvent]:
    return _decoder.decode(blob)


def tenant_needles(tenant: str) -> tuple[str, str]:
    """What canonical tags JSON holds where it has ``tenant=<tenant>``: the pair right
    after ``{`` or ``,``. Inside a JSON string every quote is escaped, so a quote after
    ``{`` or ``,`` starts a member name, and the encoded value ends exactly where its
    closing quote is: another tag's value merely containing the text cannot match, nor
    can a longer value (``acme2`` for ``acme``)."""
    pair = '"tenant":' + msgspec.json.encode(tenant).decode()
    return "{" + pair, "," + pair


def tags_hold_tenant(tags: str, tenant: str) -> bool:
    first, later = tenant_needles(tenant)
    return first in tags or later in tags


def copy_rollup(rollup: Rollup, *, sketches: bool) -> Rollup:
    """An independent copy (answers merge rollups into one another); with ``sketches``
    its sketches are copied too, else left out."""
    copied = Rollup(
        rollup.shift,
        rollup.count,
        rollup.s1,
        rollup.s2,
        rollup.min,
        rollup.max,
        last=rollup.last,
        last_ts=rollup.last_ts,
    )
    if sketches:
        copied.quantiles = decode_quantiles(encode_quantiles(rollup.quantiles))
        copied.distinct = decode_distinct(encode_distinct(rollup.distinct))
    return copied


def copy_row(row: Row, sketches: bool) -> Row:
    key, bucket, tags, rollup = row
    return key, bucket, tags, copy_rollup(rollup, sketches=sketches)


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a head stood when a read began (see :meth:`Head.unchanged_since`)."""

    generation: int
    committing: bool


class Head:
    """One writer's unflushed rollups, by slot and by key, and the journal rows they
    came from (see the module)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rollups: dict[Slot, Rollup] = {}
        #: The same rollups by key, then by (bucket, tags): what a read looks up.
        self._by_key: dict[str, dict[tuple[int, str], Rollup]] = {}
        #: Per key, a version that changes with every fold touching it (for the read
        #: cache: an answer whose keys' versions are unchanged needs no new overlay).
        self.versions: dict[str, int] = {}
        #: Flushes committed so far.
        self.generation = 0
        #: True while a flush's COMMIT runs: a read then cannot tell whether the table
        #: holds the flushed rows.
        self.committing = False
        #: Journal rows folded in since the last flush, by sequence number.
        self.journal: list[int] = []
        self.events = 0
        self.sketches = 0
        #: A batch journalled by this writer is missing from the head (folding it
        #: failed, or another process replayed some of its batches): the next flush
        #: rebuilds the head from the journal first.
        self.stale = False
        #: The last flush's COMMIT failed in a way that may have committed it all the
        #: same: the next flush first looks whether its journal rows are gone.
        self.uncertain = False

    def __len__(self) -> int:
        return len(self.rollups)

    @property
    def by_key(self) -> dict[str, dict[tuple[int, str], Rollup]]:
        """The rollups by key, then by (bucket, tags). :meth:`flushed` makes new ones and
        leaves these as they were: after a flush, no one changes them."""
        return self._by_key

    @property
    def size(self) -> int:
        """About how many bytes the head holds (see :data:`ROW_BYTES`)."""
        return len(self.rollups) * ROW_BYTES + self.sketches * SKETCH_BYTES

    def add(
        self,
        events: Sequence[Point | JournalEvent],
        seq: int,
        width: int,
        keeps_quantiles: Callable[[str], bool],
    ) -> None:
        """Fold the events of journal row ``seq`` into the head's rollups: straight into
        them, under the lock, so that a read sees the whole batch or none of it."""
        created: list[Slot] = []
        with self.lock:
            pre_aggregate(events, width, self.rollups, keeps_quantiles, created)
            rollups, by_key = self.rollups, self._by_key
            for slot in created:
                key, bucket, tags = slot
                rollup = rollups[slot]
                per_key = by_key.get(key)
                if per_key is None:
                    per_key = by_key[key] = {}
                per_key[(bucket, tags)] = rollup
                # Sketches are counted where their slot is made: a distinct sketch that
                # a slot takes later is not (keys keep distinct ids or never do).
                self.sketches += (rollup.quantiles is not None) + (rollup.distinct is not None)
            version = next(_versions)
            versions = self.versions
            for key in {event[0] for event in events}:
                versions[key] = version
            self.journal.append(seq)
            self.events += len(events)

    def mark(self) -> Mark:
        return Mark(self.generation, self.committing)

    def unchanged_since(self, mark: Mark) -> bool:
        """Whether no flush committed (or was committing) since ``mark``: call it
        holding :attr:`lock`."""
        return not mark.committing and not self.committing and mark.generation == self.generation

    def overlay(self, keys: Sequence[str], start: int, end: int, *, sketches: bool) -> list[Row]:
        """Copies of the head's rollups of ``keys`` in buckets ``[start, end)``: call it
        holding :attr:`lock`."""
        rows: list[Row] = []
        for key in keys:
            per_key = self._by_key.get(key)
            if per_key is None:
                continue
            rows.extend(
                (key, bucket, tags, copy_rollup(rollup, sketches=sketches))
                for (bucket, tags), rollup in per_key.items()
                if start <= bucket < end
            )
        return rows

    def key_versions(self, keys: Sequence[str]) -> tuple[int, ...]:
        """The versions of ``keys`` (0: nothing of the key in the head). Safe without the
        lock: each look-up is atomic."""
        versions = self.versions
        return tuple(versions.get(key, 0) for key in keys)

    def flushed(self) -> None:
        """The head's rows are committed to the table: empty it. Call it holding
        :attr:`lock`, right after the COMMIT."""
        self.rollups = {}
        self._by_key = {}
        self.versions = {}
        self.journal = []
        self.events = 0
        self.sketches = 0
        self.generation += 1
        self.committing = False

    def rebuild(
        self,
        rows: Iterable[tuple[int, Sequence[JournalEvent]]],
        width: int,
        keeps_quantiles: Callable[[str], bool],
    ) -> None:
        """Replace what the head holds with the fold of journal rows (seq, events): what
        is left of this writer's journal after another process took some of it, or
        after a batch failed to fold (see :func:`~trioagg.store.base.flush_head`).

        The fold is made apart and takes the head's place in one hold of the lock: a
        read meanwhile sees the head as it was or as it is rebuilt, never a part."""
        fresh = Head()
        for seq, events in rows:
            fresh.add(events, seq, width, keeps_quantiles)
        with self.lock:
            self.flushed()  # a new generation: reads under way read again
            self.rollups, self._by_key, self.versions = fresh.rollups, fresh._by_key, fresh.versions
            self.journal, self.events, self.sketches = fresh.journal, fresh.events, fresh.sketches
