"""The PostgreSQL store: its schema, connections and transactions.

The statements are shared with SQLite (:mod:`trioagg.store.sql`). Synchronous
psycopg 3 connections run in worker threads of
:class:`~trioagg.store.base.Store`. Several writers (threads, processes or
hosts) can share one database: every statement that takes row locks takes
them in sorted order (ids, then rollup rows, then series), so concurrent
transactions wait for each other but never deadlock, and the UPSERT merges
inside the database, so no update is lost. Key columns use the "C" collation,
so keys sort and page by their bytes, as in SQLite.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors

from .sql import KEYS_TABLE, SQLBackend, check_meta

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
]

# Taken while creating the schema, so that processes starting together do not race.
_SCHEMA_LOCK = 0x7472696F616767  # "trioagg"
_CONNECT_TIMEOUT_SECONDS = 5
_LOCK_WAIT_MS = 200
#: SQLSTATEs of a connection that is gone: class 08 (connection exception), and 57P
#: (the server shutting down, crashed or still starting, the database dropped, or the
#: session closed by idle_session_timeout). psycopg's own errors of a closed connection
#: carry none. Other OperationalErrors are not disconnects: ProgramLimitExceeded (54000,
#: a row too large for an index) belongs to its data.
_DISCONNECTED: Final = ("08", "57P")


class PostgresBackend(SQLBackend):
    """PostgreSQL through psycopg 3; ``dsn`` is a ``postgresql://`` URL."""

    mark = "%s"
    least = "LEAST"
    greatest = "GREATEST"
    row_lock = " ORDER BY key, bucket, tags FOR UPDATE"
    ordered_writes = True
    can_disconnect = True
    position = "strpos"

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self.description = f"postgresql {where}"  # never the password

    def connect(self, *, write: bool, shard: int = 0) -> psycopg.Connection[Any]:
        # Every writer shares the one database: ``shard`` names a writer, not a place.
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_SECONDS)
        if write:
            # A lock held elsewhere fails fast (LockNotAvailable, "busy"), so that waiting
            # happens in Store's cancellable backoff loop and busy_timeout bounds it.
            conn.execute(f"SET lock_timeout = '{_LOCK_WAIT_MS}ms'")
        return conn

    def prepare(self, conn: psycopg.Connection[Any], bucket: int) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                conn.execute(statement)
            stored = self.read_meta(conn, bucket)
        check_meta(stored, bucket, self.description)

    def begin(self, conn: psycopg.Connection[Any]) -> None:
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
        if not isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
            return False
        return error.sqlstate is None or error.sqlstate.startswith(_DISCONNECTED)

    def outage_reason(self, error: Exception) -> str | None:
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
