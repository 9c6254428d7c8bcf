"""The embedded SQLite store: its schema, connections and transactions.

The statements are shared with PostgreSQL (:mod:`trioagg.store.sql`). WAL mode
lets readers run beside the writer; ``synchronous`` is FULL by default (a
commit survives power loss) or NORMAL (a process crash only). Several
processes may share one file: SQLite serializes their transactions, and a
locked database is "busy" for :class:`~trioagg.store.base.Store` to retry.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3

from ..errors import ConfigError
from .sql import KEYS_TABLE, SQLBackend, check_meta

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rollups (
        key TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        tags TEXT NOT NULL,
        count INTEGER NOT NULL,
        shift REAL NOT NULL,
        s1 REAL NOT NULL,
        s2 REAL NOT NULL,
        min REAL NOT NULL,
        max REAL NOT NULL,
        quantiles_kll BLOB,
        distinct_hll BLOB,
        PRIMARY KEY (key, bucket, tags)
    ) WITHOUT ROWID""",
    # /v1/top reads a time range across keys without scanning other buckets.
    "CREATE INDEX IF NOT EXISTS rollups_by_bucket ON rollups (bucket)",
    """CREATE TABLE IF NOT EXISTS series (
        key TEXT NOT NULL,
        tags TEXT NOT NULL,
        first_bucket INTEGER NOT NULL,
        last_bucket INTEGER NOT NULL,
        PRIMARY KEY (key, tags)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS event_ids (
        id TEXT PRIMARY KEY,
        seen REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS event_ids_by_seen ON event_ids (seen)",
    KEYS_TABLE,
]

# Short on purpose: waiting on a lock happens in Store.write's backoff loop,
# where it is cancellable, not inside a worker thread.
_LOCK_WAIT_SECONDS = 0.2

# SQLite's primary result codes that mean "no write can succeed now", whatever the data.
_OUTAGES = {
    "SQLITE_FULL": "the disk holding the database is full",
    "SQLITE_READONLY": "the database is read-only",
    "SQLITE_IOERR": "the disk holding the database failed (I/O error)",
    "SQLITE_CANTOPEN": "the database file cannot be opened",
    "SQLITE_CORRUPT": "the database file is corrupt",
    "SQLITE_NOTADB": "the database file is not a SQLite database",
    "SQLITE_PERM": "the database file cannot be written (permissions)",
}


class DatabaseFileGone(Exception):
    """The file this store opened was deleted or replaced while the service ran: commits
    would go to a file nobody will read again."""


class SQLiteBackend(SQLBackend):
    """SQLite in WAL mode; ``sync`` is ``"full"`` or ``"normal"``."""

    def __init__(self, path: str, sync: str = "full") -> None:
        super().__init__()
        self.path = path
        self.sync = sync
        self.description = f"sqlite {path} (synchronous={sync})"
        self._identity: tuple[int, int] | None = None

    def connect(self, *, write: bool) -> sqlite3.Connection:
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise ConfigError(f"cannot open the SQLite store {self.path}: {folder} does not exist")
        # A read connection never creates the file: opened after the file was deleted,
        # it fails (SQLITE_CANTOPEN, an outage) instead of reading a new empty database.
        where = self.path if write else pathlib.Path(self.path).absolute().as_uri() + "?mode=ro"
        conn = sqlite3.connect(
            where,
            isolation_level=None,
            check_same_thread=False,
            timeout=_LOCK_WAIT_SECONDS,
            uri=not write,
        )
        if write:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
        else:
            conn.execute("PRAGMA query_only=ON")
        return conn

    def prepare(self, conn: sqlite3.Connection, bucket: int) -> None:
        self.begin(conn)
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            stored = self.read_meta(conn, bucket)
            self.commit(conn)
        except BaseException:
            self.rollback(conn)
            raise
        check_meta(stored, bucket, self.path)
        self._identity = _file_identity(self.path)

    def begin(self, conn: sqlite3.Connection) -> None:
        # Only for the write connection; a stat per transaction costs microseconds.
        self.check_readable()
        conn.execute("BEGIN IMMEDIATE")

    def check_readable(self) -> None:
        # Before every transaction and every read (a stat: microseconds): a connection
        # opened before the file was deleted or replaced would go on using the old file.
        if self._identity is not None and _file_identity(self.path) != self._identity:
            raise DatabaseFileGone(self.path)

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def is_busy(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.OperationalError) and (
            "locked" in str(error) or "busy" in str(error)
        )

    def is_disconnect(self, error: Exception) -> bool:
        return False  # an embedded database does not go away

    def outage_reason(self, error: Exception) -> str | None:
        if isinstance(error, DatabaseFileGone):
            return "the database file was deleted or replaced; restart the service"
        name = getattr(error, "sqlite_errorname", "")  # e.g. SQLITE_IOERR_WRITE
        return _OUTAGES.get("_".join(name.split("_")[:2]))


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None where it does not exist."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino
