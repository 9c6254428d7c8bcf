"""The PostgreSQL store: the same schema ideas and merges, in PostgreSQL's dialect.

Synchronous psycopg 3 connections, run in worker threads by
:class:`~trioagg.store.base.Store`. Several writers (threads, processes or
hosts) can share one database: every statement that takes row locks takes
them in sorted order (ids, then rollup rows, then series), so concurrent
transactions wait for each other but never deadlock, and the UPSERT merges
inside the database, so no update is lost. Key columns use the "C" collation,
so keys sort and page by their bytes, as in SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from ..rollup import Slot
from .base import KeyInfo, Row, SeriesSpan, UpsertRow, to_rows
from .sqlite import SCHEMA_VERSION, check_meta

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
]

_COLUMNS = "key, bucket, tags, count, shift, s1, s2, min, max, quantiles_kll, distinct_hll"

_UPSERT = f"""
INSERT INTO rollups AS r ({_COLUMNS})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (key, bucket, tags) DO UPDATE SET
    s2 = r.s2 + excluded.s2 + 2.0 * (excluded.shift - r.shift) * excluded.s1
         + excluded.count * (excluded.shift - r.shift) * (excluded.shift - r.shift),
    s1 = r.s1 + excluded.s1 + excluded.count * (excluded.shift - r.shift),
    count = r.count + excluded.count,
    min = LEAST(r.min, excluded.min),
    max = GREATEST(r.max, excluded.max),
    quantiles_kll = COALESCE(excluded.quantiles_kll, r.quantiles_kll),
    distinct_hll = COALESCE(excluded.distinct_hll, r.distinct_hll)
"""

_UPSERT_SERIES = """
INSERT INTO series AS s (key, tags, first_bucket, last_bucket) VALUES (%s, %s, %s, %s)
ON CONFLICT (key, tags) DO UPDATE SET
    first_bucket = LEAST(s.first_bucket, excluded.first_bucket),
    last_bucket = GREATEST(s.last_bucket, excluded.last_bucket)
