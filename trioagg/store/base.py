"""The async face of a store: running one commit, and the threads it runs in.

A :class:`Backend` speaks one database's dialect through blocking calls.
:func:`commit_batch` runs the one transaction the writer commits per batch,
written once for every backend: begin, claim the batch's ids, plan the rows
(the pure part: :mod:`trioagg.store.plan`), merge sketches with the stored
ones, upsert rollups and the series index, commit. :class:`Store` runs it
with ``trio.to_thread`` on a write connection, behind a capacity limiter of
its own (so reads can never take a writer's thread), retrying while the
database is busy, and runs reads on a fixed pool of read connections. Where
the backend gives operations a deadline, one still running then is interrupted
(see :class:`Link`). Nothing here knows SQL or HTTP.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import outcome
import trio

from ..core.errors import StoreBusy, StoreCannotOpen, StoreError, StoreOutage, TrioaggError
from ..core.events import Point
from ..core.rollup import Rollup, Slot, decode_distinct, decode_quantiles, pre_aggregate
from ..core.tiers import QUERY_MARGIN, Tiers, holding, route
from .head import (
    Head,
    JournalEvent,
    Mark,
    copy_rollup,
    decode_batch,
    encode_batch,
    key_sizes,
    tags_hold_tenant,
)
from .plan import (
    Flushed,
    Plan,
    SeriesCache,
    SeriesSpan,
    StoredSketches,
    UpsertRow,
    WritePolicy,
    batch_ids,
    merged_rows,
    new_events,
    plan_rows,
    sketch_rows,
)

log = logging.getLogger("trioagg.store")

#: A stored row: (key, bucket start, canonical tags JSON, rollup).
Row = tuple[str, int, str, Rollup]
#: A series of the keys index, as read: (key, tags JSON, first bucket, last bucket).
KeyInfo = SeriesSpan

T = TypeVar("T")

_FIRST_BACKOFF = 0.01
_MAX_BACKOFF = 1.0
#: A connection unused this long is pinged before its next use (one round trip).
IDLE_CHECK_SECONDS = 1.0
_PURGE_CHUNK = 1000
#: Journal rows of a dead process replayed per transaction (up to batch_size events
#: each): a short hold of the write lock, which the other processes need too.
REPLAY_ROWS = 4
#: Rows a roll moves per transaction (with their sketches): a short hold of the write
#: lock, like the id purge's, so that the writers' commits interleave.
ROLL_ROWS = 2000
#: Times a read tries again while flushes commit under it before it gives up.
_READ_TRIES = 100


class KeyStore(Protocol):
    """The API keys' table (:mod:`trioagg.keys.admin`, :mod:`trioagg.keys.auth`), on connections
    a :class:`Backend` opens. Rows are (name, digest, scopes, tenant, created, expires,
    revoked, last_used)."""

    def create_keys_table(self, conn: Any) -> None: ...

    def insert_api_key(self, conn: Any, row: Sequence[Any]) -> bool: ...

    def find_api_key(self, conn: Any, digest: str) -> tuple[Any, ...] | None: ...

    def list_api_keys(self, conn: Any) -> list[tuple[Any, ...]]: ...

    def any_api_key(self, conn: Any) -> bool: ...

    def revoke_api_key(self, conn: Any, name: str, now: float) -> bool: ...

    def touch_api_keys(self, conn: Any, used: Sequence[tuple[float, str]]) -> None: ...


class RollupBackend(Protocol):
    """Blocking, dialect-specific operations on the roll-ups, the journal and the ids;
    every method runs in a worker thread."""

    description: str
    #: Databases the writers' hours are spread over: 1 where every writer shares one
    #: (PostgreSQL), else one per writer, writer ``i`` writing only in shard ``i``.
    shards: int
    #: Whether a connection can be lost under the service (a server's, not a file's).
    can_disconnect: bool
    #: Whether :meth:`change_stamp` tells anything (else it is never asked).
    tells_changes: bool

    def connect(self, *, write: bool, shard: int = 0) -> Any:
        """A connection; a write connection to shard ``shard``'s database."""

    def exists(self) -> bool:
        """Whether a store is here (its ``meta`` table), creating nothing: no file, no
        table, no folder. Raises when that cannot be told (a server out of reach)."""

    def prepare(self, conn: Any, bucket: int) -> None:
        """On shard 0's write connection: create the schema (of every shard) if needed
        and record ``bucket`` in a new store. Raises ConfigError when an existing store
        was created differently."""

    def begin(self, conn: Any) -> None:
        """Start the write transaction, taking the database's write lock."""

    def commit(self, conn: Any) -> None: ...

    def rollback(self, conn: Any) -> None: ...

    def claim_ids(self, conn: Any, ids: Sequence[str], now: float, since: float) -> set[str]:
        """Record ``ids`` as seen ``now`` and return those that were new: not recorded,
        or recorded before ``since``. A concurrent transaction claiming the same id
        makes this wait for it, so an id is claimed once."""

    def purge_ids(self, conn: Any, before: float, limit: int) -> int:
        """Forget up to ``limit`` ids recorded before ``before``; how many went."""

    def insert_new(self, conn: Any, rows: Sequence[UpsertRow], table: str = "rollups") -> set[Slot]:
        """Insert the rows whose slot is not stored yet; return their slots."""

    def stored_sketches(
        self, conn: Any, slots: Sequence[Slot], table: str = "rollups"
    ) -> dict[Slot, StoredSketches]:
        """The stored (quantiles, distinct) blobs of ``slots``, locked until the commit."""

    def upsert(self, conn: Any, rows: Iterable[UpsertRow], table: str = "rollups") -> None:
        """Merge rollups into stored rows of ``table`` (a tier's: see
        :mod:`trioagg.core.tiers`); sketch blobs replace stored ones unless None."""

    # Tiers (only with --tiers): the rolled marks, and the rows a roll moves.

    def read_rolled(self, conn: Any, *, exclusive: bool) -> list[int]:
        """Inside a transaction: the rolled mark of every tier but the last, locked
        until it ends: shared (a flush), or ``exclusive`` (a roll, which waits for the
        flushes under way, and which flushes wait for)."""

    def write_rolled(self, conn: Any, index: int, mark: int) -> None: ...

    def oldest_bucket(self, conn: Any, table: str, before: int) -> int | None:
        """The first bucket of ``table`` that starts before ``before``; None if none."""

    def rows_before(self, conn: Any, table: str, before: int, limit: int) -> list[Row]:
        """The first ``limit`` rows of ``table`` whose bucket starts before ``before``,
        in (bucket, key, tags) order, sketches too."""

    def delete_through(self, conn: Any, table: str, before: int, last: Slot) -> int:
        """Delete the rows :meth:`rows_before` read, the last of them ``last``: those of
        ``table`` before ``before`` up to ``last`` in (bucket, key, tags) order."""

    def delete_before(self, conn: Any, table: str, before: int, limit: int) -> int:
        """Delete up to ``limit`` rows of ``table`` whose bucket starts before ``before``;
        how many went."""

    def upsert_series(self, conn: Any, spans: Sequence[SeriesSpan]) -> None:
        """Widen the keys index to cover ``spans``."""

    def savepoint(self, conn: Any) -> None:
        """Inside a transaction: a point to roll back to, undoing only what follows."""

    def release_savepoint(self, conn: Any) -> None: ...

    def rollback_to_savepoint(self, conn: Any) -> None: ...

    def set_aside(self, conn: Any, rows: Sequence[UpsertRow], now: float) -> None:
        """Keep rows the rollups table refused in ``refused_rollups``."""

    # The journal: batches committed but not flushed, one row each, by owner (a writer
    # of a process: "<process>/<shard>").

    def append_journal(self, conn: Any, owner: str, events: int, blob: bytes) -> int:
        """Append a batch's row; its sequence number (increasing, never reused)."""

    def read_journal(
        self, conn: Any, owner: str, limit: int | None, *, lock: bool
    ) -> list[tuple[int, int, bytes]]:
        """The first ``limit`` (None: all) rows of ``owner`` in order: (seq, events, blob);
        with ``lock``, locked until the transaction ends."""

    def delete_journal(self, conn: Any, owner: str, first: int, last: int) -> int:
        """Delete ``owner``'s rows from ``first`` to ``last``; how many went."""

    def count_journal(self, conn: Any, owner: str, first: int, last: int) -> int:
        """How many rows of ``owner`` from ``first`` to ``last`` are still there."""

    def journal_owners(self, conn: Any) -> list[str]:
        """The owners that have rows in the journal of this connection's shard."""

    def hold_leases(self, owners: Sequence[str]) -> None:
        """Declare this process alive as ``owners`` for as long as it runs (released by
        :meth:`end_leases` or the process's death)."""

    def end_leases(self) -> None:
        """This process stopped with its journal flushed: give its leases up."""

    def take_lease(self, conn: Any, owner: str) -> bool:
        """Whether ``owner`` is dead, and if so hold its lease (so that one process alone
        replays its journal) until :meth:`drop_lease`."""

    def drop_lease(self, conn: Any, owner: str, replayed: bool) -> None:
        """Give up the lease of :meth:`take_lease`; ``replayed``: its journal is empty,
        so the lease can go for good."""

    def fetch(
        self,
        conn: Any,
        keys: Sequence[str],
        start: int,
        end: int,
        *,
        sketches: bool = False,
        limit: int | None = None,
        tenant: str | None = None,
        fits: Callable[[int, int], bool] | None = None,
    ) -> list[Row]:
        """The rows of ``keys`` whose bucket starts in ``[start, end)``, at most ``limit``;
        with ``tenant``, only rows of series tagged ``tenant=<tenant>`` (so for the
        other two reads). With tiers and ``fits``, raises :class:`TierCut` unless every
        row of a coarse tier ``fits`` (its bucket start, its width) one answer bucket."""

    def list_keys(
        self, conn: Any, prefix: str, after: str, limit: int, tenant: str | None = None
    ) -> list[KeyInfo]:
        """Series of the first ``limit`` keys after ``after`` that start with ``prefix``."""

    def top(
        self,
        conn: Any,
        start: int,
        end: int,
        stat: str,
        prefix: str,
        limit: int,
        tenant: str | None = None,
    ) -> list[tuple[str, float]]:
        """Keys ranked by total ``stat`` (count or sum) over ``[start, end)``."""

    def ping(self, conn: Any) -> None:
        """Raise if the database cannot be reached."""

    def change_stamp(self, conn: Any) -> Hashable:
        """On a read connection of its own: a value that differs from the one it gave
        before whenever any other connection (another process's or this one's writers)
        committed a change since. Asked only where :attr:`tells_changes`."""

    def check_readable(self, *, main_only: bool = False) -> None:
        """Raise before a read when what the read connections would read is gone (a
        SQLite file deleted or replaced: a connection opened before reads the old one).
        ``main_only``: only what the main file holds (the API keys) is read."""

    def is_busy(self, error: Exception) -> bool:
        """Whether ``error`` means another writer holds the database's lock."""

    def is_disconnect(self, error: Exception) -> bool:
        """Whether ``error`` means the connection is gone and must be opened again."""

    def outage_reason(self, error: Exception) -> str | None:
        """Why the store cannot commit anything now (unreachable, full, read-only, gone),
        in words safe to show a client; None when ``error`` is tied to the data."""

    def close(self, conn: Any) -> None: ...

    def deadline(self, *, write: bool) -> float | None:
        """Seconds an operation on a (write) connection may take, connecting included,
        before it is interrupted; None when operations cannot hang (a file's)."""

    def interrupt(self, conn: Any) -> None:
        """From another thread, while ``conn`` is open: make the call blocked on it fail
        now. The connection is closed afterwards, never used again."""


