"""The PostgreSQL store: its schema, connections and transactions.

The statements are shared with SQLite (:mod:`trioagg.store.sql`). Synchronous
psycopg 3 connections run in worker threads of
:class:`~trioagg.store.base.Store`. Several writers (threads, processes or
hosts) can share one database: every statement that takes row locks takes
them in sorted order (ids, then rollup rows, then series), so concurrent
transactions wait for each other but never deadlock, and the UPSERT merges
inside the database, so no update is lost. Key columns use the "C" collation,
so keys sort and page by their bytes, as in SQLite.

Every operation has a deadline (``--store-timeout`` for a read or a ping, twice
that for a write transaction): :class:`~trioagg.store.base.Store` shuts the
socket of an operation still blocked then (:meth:`PostgresBackend.interrupt`),
since a server that is stopped, not down, keeps every connection open and its
kernel acknowledges what is sent, so that no TCP or server timeout ever fires.
Connecting is bounded by ``connect_timeout``, and the server cancels a statement
or a transaction that outlives the deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow

from ..core.tiers import Tiers
from .sql import KEYS_TABLE, LAST_COLUMNS, SQLBackend, check_meta

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rollups (
        key TEXT COLLATE "C" NOT NULL,
        bucket BIGINT NOT NULL,
        tags TEXT COLLATE "C" NOT NULL,
        count BIGINT NOT NULL,
        shift DOUBLE PRECISION NOT NULL,
        s1 DOUBLE PRECISION NOT NULL,
        s2 DOUBLE PRECISION NOT NULL,
        min DOUBLE PRECISION NOT NULL,
        max DOUBLE PRECISION NOT NULL,
        quantiles_kll BYTEA,
        distinct_hll BYTEA,
        last_value DOUBLE PRECISION,
        last_ts DOUBLE PRECISION,
        PRIMARY KEY (key, bucket, tags)
    )""",
    "CREATE INDEX IF NOT EXISTS rollups_by_bucket ON rollups (bucket)",
    """CREATE TABLE IF NOT EXISTS series (
        key TEXT COLLATE "C" NOT NULL,
        tags TEXT COLLATE "C" NOT NULL,
        first_bucket BIGINT NOT NULL,
        last_bucket BIGINT NOT NULL,
        PRIMARY KEY (key, tags)
    )""",
    """CREATE TABLE IF NOT EXISTS event_ids (
        id TEXT COLLATE "C" PRIMARY KEY,
        seen DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS event_ids_by_seen ON event_ids (seen)",
    KEYS_TABLE,
    # Batches committed and not flushed yet (see trioagg.store.head).
    """CREATE TABLE IF NOT EXISTS journal (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        owner TEXT COLLATE "C" NOT NULL,
        events INTEGER NOT NULL,
        batch BYTEA NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS journal_by_owner ON journal (owner, seq)",
    # Rollups the rollups table refused at a flush (a stored row that cannot take a
    # merge), kept rather than lost: the same columns, and when.
    """CREATE TABLE IF NOT EXISTS refused_rollups (
        key TEXT NOT NULL,
        bucket BIGINT NOT NULL,
        tags TEXT NOT NULL,
        count BIGINT NOT NULL,
        shift DOUBLE PRECISION NOT NULL,
        s1 DOUBLE PRECISION NOT NULL,
        s2 DOUBLE PRECISION NOT NULL,
        min DOUBLE PRECISION NOT NULL,
        max DOUBLE PRECISION NOT NULL,
        quantiles_kll BYTEA,
        distinct_hll BYTEA,
        refused_at DOUBLE PRECISION NOT NULL,
        last_value DOUBLE PRECISION,
        last_ts DOUBLE PRECISION
    )""",
]

# Taken while creating the schema, so that processes starting together do not race.
_SCHEMA_LOCK = 0x7472696F616767  # "trioagg"
_LOCK_WAIT_MS = 200
#: A write transaction may take this many times a read's deadline: it runs several
#: statements over up to batch_size events and waits for its WAL flush, and a deadline
#: too short for a slow but working database would fail every retry of the same batch.
WRITE_DEADLINES: Final = 2
#: libpq counts connect_timeout in whole seconds, and at least 2.
_LEAST_CONNECT_SECONDS = 2
#: The server's own timeouts come this long after a connection's deadline (see connect).
_SERVER_GRACE_MS = 1000
#: SQLSTATEs of a connection that is gone: class 08 (connection exception), 57P (the
#: server shutting down, crashed or still starting, the database dropped, or the session
#: closed by idle_session_timeout) and 25P03 (closed by
#: idle_in_transaction_session_timeout). psycopg's own errors of a closed connection
#: carry none. Other OperationalErrors are not disconnects: ProgramLimitExceeded (54000,
#: a row too large for an index) belongs to its data.
_DISCONNECTED: Final = ("08", "57P", "25P03")


