"""The embedded SQLite store: schema and statements in SQLite's dialect.

One ``rollups`` row per (key, bucket, tags) holds a
:class:`~trioagg.rollup.Rollup`. The UPSERT merges an incoming rollup into the
stored one with the same shifted-moment algebra as :meth:`Rollup.merge`, so a
row is exact however many batches fed it; sketches are merged in Python
before the UPSERT replaces them (see :func:`~trioagg.store.base.commit_batch`).
``series`` indexes keys, tags and first/last buckets for ``/v1/keys``;
``event_ids`` remembers idempotency ids for the dedup window.

WAL mode lets readers run beside the writer; ``synchronous`` is FULL by
default (a commit survives power loss) or NORMAL (a process crash only).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError
from ..rollup import Slot
from .base import KeyInfo, Row, SeriesSpan, UpsertRow, to_rows

SCHEMA_VERSION = "2"

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
]

# SET expressions read the row as it was before the update, so their order is free.
# Sketch columns arrive already merged with the stored ones, or NULL to keep them.
_COLUMNS = "key, bucket, tags, count, shift, s1, s2, min, max, quantiles_kll, distinct_hll"
_MARKS = ", ".join("?" * 11)
_UPSERT = f"""
INSERT INTO rollups ({_COLUMNS}) VALUES ({_MARKS})
ON CONFLICT (key, bucket, tags) DO UPDATE SET
    s2 = s2 + excluded.s2 + 2.0 * (excluded.shift - shift) * excluded.s1
         + excluded.count * (excluded.shift - shift) * (excluded.shift - shift),
    s1 = s1 + excluded.s1 + excluded.count * (excluded.shift - shift),
    count = count + excluded.count,
    min = min(min, excluded.min),
    max = max(max, excluded.max),
    quantiles_kll = coalesce(excluded.quantiles_kll, quantiles_kll),
    distinct_hll = coalesce(excluded.distinct_hll, distinct_hll)
"""

_UPSERT_SERIES = """
INSERT INTO series (key, tags, first_bucket, last_bucket) VALUES (?, ?, ?, ?)
ON CONFLICT (key, tags) DO UPDATE SET
    first_bucket = min(first_bucket, excluded.first_bucket),
    last_bucket = max(last_bucket, excluded.last_bucket)
"""

_BUCKET_NAMES = {60: "1m", 300: "5m", 900: "15m", 3600: "1h"}

# Short on purpose: waiting on a lock happens in Store.write's backoff loop,
# where it is cancellable, not inside a worker thread.
_LOCK_WAIT_SECONDS = 0.2
# SQLite's default limit of bound parameters is 32766; stay far below it.
_CHUNK = 500
# The largest code point: prefix + this sorts after every key with that prefix.
_PREFIX_END = "\U0010ffff"


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
        self.begin(conn)
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            stored = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            if not stored:
                conn.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [("bucket_seconds", str(bucket)), ("schema_version", SCHEMA_VERSION)],
                )
            self.commit(conn)
        except BaseException:
            self.rollback(conn)
            raise
        if stored:
            check_meta(stored, bucket, self.path)

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def claim_ids(
        self, conn: sqlite3.Connection, ids: Sequence[str], now: float, since: float
    ) -> set[str]:
        claimed: set[str] = set()
        for chunk in _chunks(ids):
            values = ",".join(["(?, ?)"] * len(chunk))
            params: list[Any] = []
            for event_id in chunk:
                params += (event_id, now)
            claimed.update(
                row[0]
                for row in conn.execute(
                    f"INSERT INTO event_ids (id, seen) VALUES {values} "
                    "ON CONFLICT (id) DO UPDATE SET seen = excluded.seen "
                    "WHERE event_ids.seen < ? RETURNING id",
                    [*params, since],
                )
            )
        return claimed

    def purge_ids(self, conn: sqlite3.Connection, before: float, limit: int) -> int:
        cursor = conn.execute(
            "DELETE FROM event_ids WHERE id IN (SELECT id FROM event_ids WHERE seen < ? LIMIT ?)",
            (before, limit),
        )
        return cursor.rowcount

    def insert_new(self, conn: sqlite3.Connection, rows: Sequence[UpsertRow]) -> set[Slot]:
        inserted: set[Slot] = set()
        for row in rows:
            cursor = conn.execute(
                f"INSERT INTO rollups ({_COLUMNS}) VALUES ({_MARKS}) "
                "ON CONFLICT (key, bucket, tags) DO NOTHING",
                row,
            )
            if cursor.rowcount:
                inserted.add((row[0], row[1], row[2]))
        return inserted

    def stored_sketches(
        self, conn: sqlite3.Connection, slots: Sequence[Slot]
    ) -> dict[Slot, tuple[bytes | None, bytes | None]]:
        found = {}
        for key, bucket, tags in slots:
            found[(key, bucket, tags)] = conn.execute(
                "SELECT quantiles_kll, distinct_hll FROM rollups "
                "WHERE key = ? AND bucket = ? AND tags = ?",
                (key, bucket, tags),
            ).fetchone()
        return found

    def upsert(self, conn: sqlite3.Connection, rows: Iterable[UpsertRow]) -> None:
        conn.executemany(_UPSERT, rows)

    def upsert_series(self, conn: sqlite3.Connection, spans: Sequence[SeriesSpan]) -> None:
        conn.executemany(_UPSERT_SERIES, spans)

    def fetch(
        self,
        conn: sqlite3.Connection,
        keys: Sequence[str],
        start: int,
        end: int,
        *,
        sketches: bool = False,
    ) -> list[Row]:
        marks = ",".join("?" * len(keys))
        blobs = ", quantiles_kll, distinct_hll" if sketches else ""
        records = conn.execute(
            f"SELECT key, bucket, tags, count, shift, s1, s2, min, max{blobs} FROM rollups "
            f"WHERE key IN ({marks}) AND bucket >= ? AND bucket < ?",
            [*keys, start, end],
        ).fetchall()
        return to_rows(records, sketches=sketches)

    def list_keys(
        self, conn: sqlite3.Connection, prefix: str, after: str, limit: int
    ) -> list[KeyInfo]:
        rows = conn.execute(
            "SELECT key, tags, first_bucket, last_bucket FROM series WHERE key IN ("
            "  SELECT DISTINCT key FROM series WHERE key > ? AND key >= ? AND key < ?"
            "  ORDER BY key LIMIT ?"
            ") ORDER BY key",
            (after, prefix, prefix + _PREFIX_END, limit),
        ).fetchall()
        return [(key, tags, first, last) for key, tags, first, last in rows]

    def top(
        self,
        conn: sqlite3.Connection,
        start: int,
        end: int,
        stat: str,
        prefix: str,
        limit: int,
    ) -> list[tuple[str, float]]:
        measure = "sum(count)" if stat == "count" else "sum(count * shift + s1)"
        rows = conn.execute(
            f"SELECT key, {measure} AS measure FROM rollups "
            "WHERE bucket >= ? AND bucket < ? AND key >= ? AND key < ? "
            "GROUP BY key ORDER BY measure DESC, key LIMIT ?",
            (start, end, prefix, prefix + _PREFIX_END, limit),
        ).fetchall()
        return [(key, measure) for key, measure in rows]

    def ping(self, conn: sqlite3.Connection) -> None:
        conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()

    def is_busy(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.OperationalError) and (
            "locked" in str(error) or "busy" in str(error)
        )

    def is_disconnect(self, error: Exception) -> bool:
        return False  # an embedded database does not go away

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