class Backend(RollupBackend, KeyStore, Protocol):
    """What each database's backend is: its roll-ups and its API keys."""


class BusyRetry:
    """When to try an operation again while another writer holds the database's lock:
    after waits doubling from 10 ms to 1 s, for at most ``timeout`` seconds in all.
    The one policy of :class:`Store` (which waits with ``trio.sleep``, off its worker
    threads, so that waiting stays cancellable) and of the blocking key commands
    (:func:`trioagg.keys.admin.create_key` and the others, which wait with ``time.sleep``):
    only the waiting differs. Times are any one clock's seconds."""

    def __init__(self, backend: Backend, timeout: float, now: float) -> None:
        self.backend = backend
        self.timeout = timeout
        self._deadline = now + timeout
        self._backoff = _FIRST_BACKOFF

    def wait(self, error: Exception, now: float) -> float | None:
        """Seconds to wait before the next try after ``error`` at ``now``; None when
        ``error`` is not the database being busy (not for retrying). Raises
        :class:`StoreBusy` once waiting would pass the timeout."""
        if not self.backend.is_busy(error):
            return None
        backoff = self._backoff
        if now + backoff > self._deadline:
            raise StoreBusy(f"the database stayed locked for {self.timeout:g}s") from error
        log.debug("database busy, retrying in %.3fs", backoff)
        self._backoff = min(backoff * 2, _MAX_BACKOFF)
        return backoff


class JournalTaken(Exception):
    """A flush found fewer of its journal rows than it folded: another process, taking
    this one for dead, replayed some. Nothing of the flush is committed."""

    def __init__(self, owner: str) -> None:
        super().__init__(
            f"another process replayed journal rows of {owner} (this writer, its lease "
            "lost for a while): the head is rebuilt from what is left and flushed again"
        )


@dataclass
class Appended:
    """What a journalled batch did: duplicates per submission, and the events counted."""

    duplicates: list[int]
    events: int


def journal_batch(
    conn: Any,
    backend: Backend,
    batch: Sequence[Sequence[Point]],
    policy: WritePolicy,
    owner: str,
    head: Head,
) -> Appended:
    """Append ``batch`` (a list of submissions) to the journal in one transaction, then
    fold its rollups into ``head``.

    Ids already recorded within the dedup window, and repeats inside the batch, are
    duplicates and not counted; new ids are recorded in this same transaction, so a
    failed commit forgets them too. The events that count are one journal row of
    ``owner``'s; once it is committed they are durable, and their rollups join the
    head (a failure there is contained: see :attr:`Head.stale`)."""
    now = time.time()
    ids = batch_ids(batch)
    kept, duplicates = new_events(batch, None) if not ids else ([], [])
    # Without ids nothing depends on the database: the blob is made before the write
    # lock is taken, so another process's commit to the same file runs meanwhile.
    blob = encode_batch(kept) if kept else b""
    backend.begin(conn)
    try:
        if ids:
            claimed = backend.claim_ids(conn, ids, now, now - policy.dedup_window)
            kept, duplicates = new_events(batch, claimed)
            blob = encode_batch(kept) if kept else b""
        seq = backend.append_journal(conn, owner, len(kept), blob) if kept else None
        backend.commit(conn)
    except BaseException:
        backend.rollback(conn)
        raise
    if seq is not None:
        try:
            head.add(kept, seq, policy.bucket, policy.keeps_quantiles)
        except Exception:
            # The events are durable in the journal: the next flush rebuilds the head
            # from it instead of flushing a head that misses them.
            log.exception("folding a journalled batch into the head failed; rebuilding it")
            head.stale = True
    return Appended(duplicates, len(kept))


def fold_events(events: Iterable[JournalEvent | Point], policy: WritePolicy) -> dict[Slot, Rollup]:
    """The rollups of ``events``, one per slot."""
    rollups: dict[Slot, Rollup] = {}
    pre_aggregate(events, policy.bucket, rollups, policy.keeps_quantiles)
    return rollups


def _write_rows(conn: Any, backend: RollupBackend, plan: Plan, table: str = "rollups") -> None:
    """Inside a transaction: upsert the rows of ``plan`` into ``table`` and widen the
    keys index. Rows with sketches are inserted whole where their slot is new, else
    merged with the stored sketches, read under a row lock."""
    rows = plan.plain
    if plan.sketched:
        inserted = backend.insert_new(conn, sketch_rows(plan.sketched), table)
        existing = [slot for slot in plan.sketched if slot not in inserted]
        stored = backend.stored_sketches(conn, existing, table)
        rows = [*rows, *merged_rows(plan.sketched, existing, stored)]
    backend.upsert(conn, rows, table)
    if plan.spans:
        backend.upsert_series(conn, plan.spans)


def _write_tiered(
    conn: Any,
    backend: RollupBackend,
    rollups: dict[Slot, Rollup],
    policy: WritePolicy,
    series_seen: SeriesCache,
) -> Plan:
    """Inside a transaction: plan and write ``rollups`` (of the finest tier's buckets),
    each into the tier that holds its bucket (see :mod:`trioagg.core.tiers`), as
    :func:`_write_rows_apart` does. Without tiers, all go to ``rollups``."""
    tiers = policy.tiers
    if tiers is None:
        plan = plan_rows(rollups, series_seen)
        plan.refused = _write_rows_apart(conn, backend, plan)
        return plan
    # Read under a shared lock: no roll moves a tier's rows until this commits.
    by_tier = split_by_tier(rollups, tiers, backend.read_rolled(conn, exclusive=False))
    if by_tier.keys() <= {0}:  # no late event: every row is the finest tier's, planned once
        plan = plan_rows(rollups, series_seen)
        plan.refused = _write_rows_apart(conn, backend, plan)
        return plan
    every = {slot: rollup for part in by_tier.values() for slot, rollup in part.items()}
    plan = plan_rows(every, series_seen)  # the series spans and what the flush touched
    for index, part in sorted(by_tier.items()):
        tier_plan = plan_rows(part, series_seen)
        tier_plan.spans = []
        plan.refused += _write_rows_apart(conn, backend, tier_plan, tiers.table(index))
    if plan.spans:
        backend.upsert_series(conn, plan.spans)
    return plan


def split_by_tier(
    rollups: dict[Slot, Rollup], tiers: Tiers, rolled: Sequence[int]
) -> dict[int, dict[Slot, Rollup]]:
    """``rollups`` by the tier that holds their bucket, merged into its wider buckets
    (copies: the rollups given stay as they are, for a flush tried again)."""
    by_tier: dict[int, dict[Slot, Rollup]] = {}
    for slot, rollup in rollups.items():
        key, bucket, tags = slot
        index = route(bucket, rolled)
        part = by_tier.setdefault(index, {})
        if index == 0:
            part[slot] = rollup
            continue
        wide = (key, tiers.floor(index, bucket), tags)
        merged = part.get(wide)
        if merged is None:
            part[wide] = copy_rollup(rollup, sketches=True)
        else:
            merged.merge(rollup)
    return by_tier


def _write_rows_apart(
    conn: Any, backend: RollupBackend, plan: Plan, table: str = "rollups"
) -> list[UpsertRow]:
    """:func:`_write_rows`, but a row the database refuses (a stored row that cannot
    take a merge: an old one whose moments overflow) is set aside in
    ``refused_rollups`` instead of failing the others. Returns the refused rows."""
    backend.savepoint(conn)
    try:
        _write_rows(conn, backend, plan, table)
    except Exception as error:
        if not _tied_to_data(backend, error):
            raise
        backend.rollback_to_savepoint(conn)
    else:
        backend.release_savepoint(conn)
        return []
    refused: list[UpsertRow] = []
    singles = [Plan([row], {}, [], {}) for row in plan.plain]
    singles += [Plan([], {slot: rollup}, [], {}) for slot, rollup in plan.sketched.items()]
    for single in singles:
        backend.savepoint(conn)
        try:
            _write_rows(conn, backend, single, table)
        except Exception as error:
            if not _tied_to_data(backend, error):
                raise
            backend.rollback_to_savepoint(conn)
            row = single.plain[0] if single.plain else sketch_rows(single.sketched)[0]
            log.error("the rollups table refused a row of %r, set aside: %s", row[0], error)
            refused.append(row)
        else:
            backend.release_savepoint(conn)
    if plan.spans:
        backend.upsert_series(conn, plan.spans)
    backend.set_aside(conn, refused, time.time())
    return refused