class _Connection(psycopg.Connection[TupleRow]):
    """A psycopg connection that another thread can break off (see :meth:`interrupt`)."""

    #: A duplicate of the connection's socket: shutting it down reaches the socket even
    #: once libpq has closed its own descriptor (whose number may then be reused).
    lifeline: socket.socket | None = None
    #: A write connection's writer, whose journal lease it holds (see ``_hold_lease``).
    writer: int | None = None
    leased = False

    def interrupt(self) -> None:
        """Make a call blocked on this connection, in any thread, fail at once."""
        if self.lifeline is not None:
            with contextlib.suppress(OSError):  # already reset by the peer
                self.lifeline.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        super().close()
        if self.lifeline is not None:
            self.lifeline.close()


class PostgresBackend(SQLBackend):
    """PostgreSQL through psycopg 3; ``dsn`` is a ``postgresql://`` URL."""

    mark = "%s"
    least = "LEAST"
    greatest = "GREATEST"
    row_lock = " ORDER BY key, bucket, tags FOR UPDATE"
    row_lock_plain = " FOR UPDATE"
    share_lock = " FOR SHARE"
    ordered_writes = True
    can_disconnect = True
    position = "strpos"

    def __init__(self, dsn: str, *, timeout: float, tiers: Tiers | None = None) -> None:
        """``timeout``: the deadline of a read or a ping, in seconds (``--store-timeout``)."""
        super().__init__(tiers)
        if tiers is not None:
            tables = [(tiers.table(index), tiers.tiers[index].width) for index in range(len(tiers))]
            self.tables = {**self.tables, "rollups": f"({self.union_of_tiers(tables)}) AS r"}
        self.dsn = dsn
        self.timeout = timeout
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self.description = f"postgresql {where}"  # never the password
        self._options = str(info.get("options") or "")
        self.connect_timeout = max(_LEAST_CONNECT_SECONDS, math.ceil(timeout))
        #: The journal owner of each writer of this process, whose lease its write
        #: connection holds.
        self._owners: list[str] = []

    def deadline(self, *, write: bool) -> float:
        return self.timeout * (WRITE_DEADLINES if write else 1)

    def connect(self, *, write: bool, shard: int = 0) -> _Connection:
        # Every writer shares the one database: ``shard`` names a writer, not a place.
        deadline_ms = round(self.deadline(write=write) * 1000)
        # The server's own limits, set at start-up with the DSN's own options (a SET after
        # would be a round trip that could hang before Store knows the connection). They
        # fall a little after the deadline, so that Store's interrupt decides the answer
        # and the server reaps what a client gave up on: a statement still running, or a
        # transaction left open by a client that hangs; it notices a shut socket only
        # when it next reads or writes it.
        reap_ms = deadline_ms + _SERVER_GRACE_MS
        server = {"statement_timeout": reap_ms, "idle_in_transaction_session_timeout": reap_ms}
        if write:
            # A lock held elsewhere fails fast (LockNotAvailable, "busy"), so that waiting
            # happens in Store's cancellable backoff loop and busy_timeout bounds it.
            server["lock_timeout"] = _LOCK_WAIT_MS
        options = " ".join([self._options, *(f"-c {k}={v}ms" for k, v in server.items())])
        conn = _Connection.connect(
            self.dsn,
            autocommit=True,
            options=options.strip(),
            connect_timeout=self.connect_timeout,
            # The kernel gives up on a peer that stops acknowledging (a host or a network
            # gone, not a stopped server, whose kernel acknowledges), and probes idle
            # connections, so that the next use of one to a dead host fails at once.
            tcp_user_timeout=deadline_ms,
            keepalives=1,
            keepalives_idle=math.ceil(self.deadline(write=write)),
            keepalives_interval=1,
            keepalives_count=3,
        )
        try:
            conn.lifeline = socket.socket(fileno=os.dup(conn.fileno()))
            if write:
                conn.writer = shard
                self._hold_lease(conn)
        except BaseException:  # out of file descriptors, or the server went
            conn.close()
            raise
        return conn

    # -- Leases: a session-level advisory lock per journal owner, held shared by the
    # owner's write connection; the server releases it when that session ends, however
    # it ends. A lease lost to a dropped connection while its process lives lets another
    # process replay some of its journal: the flush then finds fewer rows than it folded,
    # and rebuilds its head (trioagg.store.base.flush_head), so nothing counts twice.

    def hold_leases(self, owners: Sequence[str]) -> None:
        self._owners = list(owners)

    def _hold_lease(self, conn: _Connection) -> None:
        """Take the lease of a write connection's writer, once its owner is declared: as
        it connects, or at its first transaction where it connected before (to prepare
        the schema), so that it holds it before it journals anything. Shared, so that
        only a process that finds no session holding it takes it (take_lease)."""
        if conn.leased or conn.writer is None or conn.writer >= len(self._owners):
            return
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (_lease_key(self._owners[conn.writer]),))
        conn.leased = True

    def end_leases(self) -> None:
        pass  # the sessions holding them close with the store

    def take_lease(self, conn: Any, owner: str) -> bool:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_lease_key(owner),)).fetchone()
        return bool(row[0])

    def drop_lease(self, conn: Any, owner: str, replayed: bool) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_lease_key(owner),))

    def interrupt(self, conn: _Connection) -> None:
        conn.interrupt()

    # -- Statements of many rows (upserts, inserts of new rows): psycopg turns each %s of
    # a statement into $1, $2, ..., caching that only for statements under 4 KiB; a
    # flush's of 2,000 rows (26,000 values) took it 120-200 ms of Python each time, the
    # database 40 ms. Numbered already, they are sent as they are (a RawCursor).

    def rows_of_values(self, count: int, width: int) -> str:
        numbers = iter(range(1, count * width + 1))
        rows = (
            "(" + ", ".join(f"${next(numbers)}" for _ in range(width)) + ")" for _ in range(count)
        )
        return ", ".join(rows)

    def execute_rows(self, conn: Any, statement: str, values: Sequence[Any]) -> list[Any]:
        with psycopg.RawCursor(conn) as cursor:
            cursor.execute(statement, values)
            return cursor.fetchall() if cursor.description is not None else []

    def exists(self) -> bool:
        conn = self.connect(write=False)
        try:
            found = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        finally:
            conn.close()
        return bool(found and found[0])

    def prepare(self, conn: psycopg.Connection[Any], bucket: int) -> None:
        self.bucket = bucket
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in [*_SCHEMA, *self._tier_schema()]:
                conn.execute(statement)
            # Tables made before last existed get its columns (NULL: unknown). Looked up
            # first: ALTER TABLE locks the table even when it changes nothing.
            found = conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND column_name = ANY(%s)",
                (list(LAST_COLUMNS),),
            ).fetchall()
            for table in ("rollups", "refused_rollups"):
                for column in LAST_COLUMNS:
                    if (table, column) not in found:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} DOUBLE PRECISION")
            stored = self.read_meta(conn, bucket)
            check_meta(stored, bucket, self.description)
            self.record_tiers(conn, stored, self.description)

    def _tier_schema(self) -> list[str]:
        """The tables of the coarser tiers: rollups' columns, and its index by bucket."""
        if self.tiers is None:
            return []
        rollups, by_bucket = _SCHEMA[1], _SCHEMA[2]
        return [
            statement
            for table in [self.tiers.table(i) for i in range(1, len(self.tiers))]
            for statement in (
                rollups.replace("EXISTS rollups (", f"EXISTS {table} ("),
                by_bucket.replace("rollups_by_bucket ON rollups", f"{table}_by_bucket ON {table}"),
            )
        ]

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        if isinstance(conn, _Connection):  # not one made elsewhere, which has no writer
            self._hold_lease(conn)
        conn.execute("BEGIN")

    def commit(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: psycopg.Connection[Any]) -> None:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")

    def is_busy(self, error: Exception) -> bool:
        busy = pg_errors.DeadlockDetected | pg_errors.SerializationFailure
        return isinstance(error, busy | pg_errors.LockNotAvailable)

    def is_disconnect(self, error: Exception) -> bool:
        if not isinstance(error, psycopg.Error):
            return False
        if error.sqlstate is None:
            return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)
        return error.sqlstate.startswith(_DISCONNECTED)

    def outage_reason(self, error: Exception) -> str | None:
        if isinstance(error, pg_errors.ConnectionTimeout):
            return f"the database server did not accept a connection within {self.connect_timeout}s"
        if isinstance(error, pg_errors.QueryCanceled):  # statement_timeout, or an operator
            return "the database server cancelled a statement (past its deadline, or by hand)"
        if isinstance(error, pg_errors.InsufficientResources):  # disk full, out of memory
            return "the database server is out of disk space or memory"
        if isinstance(error, pg_errors.SystemError):  # class 58: I/O errors, files gone
            return "the database server failed (an I/O or system error)"
        if isinstance(error, pg_errors.ReadOnlySqlTransaction):
            return "the database is read-only (a standby?)"
        if isinstance(error, pg_errors.InsufficientPrivilege):
            return "the database user may not write these tables"
        if self.is_disconnect(error):
            return "the database server cannot be reached"
        return None


def _lease_key(owner: str) -> int:
    """The advisory lock key of a journal owner: 64 bits of a hash of its name."""
    return int.from_bytes(
        hashlib.blake2b(owner.encode(), digest_size=8).digest(), "big", signed=True
    )