"""

# Taken while creating the schema, so that processes starting together do not race.
_SCHEMA_LOCK = 0x7472696F616767  # "trioagg"
_PREFIX_END = "\U0010ffff"
_CONNECT_TIMEOUT_SECONDS = 5
_LOCK_WAIT_MS = 200


class PostgresBackend:
    """PostgreSQL through psycopg 3; ``dsn`` is a ``postgresql://`` URL."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        info.pop("password", None)
        where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self.description = f"postgresql {where}"

    def connect(self, *, write: bool) -> psycopg.Connection[Any]:
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
            stored = dict(conn.execute("SELECT name, value FROM meta").fetchall())
            if not stored:
                conn.cursor().executemany(
                    "INSERT INTO meta (name, value) VALUES (%s, %s)",
                    [("bucket_seconds", str(bucket)), ("schema_version", SCHEMA_VERSION)],
                )
        if stored:
            check_meta(stored, bucket, self.description)

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("BEGIN")

    def commit(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: psycopg.Connection[Any]) -> None:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")

    def claim_ids(
        self, conn: psycopg.Connection[Any], ids: Sequence[str], now: float, since: float
    ) -> set[str]:
        rows = conn.execute(
            "INSERT INTO event_ids (id, seen) SELECT id, %s FROM unnest(%s::text[]) AS id "
            "ORDER BY id "
            "ON CONFLICT (id) DO UPDATE SET seen = excluded.seen "
            "WHERE event_ids.seen < %s RETURNING id",
            (now, sorted(ids), since),
        ).fetchall()
        return {row[0] for row in rows}

    def purge_ids(self, conn: psycopg.Connection[Any], before: float, limit: int) -> int:
        cursor = conn.execute(
            "DELETE FROM event_ids WHERE id IN (SELECT id FROM event_ids WHERE seen < %s LIMIT %s)",
            (before, limit),
        )
        return cursor.rowcount

    def insert_new(self, conn: psycopg.Connection[Any], rows: Sequence[UpsertRow]) -> set[Slot]:
        inserted: set[Slot] = set()
        for row in rows:
            cursor = conn.execute(
                f"INSERT INTO rollups ({_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (key, bucket, tags) DO NOTHING",
                row,
            )
            if cursor.rowcount:
                inserted.add((row[0], row[1], row[2]))
        return inserted

    def stored_sketches(
        self, conn: psycopg.Connection[Any], slots: Sequence[Slot]
    ) -> dict[Slot, tuple[bytes | None, bytes | None]]:
        if not slots:
            return {}
        keys, buckets, tags = (list(column) for column in zip(*sorted(slots), strict=True))
        rows = conn.execute(
            "SELECT r.key, r.bucket, r.tags, r.quantiles_kll, r.distinct_hll FROM rollups r "
            "JOIN unnest(%s::text[], %s::bigint[], %s::text[]) AS s(key, bucket, tags) "
            "ON r.key = s.key AND r.bucket = s.bucket AND r.tags = s.tags "
            "ORDER BY r.key, r.bucket, r.tags FOR UPDATE OF r",
            (keys, buckets, tags),
        ).fetchall()
        return {(k, b, t): (kll, hll) for k, b, t, kll, hll in rows}

    def upsert(self, conn: psycopg.Connection[Any], rows: Iterable[UpsertRow]) -> None:
        ordered = sorted(rows, key=lambda row: row[:3])  # lock rows in one global order
        if ordered:
            conn.cursor().executemany(_UPSERT, ordered)

    def upsert_series(self, conn: psycopg.Connection[Any], spans: Sequence[SeriesSpan]) -> None:
        conn.cursor().executemany(_UPSERT_SERIES, sorted(spans))

    def fetch(
        self,
        conn: psycopg.Connection[Any],
        keys: Sequence[str],
        start: int,
        end: int,
        *,
        sketches: bool = False,
    ) -> list[Row]:
        blobs = ", quantiles_kll, distinct_hll" if sketches else ""
        records = conn.execute(
            f"SELECT key, bucket, tags, count, shift, s1, s2, min, max{blobs} FROM rollups "
            "WHERE key = ANY(%s) AND bucket >= %s AND bucket < %s",
            (list(keys), start, end),
        ).fetchall()
        return to_rows(records, sketches=sketches)

    def list_keys(
        self, conn: psycopg.Connection[Any], prefix: str, after: str, limit: int
    ) -> list[KeyInfo]:
        rows = conn.execute(
            "SELECT key, tags, first_bucket, last_bucket FROM series WHERE key IN ("
            "  SELECT DISTINCT key FROM series WHERE key > %s AND key >= %s AND key < %s"
            "  ORDER BY key LIMIT %s"
            ") ORDER BY key",
            (after, prefix, prefix + _PREFIX_END, limit),
        ).fetchall()
        return [(key, tags, first, last) for key, tags, first, last in rows]

    def top(
        self,
        conn: psycopg.Connection[Any],
        start: int,
        end: int,
        stat: str,
        prefix: str,
        limit: int,
    ) -> list[tuple[str, float]]:
        measure = "sum(count)" if stat == "count" else "sum(count * shift + s1)"
        rows = conn.execute(
            f"SELECT key, {measure} AS measure FROM rollups "
            "WHERE bucket >= %s AND bucket < %s AND key >= %s AND key < %s "
            "GROUP BY key ORDER BY measure DESC, key LIMIT %s",
            (start, end, prefix, prefix + _PREFIX_END, limit),
        ).fetchall()
        return [(key, int(measure) if stat == "count" else measure) for key, measure in rows]

    def ping(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()

    def is_busy(self, error: Exception) -> bool:
        return isinstance(
            error,
            pg_errors.DeadlockDetected
            | pg_errors.SerializationFailure
            | pg_errors.LockNotAvailable,
        )

    def is_disconnect(self, error: Exception) -> bool:
        return isinstance(error, psycopg.OperationalError | psycopg.InterfaceError)

    def close(self, conn: psycopg.Connection[Any]) -> None:
        conn.close()
