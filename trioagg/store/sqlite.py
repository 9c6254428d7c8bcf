"""The embedded SQLite store: schema, UPSERT merge and range reads, in SQLite's dialect.

One row per (key, bucket, tags) holds a :class:`~trioagg.rollup.Rollup`. The
UPSERT merges an incoming rollup into the stored one with the same shifted
moment algebra as :meth:`Rollup.merge`, so a row is exact however many
batches fed it. WAL mode lets readers run beside the writer; ``synchronous``
is FULL by default (a commit survives power loss) or NORMAL (survives a
process crash only).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from ..errors import ConfigError
from ..rollup import Rollup, Slot
from .base import Row

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups (
    key TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    tags TEXT NOT NULL,
    count INTEGER NOT NULL,
    shift REAL NOT NULL,
    s1 REAL NOT NULL,
    s2 REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    PRIMARY KEY (key, bucket, tags)
) WITHOUT ROWID;
"""

# SET expressions read the row as it was before the update, so their order is free.
_UPSERT = """
INSERT INTO rollups (key, bucket, tags, count, shift, s1, s2, min, max)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key, bucket, tags) DO UPDATE SET
    s2 = s2 + excluded.s2 + 2.0 * (excluded.shift - shift) * excluded.s1
         + excluded.count * (excluded.shift - shift) * (excluded.shift - shift),
    s1 = s1 + excluded.s1 + excluded.count * (excluded.shift - shift),
    count = count + excluded.count,
    min = min(min, excluded.min),
    max = max(max, excluded.max)
"""

_BUCKET_NAMES = {60: "1m", 300: "5m", 900: "15m", 3600: "1h"}

# Short on purpose: waiting on a lock happens in Store.write's backoff loop,
# where it is cancellable, not inside a worker thread.
_LOCK_WAIT_SECONDS = 0.2


class SQLiteBackend:
    """SQLite in WAL mode; ``sync`` is ``"full"`` or ``"normal"``."""

    def __init__(self, path: str, sync: str = "full") -> None:
        self.path = path
        self.sync = sync
        self.description = f"sqlite {path} (synchronous={sync})"

    def connect(self, *, write: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=_LOCK_WAIT_SECONDS,
        )
        if write:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
        else:
            conn.execute("PRAGMA query_only=ON")
        return conn

    def prepare(self, conn: sqlite3.Connection, bucket: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            stored = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            if not stored:
                conn.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [("bucket_seconds", str(bucket)), ("schema_version", SCHEMA_VERSION)],
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if stored:
            check_meta(stored, bucket, self.path)

    def upsert(self, conn: sqlite3.Connection, rollups: dict[Slot, Rollup]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                _UPSERT,
                [
                    (key, bucket, tags, r.count, r.shift, r.s1, r.s2, r.min, r.max)
                    for (key, bucket, tags), r in rollups.items()
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def fetch(
        self, conn: sqlite3.Connection, keys: Sequence[str], start: int, end: int
    ) -> list[Row]:
        marks = ",".join("?" * len(keys))
        cursor = conn.execute(
            "SELECT key, bucket, tags, count, shift, s1, s2, min, max FROM rollups "
            f"WHERE key IN ({marks}) AND bucket >= ? AND bucket < ?",
            [*keys, start, end],
        )
        return [
            (key, bucket, tags, Rollup(shift, count, s1, s2, low, high))
            for key, bucket, tags, count, shift, s1, s2, low, high in cursor
        ]

    def ping(self, conn: sqlite3.Connection) -> None:
        conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()

    def is_busy(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.OperationalError) and (
            "locked" in str(error) or "busy" in str(error)
        )

    def close(self, conn: sqlite3.Connection) -> None:
        conn.close()


def check_meta(stored: dict[str, str], bucket: int, where: str) -> None:
    """Raise ConfigError when an existing store was made with other settings."""
    if stored.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(
            f"the store at {where} has schema version {stored.get('schema_version')!r}; "
            f"this trioagg reads version {SCHEMA_VERSION}"
        )
    stored_bucket = int(stored["bucket_seconds"])
    if stored_bucket != bucket:
        raise ConfigError(
            f"the store at {where} was created with {_BUCKET_NAMES.get(stored_bucket)} buckets, "
            f"but --bucket is {_BUCKET_NAMES.get(bucket)}; start with --bucket "
            f"{_BUCKET_NAMES.get(stored_bucket)} or use a new --db"
        )