def _tied_to_data(backend: RollupBackend, error: Exception) -> bool:
    """Whether ``error`` belongs to the rows written, not to the store's state now."""
    return not (
        isinstance(error, TrioaggError)
        or backend.is_busy(error)
        or backend.is_disconnect(error)
        or backend.outage_reason(error) is not None
    )


def flush_head(
    conn: Any,
    backend: Backend,
    head: Head,
    owner: str,
    policy: WritePolicy,
    series_seen: SeriesCache,
    report: bool = False,
) -> Plan | None:
    """Write ``head``'s rows and delete the journal rows they came from, in one
    transaction; then empty the head. None when there was nothing to flush. With
    ``report``, the plan says what was written (:attr:`Plan.flushed`), when it can.

    A head whose batches were partly replayed by another process (:class:`JournalTaken`),
    or that missed a batch (:attr:`Head.stale`), is first rebuilt from what is left of
    ``owner``'s journal. A COMMIT that failed may have committed all the same (a
    connection lost while it ran): the head is then :attr:`Head.uncertain`, and the next
    flush first looks whether its journal rows are still there."""
    if head.uncertain:
        left = backend.count_journal(conn, owner, head.journal[0], head.journal[-1])
        head.uncertain = False
        if left == 0:
            log.info("the last flush did commit (its journal rows are gone)")
            with head.lock:
                head.flushed()
            return None
        with head.lock:
            head.committing = False
        if left != len(head.journal):
            head.stale = True
    if head.stale:
        _rebuild(conn, backend, head, owner, policy)
    if not head.journal:
        return None
    # Planned before the write lock is taken, unless tiers decide where rows go.
    plan = plan_rows(head.rollups, series_seen) if policy.tiers is None else None
    first, last, count = head.journal[0], head.journal[-1], len(head.journal)
    backend.begin(conn)
    try:
        if plan is None:
            plan = _write_tiered(conn, backend, head.rollups, policy, series_seen)
        else:
            plan.refused = _write_rows_apart(conn, backend, plan)
        if backend.delete_journal(conn, owner, first, last) != count:
            raise JournalTaken(owner)
        with head.lock:
            head.committing = True
        try:
            backend.commit(conn)
        except BaseException:
            # Maybe committed: reads stay "committing" (and wait) until it is known.
            head.uncertain = True
            raise
        flushed = head.by_key
        with head.lock:
            head.flushed()
    except BaseException as failure:
        if not head.uncertain:
            with head.lock:
                head.committing = False
        backend.rollback(conn)
        if isinstance(failure, JournalTaken):
            log.warning("another process replayed part of this writer's journal; rebuilding")
            head.stale = True
        raise
    series_seen.remember(plan.spans)
    if report and policy.tiers is None and not plan.refused:
        plan.flushed = Flushed(flushed, key_sizes(flushed))
    return plan


def _rebuild(
    conn: Any, backend: RollupBackend, head: Head, owner: str, policy: WritePolicy
) -> None:
    """Make ``head`` the fold of what ``owner``'s journal holds."""
    rows = backend.read_journal(conn, owner, None, lock=False)
    head.rebuild(
        ((seq, decode_batch(blob)) for seq, _, blob in rows), policy.bucket, policy.keeps_quantiles
    )
    head.stale = False


def replay_journal(
    conn: Any,
    backend: Backend,
    owner: str,
    policy: WritePolicy,
    series_seen: SeriesCache,
    limit: int,
) -> tuple[int, int]:
    """Store up to ``limit`` journal rows of ``owner`` (a process found dead) in one
    transaction, deleting them in it: each row is replayed once, whoever tries. Returns
    the rows and events replayed (0 rows: nothing was left)."""
    backend.begin(conn)
    try:
        rows = backend.read_journal(conn, owner, limit, lock=True)
        if not rows:
            backend.commit(conn)
            return 0, 0
        events: list[JournalEvent] = []
        for _, _, blob in rows:
            events.extend(decode_batch(blob))
        plan = _write_tiered(conn, backend, fold_events(events, policy), policy, series_seen)
        seqs = [seq for seq, _, _ in rows]
        if backend.delete_journal(conn, owner, seqs[0], seqs[-1]) != len(seqs):
            raise JournalTaken(owner)
        backend.commit(conn)
    except BaseException:
        backend.rollback(conn)
        raise
    series_seen.remember(plan.spans)
    return len(rows), len(events)


class TierCut(Exception):
    """A read found a bucket of a coarse tier that an answer bucket would cut in two:
    the tiers hold it wider than the query was told (another process rolled further,
    with other horizons or a clock ahead by more than QUERY_MARGIN). Nothing is
    answered rather than a wide bucket counted as a narrow one."""

    def __init__(self, bucket: int, width: int) -> None:
        super().__init__(f"a {width}s bucket of a coarse tier at {bucket} is cut by the answer")
        self.bucket = bucket
        self.width = width


class RollRaced(Exception):
    """A roll deleted another count of rows than it read and merged: nothing of it is
    committed (it cannot happen while flushes take the marks' lock; a guard)."""


def roll_step(
    conn: Any,
    backend: RollupBackend,
    tiers: Tiers,
    index: int,
    now: float,
    limit: int = ROLL_ROWS,
) -> int | None:
    """In one transaction, move up to ``limit`` rows of the oldest wider bucket of tier
    ``index`` that passed its horizon at ``now`` into the tier that holds it (the next,
    or a coarser one where a roll already went further), merged into that tier's
    wider buckets, and delete them from tier ``index``; once the wider bucket is
    empty, advance the tier's rolled mark past it, in the same transaction. Returns
    the rows moved, or None once tier ``index`` holds nothing past its horizon (its
    mark then moved up to it).

    Until its mark moves, a wider bucket may be partly rolled: some series' rows in
    the coarser tier, the rest (and late events, which the flush still routes to tier
    ``index``) in this one, each event in one of them; the next steps move the rest,
    merging it into the same wider rows. The marks are read under an exclusive lock,
    so that a flush under way (which holds them shared) ends first and a later one
    routes its rows by the new marks; several processes rolling at once take turns,
    and each finds what the others did."""
    backend.begin(conn)
    try:
        rolled = backend.read_rolled(conn, exclusive=True)
        target = tiers.cut(index, now)
        if rolled[index] >= target:
            backend.commit(conn)
            return None
        table = tiers.table(index)
        oldest = backend.oldest_bucket(conn, table, target)
        if oldest is None:
            backend.write_rolled(conn, index, target)
            backend.commit(conn)
            return None
        into = route(oldest, rolled, index + 1)
        end = tiers.after(into, tiers.floor(into, oldest))  # a local day may last 25 hours
        rows = backend.rows_before(conn, table, end, limit)
        merged: dict[Slot, Rollup] = {}
        for key, bucket, tags, rollup in rows:
            wide = (key, tiers.floor(into, bucket), tags)
            known = merged.get(wide)
            if known is None:
                merged[wide] = rollup
            else:
                known.merge(rollup)
        plan = plan_rows(merged, {})
        _write_rows(conn, backend, plan, tiers.table(into))
        last = rows[-1]
        if backend.delete_through(conn, table, end, (last[0], last[1], last[2])) != len(rows):
            raise RollRaced(f"rows of {table} before {end} changed during their roll")
        if len(rows) < limit:  # the wider bucket is empty in this tier now
            backend.write_rolled(conn, index, max(rolled[index], end))
        backend.commit(conn)
    except BaseException:
        backend.rollback(conn)
        raise
    return len(rows)


