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

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import outcome
import trio

from ..errors import StoreBusy, StoreCannotOpen, StoreError, StoreOutage, TrioaggError
from ..ingest import Point
from ..rollup import Rollup, Slot, decode_distinct, decode_quantiles
from .plan import (
    SeriesCache,
    SeriesSpan,
    StoredSketches,
    UpsertRow,
    WritePolicy,
    batch_ids,
    merged_rows,
    plan_batch,
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


class Backend(Protocol):
    """Blocking, dialect-specific operations; every method runs in a worker thread."""

    description: str
    #: Databases the writers' hours are spread over: 1 where every writer shares one
    #: (PostgreSQL), else one per writer, writer ``i`` writing only in shard ``i``.
    shards: int
    #: Whether a connection can be lost under the service (a server's, not a file's).
    can_disconnect: bool

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

    def insert_new(self, conn: Any, rows: Sequence[UpsertRow]) -> set[Slot]:
        """Insert the rows whose slot is not stored yet; return their slots."""

    def stored_sketches(self, conn: Any, slots: Sequence[Slot]) -> dict[Slot, StoredSketches]:
        """The stored (quantiles, distinct) blobs of ``slots``, locked until the commit."""

    def upsert(self, conn: Any, rows: Iterable[UpsertRow]) -> None:
        """Merge rollups into stored rows; sketch blobs replace stored ones unless None."""

    def upsert_series(self, conn: Any, spans: Sequence[SeriesSpan]) -> None:
        """Widen the keys index to cover ``spans``."""

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
    ) -> list[Row]:
        """The rows of ``keys`` whose bucket starts in ``[start, end)``, at most ``limit``;
        with ``tenant``, only rows of series tagged ``tenant=<tenant>`` (so for the
        other two reads)."""

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

    # API keys (trioagg.auth); rows are (name, digest, scopes, tenant, created, expires,
    # revoked, last_used).

    def create_keys_table(self, conn: Any) -> None: ...

    def insert_api_key(self, conn: Any, row: Sequence[Any]) -> bool: ...

    def find_api_key(self, conn: Any, digest: str) -> tuple[Any, ...] | None: ...

    def list_api_keys(self, conn: Any) -> list[tuple[Any, ...]]: ...

    def any_api_key(self, conn: Any) -> bool: ...

    def revoke_api_key(self, conn: Any, name: str, now: float) -> bool: ...

    def touch_api_keys(self, conn: Any, used: Sequence[tuple[float, str]]) -> None: ...

    def ping(self, conn: Any) -> None:
        """Raise if the database cannot be reached."""

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


class BusyRetry:
    """When to try an operation again while another writer holds the database's lock:
    after waits doubling from 10 ms to 1 s, for at most ``timeout`` seconds in all.
    The one policy of :class:`Store` (which waits with ``trio.sleep``, off its worker
    threads, so that waiting stays cancellable) and of the blocking key commands
    (:func:`trioagg.auth.create_key` and the others, which wait with ``time.sleep``):
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


@dataclass
class CommitResult:
    """What a committed batch did: duplicates per submission, rows upserted, and the
    buckets each key of its events touched (see :attr:`~trioagg.store.plan.Plan.touched`)."""

    duplicates: list[int]
    rows: int
    touched: dict[str, tuple[int, int]]


def commit_batch(
    conn: Any,
    backend: Backend,
    batch: Sequence[Sequence[Point]],
    policy: WritePolicy,
    series_seen: SeriesCache,
) -> CommitResult:
    """One transaction holding every event of ``batch`` (a list of submissions), as
    :mod:`~trioagg.store.plan` plans it.

    Ids already recorded within the dedup window, and repeats inside the batch,
    are duplicates and not counted; new ids are recorded in this same
    transaction, so a failed commit forgets them too. Rows with sketches are
    inserted whole where their slot is new, else merged with the stored sketches,
    read under a row lock. ``series_seen`` caches the keys index; it is updated
    only once the commit succeeded.
    """
    now = time.time()
    ids = batch_ids(batch)
    # Without ids nothing in the plan depends on the database: it is made before the
    # write lock is taken, so that another process's commit to the same file runs
    # meanwhile instead of waiting for this one's pre-aggregation.
    plan = None if ids else plan_batch(batch, None, policy, series_seen)
    backend.begin(conn)
    try:
        if plan is None:
            claimed = backend.claim_ids(conn, ids, now, now - policy.dedup_window)
            plan = plan_batch(batch, claimed, policy, series_seen)
        rows = plan.plain
        if plan.sketched:
            inserted = backend.insert_new(conn, sketch_rows(plan.sketched))
            existing = [slot for slot in plan.sketched if slot not in inserted]
            stored = backend.stored_sketches(conn, existing)
            rows = [*rows, *merged_rows(plan.sketched, existing, stored)]
        backend.upsert(conn, rows)
        if plan.spans:
            backend.upsert_series(conn, plan.spans)
        backend.commit(conn)
    except BaseException:
        backend.rollback(conn)
        raise
    series_seen.remember(plan.spans)
    return CommitResult(plan.duplicates, plan.rows, plan.touched)


def to_rows(records: Iterable[Sequence[Any]], *, sketches: bool) -> list[Row]:
    """Rows from fetched records: key, bucket, tags, count, shift, s1, s2, min, max,
    and with ``sketches`` the quantiles and distinct blobs."""
    if not sketches:
        return [
            (key, bucket, tags, Rollup(shift, count, s1, s2, low, high))
            for key, bucket, tags, count, shift, s1, s2, low, high in records
        ]
    return [
        (
            key,
            bucket,
            tags,
            Rollup(shift, count, s1, s2, low, high, decode_quantiles(kll), decode_distinct(hll)),
        )
        for key, bucket, tags, count, shift, s1, s2, low, high, kll, hll in records
    ]


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
    (writer ``i`` of :class:`~trioagg.writer.Writers` uses connection ``i``, to the
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
        self._threads = trio.CapacityLimiter(writers + readers)
        self._read_links = [Link(backend, write=False) for _ in range(readers)]
        self._idle_send, self._idle_receive = trio.open_memory_channel[Link](readers)
        for link in self._read_links:
            self._idle_send.send_nowait(link)
        self._series_seen = [SeriesCache() for _ in range(writers)]

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
        except StoreError as error:
            cause = error.__cause__ or error
            raise StoreCannotOpen(backend.description, cause) from error
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

    async def write(self, batch: Sequence[Sequence[Point]], shard: int = 0) -> CommitResult:
        """Commit a batch of submissions in one transaction (see :func:`commit_batch`)
        on write connection ``shard``, retrying while the database is busy.

        Raises :class:`StoreBusy` after ``busy_timeout`` of retries,
        :class:`StoreOutage` when the store cannot commit anything now (unreachable,
        full, read-only, its file gone), and :class:`StoreError` for a failure tied
        to the batch's data; in every case nothing was stored. Cancellation while the
        transaction runs waits for it to finish (by its deadline, where it has one).
        """
        return await self._retry_busy(
            shard, commit_batch, self.backend, batch, self.policy, self._series_seen[shard]
        )

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

    async def read(
        self,
        keys: Sequence[str],
        start: int,
        end: int,
        *,
        sketches: bool = False,
        limit: int | None = None,
        tenant: str | None = None,
    ) -> list[Row]:
        """Rows of ``keys`` in ``[start, end)`` (at most ``limit``; with ``tenant`` only
        those of series tagged with it), read on a connection of the read pool."""
        return await self._run_read(
            self.backend.fetch, keys, start, end, sketches=sketches, limit=limit, tenant=tenant
        )

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

        def close_all() -> None:
            for link in [*self._write_links, *self._read_links]:
                link.close()

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