def drop_step(conn: Any, backend: RollupBackend, tiers: Tiers, now: float, limit: int) -> int:
    """In one transaction, delete up to ``limit`` rows of the last tier that passed the
    store's retention at ``now``; how many went (0 without a retention)."""
    cut = tiers.drop_cut(now)
    if cut is None:
        return 0
    backend.begin(conn)
    try:
        count = backend.delete_before(conn, tiers.table(len(tiers) - 1), cut, limit)
        backend.commit(conn)
    except BaseException:
        backend.rollback(conn)
        raise
    return count


def to_rows(records: Iterable[Sequence[Any]], *, sketches: bool) -> list[Row]:
    """Rows from fetched records: key, bucket, tags, count, shift, s1, s2, min, max,
    last_value, last_ts, and with ``sketches`` the quantiles and distinct blobs."""
    if not sketches:
        return [
            (key, bucket, tags, Rollup(shift, count, s1, s2, low, high, last=last, last_ts=at))
            for key, bucket, tags, count, shift, s1, s2, low, high, last, at in records
        ]
    return [
        (
            key,
            bucket,
            tags,
            Rollup(
                shift,
                count,
                s1,
                s2,
                low,
                high,
                decode_quantiles(kll),
                decode_distinct(hll),
                last=last,
                last_ts=at,
            ),
        )
        for key, bucket, tags, count, shift, s1, s2, low, high, last, at, kll, hll in records
    ]


#: The heads' rows of a read, their generations and the keys' versions then.
Overlay = tuple[list[Row], tuple[int, ...], tuple[int, ...]]


@dataclass
class ReadParts:
    """A read: the table's rows and the heads' (copies), and the heads' generations and
    versions of the keys read when the overlay was taken."""

    stored: list[Row]
    overlay: list[Row]
    generations: tuple[int, ...]
    versions: tuple[int, ...]


def _of_tenant(rows: list[Row], tenant: str | None) -> list[Row]:
    """The rows of series tagged ``tenant=<tenant>`` (all of them for None)."""
    if tenant is None:
        return rows
    return [row for row in rows if tags_hold_tenant(row[2], tenant)]


class Link:
    """One connection of a store: opened on first use, and again after it broke.

    Used from one worker thread at a time. When an operation fails because the
    connection is gone (the database restarted), the link forgets it, so the
    next operation connects afresh: the service recovers by itself. A connection
    to a database server (``backend.can_disconnect``) left idle for
    :data:`IDLE_CHECK_SECONDS` is pinged before it is used again, so
    that the first request after a database restart during a quiet spell finds a
    new connection instead of failing on the dead one.

    Where the backend gives operations a :attr:`deadline`, a trio task calls
    :meth:`interrupt` when it passes (see :meth:`Store._in_thread`): a thread
    blocked in a socket read cannot be cancelled, so its connection's socket is
    shut, the operation fails as a :class:`StoreOutage` naming the deadline, and
    the connection is closed (one whose server stopped answering cannot be trusted).
    """

    def __init__(self, backend: Backend, *, write: bool, shard: int = 0) -> None:
        self.backend = backend
        self.write = write
        self.shard = shard
        self.deadline = backend.deadline(write=write)
        self.conn: Any = None
        self.used_at = 0.0
        # Between the operation's thread and the trio task enforcing its deadline: the
        # connection is never closed while interrupt() shuts its socket.
        self._guard = threading.Lock()
        self._armed = False
        self._interrupted = False

    def arm(self) -> None:
        """Before an operation is started in its thread: :meth:`interrupt` may end it."""
        with self._guard:
            self._armed = True

    def interrupt(self) -> None:
        """From the trio thread, once the armed operation's deadline has passed."""
        with self._guard:
            if not self._armed:
                return  # it has just ended
            self._interrupted = True
            if self.conn is not None:
                self.backend.interrupt(self.conn)

    def run(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            if (
                self.conn is not None
                and self.backend.can_disconnect
                and time.monotonic() - self.used_at >= IDLE_CHECK_SECONDS
            ):
                try:
                    self.backend.ping(self.conn)
                except Exception as error:
                    log.debug("an idle connection failed its ping, connecting afresh: %s", error)
                    self.close()  # the ping carries no data: whatever failed, start afresh
            if self.conn is None and not self._interrupted:
                conn = self.backend.connect(write=self.write, shard=self.shard)
                with self._guard:
                    self.conn = conn
            if self._interrupted:  # while connecting, which has no socket to shut yet
                raise TimeoutError("the deadline passed before the operation began")
            return operation(self.conn, *args, **kwargs)
        except Exception as error:
            if self._interrupted:
                raise StoreOutage(
                    f"the database server did not answer within {self.deadline:g}s"
                ) from error
            if self.backend.is_disconnect(error):
                self.close()
            raise
        finally:
            with self._guard:
                interrupted, self._interrupted, self._armed = self._interrupted, False, False
            if interrupted:  # even if the operation ended well: its socket is shut
                self.close()
            self.used_at = time.monotonic()

    def close(self) -> None:
        with self._guard:
            conn, self.conn = self.conn, None
        if conn is not None:
            try:
                self.backend.close(conn)
            except Exception as error:  # a broken connection may fail to close
                log.debug("closing a connection failed: %s", error)


async def _interrupt_at(link: Link, deadline: float, scope: trio.CancelScope) -> None:
    with scope:
        await trio.sleep_until(deadline)
        link.interrupt()


class Store:
    """A backend's connections, used from trio. Create it with :meth:`open`.

    ``writers`` write connections, each behind a capacity limiter of its own
    (writer ``i`` of :class:`~trioagg.ingest.writer.Writers` uses connection ``i``, to the
    backend's shard ``i`` where it has several), and a fixed pool of read
    connections, each reading every shard.
    """

    def __init__(
        self,
        backend: Backend,
        policy: WritePolicy,
        *,
        writers: int,
        readers: int,
        busy_timeout: float,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.bucket = policy.bucket
        self.busy_timeout = busy_timeout
        self.readers = readers
        self._write_links = [Link(backend, write=True, shard=shard) for shard in range(writers)]
        self._write_limiters = [trio.CapacityLimiter(1) for _ in range(writers)]
        # A thread per connection: an operation's thread starts as soon as it has its
        # connection, and its deadline counts from then.
        self._threads = trio.CapacityLimiter(writers + readers + 1)
        self._read_links = [Link(backend, write=False) for _ in range(readers)]
        #: A read connection of its own for :meth:`change_stamp` (whose stamps compare
        #: only with those of the same connection).
        self._stamp_link = Link(backend, write=False)
        self._stamping = trio.Lock()
        self._idle_send, self._idle_receive = trio.open_memory_channel[Link](readers)
        for link in self._read_links:
            self._idle_send.send_nowait(link)
        self._series_seen = [SeriesCache() for _ in range(writers)]
        #: Each writer's unflushed rollups (see :mod:`~trioagg.store.head`).
        self.heads = [Head() for _ in range(writers)]
        #: Where each tier but the last ends, as far as this process knows (it rolled
        #: there, or read it at start): queries take tiers to hold data before it.
        self.rolled = [0] * (len(policy.tiers) - 1 if policy.tiers is not None else 0)
        #: Who this process is in the journal: one owner per writer.
        process = uuid.uuid4().hex
        self.owners = [f"{process}/{shard}" for shard in range(writers)]

    @classmethod
    async def open(
        cls,
        backend: Backend,
        *,
        policy: WritePolicy,
        writers: int = 1,
        readers: int,
        busy_timeout: float,
    ) -> Store:
        """Connect, create or check the schema; connections open as they are used (the
        read connections of a store of several shard files at once)."""
        store = cls(backend, policy, writers=writers, readers=readers, busy_timeout=busy_timeout)
        try:
            # Processes starting together on a fresh store take turns on its lock.
            await store._retry_busy(0, backend.prepare, policy.bucket)
        except BaseException as error:
            # Refused (another store's settings) or failed: its connection goes too.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store._write_links[0].close)
            if isinstance(error, StoreError):
                cause = error.__cause__ or error
                raise StoreCannotOpen(backend.description, cause) from error
            raise
        if policy.tiers is not None:
            # Where the tiers end now: a horizon lengthened since may lag behind them.
            for shard in range(backend.shards):
                await store._read_rolled(shard)
        try:  # before any batch is journalled
            await trio.to_thread.run_sync(backend.hold_leases, store.owners)
        except OSError as error:
            raise StoreCannotOpen(backend.description, error) from error
        if backend.shards > 1:
            # A read connection attaches every shard file when it opens: opened after a
            # shard file was lost, it could not open, and the API keys of the main file
            # could no longer be looked up. So they all open now, while every file is here.
            def open_reads() -> None:
                for link in store._read_links:
                    link.run(backend.ping)

            try:
                await trio.to_thread.run_sync(open_reads)
            except Exception as error:
                raise StoreCannotOpen(backend.description, error) from error
        return store

    @staticmethod
    async def exists(backend: Backend) -> bool:
        """Whether ``backend`` holds a store, creating nothing (:meth:`Backend.exists`);
        ConfigError, worded as :meth:`open` words it, when that cannot be told."""
        try:
            return await trio.to_thread.run_sync(backend.exists)
        except Exception as error:
            raise StoreCannotOpen(backend.description, error) from error

    async def append(self, batch: Sequence[Sequence[Point]], shard: int = 0) -> Appended:
        """Journal a batch of submissions in one transaction and fold it into writer
        ``shard``'s head (see :func:`journal_batch`), retrying while the database is busy.

        Raises :class:`StoreBusy` after ``busy_timeout`` of retries,
        :class:`StoreOutage` when the store cannot commit anything now (unreachable,
        full, read-only, its file gone), and :class:`StoreError` for a failure tied
        to the batch's data; in every case nothing was stored. Cancellation while the
        transaction runs waits for it to finish (by its deadline, where it has one).
        """
        return await self._retry_busy(
            shard,
            journal_batch,
            self.backend,
            batch,
            self.policy,
            self.owners[shard],
            self.heads[shard],
        )

    async def flush(self, shard: int = 0, *, report: bool = False) -> Plan | None:
        """Write writer ``shard``'s head to the table, deleting its journal rows in the
        same transaction (see :func:`flush_head`); None when there was nothing to write.
        ``report``: say what was written, for a read cache to follow (sizing it walks the
        flushed rows in the flush's thread). Raises as :meth:`append` does; the head is
        then kept, to be flushed again."""
        head = self.heads[shard]
        if not head.journal and not head.stale and not head.uncertain:
            return None
        return await self._retry_busy(
            shard,
            flush_head,
            self.backend,
            head,
            self.owners[shard],
            self.policy,
            self._series_seen[shard],
            report,
        )

    async def replay_dead(self, shard: int = 0) -> tuple[int, int]:
        """Replay the journal rows other processes left in writer ``shard``'s database
        and died with (their lease is free), a short transaction per
        :data:`REPLAY_ROWS` rows. Returns the rows and events replayed."""
        backend = self.backend
        ours = set(self.owners)
        owners = await self._retry_busy(shard, backend.journal_owners)
        replayed = (0, 0)
        for owner in owners:
            # Where writers share one database, writer i replays the writers i of others.
            if owner in ours or int(owner.rpartition("/")[2]) % len(self.heads) != shard:
                continue
            if not await self._retry_busy(shard, backend.take_lease, owner):
                continue  # alive
            emptied = False
            try:
                while True:
                    rows, events = await self._retry_busy(
                        shard,
                        replay_journal,
                        backend,
                        owner,
                        self.policy,
                        self._series_seen[shard],
                        REPLAY_ROWS,
                    )
                    if not rows:
                        emptied = True
                        break
                    replayed = (replayed[0] + rows, replayed[1] + events)
            finally:
                with trio.CancelScope(shield=True):
                    await self._retry_busy(shard, backend.drop_lease, owner, emptied)
        return replayed

    def end_leases(self) -> None:
        """Every head is flushed: this process's journal is empty, its leases can go."""
        if not any(head.journal or head.stale or head.uncertain for head in self.heads):
            self.backend.end_leases()

    async def purge_expired_ids(self) -> int:
        """Forget ids older than the dedup window in every shard, a short transaction
        per chunk so the writers' commits interleave. Returns how many were forgotten;
        a shard that fails raises its error once the others are purged."""
        before = time.time() - self.policy.dedup_window
        purged = 0
        failed: StoreError | None = None
        for shard in range(self.backend.shards):
            try:
                purged += await self._purge_shard(shard, before)
            except StoreError as failure:
                # One shard's outage must not keep every later shard's ids for ever.
                failed = failed or failure
        if failed is not None:
            raise failed
        return purged

    async def _purge_shard(self, shard: int, before: float) -> int:
        purged = 0
        while True:
            count: int = await self._retry_busy(
                shard, self._transaction, self.backend.purge_ids, before, _PURGE_CHUNK
            )
            purged += count
            if count < _PURGE_CHUNK:
                return purged
            await trio.sleep(0)

    async def _read_rolled(self, shard: int) -> None:
        """Take in shard ``shard``'s rolled marks, in a short transaction of its own."""
        read = functools.partial(self.backend.read_rolled, exclusive=False)
        marks = await self._retry_busy(shard, self._transaction, read)
        self.rolled = [max(pair) for pair in zip(self.rolled, marks, strict=True)]

    def tiers_held(self, now: float) -> tuple[tuple[int, int], ...]:
        """For a query at ``now``: (since, tier) of each coarse tier, which may hold
        buckets before ``since`` (see :func:`trioagg.core.tiers.holding`); () without tiers.
        A roll that starts while the query runs, or in another process whose clock is
        a little ahead, has not gone past ``since``: see :data:`QUERY_MARGIN`."""
        tiers = self.policy.tiers
        if tiers is None:
            return ()
        return tuple(holding(tiers, self.rolled, now + QUERY_MARGIN))

    async def roll_tiers(
        self, now: float | None = None, *, rows: int = ROLL_ROWS
    ) -> tuple[int, int]:
        """Roll every tier's buckets that passed its horizon at ``now`` (by default the
        wall clock) into the next tier, in every shard, a short transaction per ``rows``
        rows (see :func:`roll_step`), so the writers' commits interleave; then drop
        what passed the retention. Returns the rows rolled and dropped; a shard that
        fails raises its error once the others are done."""
        tiers = self.policy.tiers
        if tiers is None:
            return 0, 0
        at = time.time() if now is None else now
        rolled = dropped = 0
        failed: StoreError | None = None
        for shard in range(self.backend.shards):
            try:
                for index in range(len(tiers) - 1):
                    while True:
                        moved = await self._retry_busy(
                            shard, roll_step, self.backend, tiers, index, at, rows
                        )
                        if moved is None:
                            break
                        rolled += moved
                        await trio.sleep(0)
                # Where the tiers end now, which another process may have taken further.
                await self._read_rolled(shard)
                while True:
                    count = await self._retry_busy(
                        shard, drop_step, self.backend, tiers, at, _PURGE_CHUNK
                    )
                    dropped += count
                    if count < _PURGE_CHUNK:
                        break
                    await trio.sleep(0)
            except StoreError as failure:
                failed = failed or failure
        if failed is not None:
            raise failed
        return rolled, dropped

    def _transaction(self, conn: Any, operation: Callable[..., T], *args: Any) -> T:
        """``operation(conn, *args)`` in a transaction of its own."""
        self.backend.begin(conn)
        try:
            result = operation(conn, *args)
            self.backend.commit(conn)
        except BaseException:
            self.backend.rollback(conn)
            raise
        return result

    async def read_parts(
        self,
        keys: Sequence[str],
        start: int,
        end: int,
        *,
        sketches: bool = False,
        limit: int | None = None,
        tenant: str | None = None,
        fits: Callable[[int, int], bool] | None = None,
    ) -> ReadParts:
        """Rows of ``keys`` in ``[start, end)`` (at most ``limit``; with ``tenant`` only
        those of series tagged with it), read on a connection of the read pool: the
        table's, and apart from them the heads' of this process (so a read after an
        acknowledged write sees it), with the heads' state they were read at (see
        :meth:`overlay`). Rows of one slot may come from both: merging them is the
        reader's. With tiers, ``fits`` checks the rows of coarse tiers (see
        :meth:`Backend.fetch`): :class:`TierCut` when one does not fit."""
        return await self._run_read(
            self._fetch_with_heads,
            keys,
            start,
            end,
            sketches=sketches,
            limit=limit,
            tenant=tenant,
            fits=fits,
        )

    def _fetch_with_heads(
        self,
        conn: Any,
        keys: Sequence[str],
        start: int,
        end: int,
        *,
        sketches: bool,
        limit: int | None,
        tenant: str | None,
        fits: Callable[[int, int], bool] | None = None,
    ) -> ReadParts:
        """In a read thread: the table's rows and the heads' overlay, read again when a
        flush committed meanwhile (the table may then hold rows the overlay holds too)."""
        delay = 0.001
        for _ in range(_READ_TRIES):
            marks = [head.mark() for head in self.heads]
            rows = self.backend.fetch(
                conn, keys, start, end, sketches=sketches, limit=limit, tenant=tenant, fits=fits
            )
            _, found = self._collect(keys, start, end, sketches, tenant, marks, blocking=True)
            if found is not None:
                return ReadParts(rows, *found)
            time.sleep(delay)  # a flush is committing: it ends within milliseconds
            delay = min(delay * 2, 0.05)
        raise StoreBusy(f"flushes kept committing during {_READ_TRIES} tries of a read")

    def generations(self) -> tuple[int, ...]:
        """The flushes each head committed: while they are the same, the table holds
        nothing more of this process's than when they were read."""
        return tuple(head.generation for head in self.heads)

    def versions(self, keys: Sequence[str]) -> tuple[int, ...]:
        """The heads' versions of ``keys``: while they are the same, the heads hold the
        same rollups of them (safe on the event loop, without the heads' locks)."""
        return tuple(version for head in self.heads for version in head.key_versions(keys))

    async def overlay(
        self, keys: Sequence[str], start: int, end: int, *, sketches: bool, tenant: str | None
    ) -> Overlay | None:
        """The heads' rollups of ``keys`` in ``[start, end)`` (copies), with the heads'
        generations and the keys' versions then; None while a flush commits (the table
        may or may not hold its rows yet). On the event loop where no head is being
        folded into, else in a worker thread (a fold holds a head for milliseconds)."""
        done, found = self._collect(keys, start, end, sketches, tenant, None, blocking=False)
        if not done:
            done, found = await trio.to_thread.run_sync(
                functools.partial(
                    self._collect, keys, start, end, sketches, tenant, None, blocking=True
                )
            )
        return found

    def _collect(
        self,
        keys: Sequence[str],
        start: int,
        end: int,
        sketches: bool,
        tenant: str | None,
        marks: Sequence[Mark] | None,
        *,
        blocking: bool,
    ) -> tuple[bool, Overlay | None]:
        """(whether every head's lock was taken, the overlay then): None when a flush
        committed since ``marks`` (or, without marks, is committing now)."""
        taken: list[Head] = []
        try:
            for head in self.heads:
                if not head.lock.acquire(blocking=blocking):
                    return False, None
                taken.append(head)
            if marks is None:
                current = not any(head.committing for head in self.heads)
            else:
                current = all(h.unchanged_since(m) for h, m in zip(self.heads, marks, strict=True))
            if not current:
                return True, None
            rows = [
                row
                for head in self.heads
                for row in head.overlay(keys, start, end, sketches=sketches)
            ]
            return True, (_of_tenant(rows, tenant), self.generations(), self.versions(keys))
        finally:
            for head in taken:
                head.lock.release()

    async def list_keys(
        self, prefix: str, after: str, limit: int, tenant: str | None = None
    ) -> list[KeyInfo]:
        return await self._run_read(self.backend.list_keys, prefix, after, limit, tenant)

    async def top(
        self, start: int, end: int, stat: str, prefix: str, limit: int, tenant: str | None = None
    ) -> list[tuple[str, float]]:
        return await self._run_read(self.backend.top, start, end, stat, prefix, limit, tenant)

    async def find_api_key(self, digest: str) -> tuple[Any, ...] | None:
        """The API key row with this digest, from the read pool (never the writer's thread)."""
        return await self._run_read(self.backend.find_api_key, digest, main_only=True)

    async def any_api_key(self) -> bool:
        return await self._run_read(self.backend.any_api_key, main_only=True)

    async def touch_api_keys(self, used: Sequence[tuple[float, str]]) -> None:
        """Record when keys were last used, in one short transaction of writer 0."""
        await self._retry_busy(0, self._transaction, self.backend.touch_api_keys, used)

    async def change_stamp(self) -> Hashable | None:
        """The backend's :meth:`~Backend.change_stamp`, on a connection kept for it (made
        at the first look); None, at once, where the backend cannot tell. A file deleted
        or replaced under the store fails it, as it fails a read."""
        backend, link = self.backend, self._stamp_link
        if not backend.tells_changes:
            return None

        def look(conn: Any) -> Hashable:
            backend.check_readable()
            return backend.change_stamp(conn)

        async with self._stamping:
            return await self._in_thread(link, lambda: link.run(look))

    async def ping(self) -> None:
        """Raise if the database cannot be reached from a read connection. Where reads
        have a deadline, it bounds the whole ping, waiting for an idle connection (whose
        operations are bounded by theirs) included, so /readyz answers in time."""
        seconds = self._read_links[0].deadline
        if seconds is None:
            await self._run_read(self.backend.ping)
            return
        deadline = trio.current_time() + seconds
        with trio.move_on_at(deadline) as waiting:
            link = await self._idle_receive.receive()
        if waiting.cancelled_caught:
            raise StoreOutage(f"every read connection stayed busy for {seconds:g}s")
        await self._read(link, deadline, self.backend.ping)

    async def aclose(self) -> None:
        """Close every connection, once no thread uses it: this takes every write
        limiter and every read connection first, so a commit or read under way ends
        before its connection closes."""
        for limiter in self._write_limiters:
            await limiter.acquire()
        for _ in self._read_links:
            await self._idle_receive.receive()
        await self._stamping.acquire()

        def close_all() -> None:
            for link in [*self._write_links, *self._read_links, self._stamp_link]:
                link.close()
            self.end_leases()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close_all)

    async def _retry_busy(self, shard: int, operation: Callable[..., T], *args: Any) -> T:
        link = self._write_links[shard]
        retry = BusyRetry(self.backend, self.busy_timeout, trio.current_time())
        while True:
            try:
                async with self._write_limiters[shard]:
                    return await self._in_thread(link, lambda: link.run(operation, *args))
            except TrioaggError:
                raise
            except Exception as error:
                wait = retry.wait(error, trio.current_time())
                if wait is None:
                    raise self._failure(error) from error
                await trio.sleep(wait)

    def _failure(self, error: Exception) -> StoreError:
        """``error`` as a :class:`StoreOutage` when the store cannot work now, else as a
        :class:`StoreError` tied to the transaction's data."""
        reason = self.backend.outage_reason(error)
        if reason is not None:
            return StoreOutage(reason)
        return StoreError(f"the transaction failed: {error}")

    async def _in_thread(
        self, link: Link, call: Callable[[], T], deadline: float | None = None
    ) -> T:
        """``call()``, an operation on ``link``, in a worker thread. Where the link has a
        deadline, a task interrupts it then (at ``deadline``, else the link's deadline
        from now): the thread returns soon after, and the call is never abandoned.
        Cancelling the caller does not cancel the deadline: a shutdown waits for the
        thread, which returns by then."""
        if link.deadline is None:
            return await trio.to_thread.run_sync(call, limiter=self._threads)
        if deadline is None:
            deadline = trio.current_time() + link.deadline
        watch = trio.CancelScope(shield=True)
        link.arm()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_interrupt_at, link, deadline, watch)
            try:
                # Captured, so that its error leaves the nursery as itself, not in a group.
                done = await trio.to_thread.run_sync(outcome.capture, call, limiter=self._threads)
            finally:
                watch.cancel()
        return done.unwrap()

    async def _run_read(
        self, operation: Callable[..., T], *args: Any, main_only: bool = False, **kwargs: Any
    ) -> T:
        """``operation(conn, *args, **kwargs)`` on an idle read connection. ``main_only``:
        it reads only the main file (API keys), so a lost shard file does not fail it."""
        link = await self._idle_receive.receive()
        return await self._read(link, None, operation, *args, main_only=main_only, **kwargs)

    async def _read(
        self,
        link: Link,
        deadline: float | None,
        operation: Callable[..., T],
        *args: Any,
        main_only: bool = False,
        **kwargs: Any,
    ) -> T:
        """:meth:`_run_read` on ``link``, taken from the idle ones; gives it back."""

        def read() -> T:
            self.backend.check_readable(main_only=main_only)
            return link.run(operation, *args, **kwargs)

        try:
            return await self._in_thread(link, read, deadline)
        except Exception as error:
            reason = self.backend.outage_reason(error)
            if reason is None and self.backend.is_busy(error):
                reason = "the database is locked by another writer"
            if reason is None:
                raise
            raise StoreOutage(reason) from error
        finally:
            self._idle_send.send_nowait(link)
