"""The statements both SQL stores share, written once for SQLite and PostgreSQL.

One ``rollups`` row per (key, bucket, tags) holds a
:class:`~trioagg.core.rollup.Rollup`. The UPSERT merges an incoming rollup into the
stored one with the same shifted-moment algebra as :meth:`Rollup.merge`, so a
row is exact however many batches fed it; sketches arrive already merged with
the stored ones (see :mod:`~trioagg.store.plan`) and replace
them. ``last`` (the value of the latest event, a tie going to the larger value) is
merged in the UPSERT too, so it is exact whatever order batches arrive in. Its two
columns, ``last_value`` and ``last_ts``, were added after SCHEMA_VERSION 2 came out:
``prepare`` adds them where missing, and a row stored before holds NULL in both,
which means unknown: the UPSERT keeps it unknown (its old events may be later than
any new one), and :meth:`SQLBackend.fetch` reads its ``last_ts`` as the end of its
bucket, so that merged with rows of earlier buckets it still wins, and loses to
rows of later ones. ``series`` indexes keys, tags and first/last buckets for ``/v1/keys``;
``event_ids`` remembers idempotency ids for the dedup window.

With ``--tiers`` (:mod:`trioagg.core.tiers`), each coarser tier is a table of the same
columns, ``rollups_<width>``; the UPSERT and the sketch statements take the
table, reads go through the union of every tier's table (each row with its
tier's width), and ``meta`` holds the declared tiers and each tier's rolled mark.

Statements are written with ``?`` placeholders; a dialect with another style
sets :attr:`SQLBackend.mark`. Subclasses own connecting, the schema, the
transaction statements, and which errors mean "busy" or "disconnected".
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from itertools import chain
from typing import Any

from ..core.errors import ConfigError
from ..core.rollup import Slot
from ..core.settings import BUCKET_NAMES
from ..core.tiers import Tiers, changed, parse_tiers
from .base import KeyInfo, Row, TierCut, to_rows
from .head import tenant_needles
from .plan import SeriesSpan, StoredSketches, UpsertRow

SCHEMA_VERSION = "2"

COLUMNS = (
    "key, bucket, tags, count, shift, s1, s2, min, max, last_value, last_ts, "
    "quantiles_kll, distinct_hll"
)
#: The columns of ``last`` (added in place to stores made before it), and their SQL types
#: in the dialects (SQLite, PostgreSQL).
LAST_COLUMNS = ("last_value", "last_ts")

# The largest code point: prefix + this sorts after every key with that prefix.
_PREFIX_END = "\U0010ffff"
# Stay far below any dialect's limit of bound parameters per statement.
_CHUNK = 500
#: Rows per upsert statement: few statements, as each waits for the GIL once (see upsert).
_UPSERT_ROWS = 2000


#: API keys (trioagg.keys.auth): only a SHA-256 digest of each secret. Created IF NOT EXISTS by
#: ``prepare`` and by the key commands, so a store of an older trioagg opens unchanged and
#: SCHEMA_VERSION stays. Portable types: SQLite reads DOUBLE PRECISION as REAL.
KEYS_TABLE = """CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    tenant TEXT,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION,
    revoked DOUBLE PRECISION,
    last_used DOUBLE PRECISION
)"""
#: A row of api_keys: name, digest, scopes, tenant, created, expires, revoked, last_used.
KEY_COLUMNS = "name, digest, scopes, tenant, created, expires, revoked, last_used"


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SQLBackend:
    """What the SQL stores share; see the module docstring for what a dialect adds."""

    description: str
    #: The placeholder of the driver's paramstyle.
    mark = "?"
    #: The two-argument minimum and maximum of the dialect.
    least = "min"
    greatest = "max"
    #: Appended to the read of stored sketches: a row lock where writers run concurrently.
    row_lock = ""
    #: Appended to a read of rows to lock them (no ORDER BY of its own).
    row_lock_plain = ""
    #: Whether upserts go in sorted order, so that concurrent writers never deadlock.
    #: (Rows are upserted in order anyway: see upsert.)
    ordered_writes = False
    #: Whether a connection can be lost under the service (a database server's can; a
    #: file's cannot): then an idle one is pinged before use (see base.Link).
    can_disconnect = False
    #: Whether change_stamp() tells when the store changed (see base.Backend).
    tells_changes = False
    #: The dialect's position of a substring (0: absent), haystack first.
    position = "instr"
    #: Databases the writers' hours are spread over (1: every writer shares one).
    shards = 1
    #: The most parameters one statement may bind (PostgreSQL's protocol: 65,535).
    max_parameters = 65_535
    #: Appended to a flush's read of the tiers' rolled marks: where writers run
    #: concurrently, a lock that a roll (which takes it exclusively) waits for.
    share_lock = ""

    def __init__(self, tiers: Tiers | None = None) -> None:
        #: The store's tiers (see :mod:`trioagg.core.tiers`); None: one table, kept for ever.
        self.tiers = tiers
        #: What reads name the shard tables: the tables, or views over several shards
        #: and tiers.
        self.tables = {"rollups": "rollups", "series": "series"}
        #: The store's bucket width, once prepared: the end of an old row's bucket is
        #: the time of its unknown ``last``.
        self.bucket = 0
        #: Statements of many rows (_many_rows) by template, table and count of rows.
        self._statements: dict[tuple[str, str, int], str] = {}
        least, greatest = self.least, self.greatest
        # The incoming row's last wins when it is later (a tie: the larger value); a NULL
        # stored last_ts (unknown, a row older than the column) compares as NULL, so the
        # row keeps it.
        later = (
            "excluded.last_ts > r.last_ts OR "
            "(excluded.last_ts = r.last_ts AND excluded.last_value > r.last_value)"
        )
        # SET expressions read the row as it was before the update: their order is free.
        # {values}: the rows' placeholders (see _many_rows).
        self._upsert = self._sql(f"""
            INSERT INTO {{table}} AS r ({COLUMNS}) VALUES {{values}}
            ON CONFLICT (key, bucket, tags) DO UPDATE SET
                s2 = r.s2 + excluded.s2 + 2.0 * (excluded.shift - r.shift) * excluded.s1
                     + excluded.count * (excluded.shift - r.shift) * (excluded.shift - r.shift),
                s1 = r.s1 + excluded.s1 + excluded.count * (excluded.shift - r.shift),
                count = r.count + excluded.count,
                min = {least}(r.min, excluded.min),
                max = {greatest}(r.max, excluded.max),
                quantiles_kll = coalesce(excluded.quantiles_kll, r.quantiles_kll),
                distinct_hll = coalesce(excluded.distinct_hll, r.distinct_hll),
                last_value = CASE WHEN {later} THEN excluded.last_value ELSE r.last_value END,
                last_ts = CASE WHEN {later} THEN excluded.last_ts ELSE r.last_ts END""")
        self._insert_new = self._sql(
            f"INSERT INTO {{table}} ({COLUMNS}) VALUES {{values}} "
            "ON CONFLICT (key, bucket, tags) DO NOTHING RETURNING key, bucket, tags"
        )
        self._append_journal = self._sql(
            "INSERT INTO journal (owner, events, batch) VALUES (?, ?, ?) RETURNING seq"
        )
        self._upsert_series = self._sql(f"""
            INSERT INTO series AS s (key, tags, first_bucket, last_bucket) VALUES (?, ?, ?, ?)
            ON CONFLICT (key, tags) DO UPDATE SET
                first_bucket = {least}(s.first_bucket, excluded.first_bucket),
                last_bucket = {greatest}(s.last_bucket, excluded.last_bucket)""")

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.mark)

    def claim_ids(self, conn: Any, ids: Sequence[str], now: float, since: float) -> set[str]:
        # Most batches' ids are all new: they are claimed without RETURNING (which cost
        # SQLite as much again as the insert, 1.4 us an id), counting the rows changed.
        # Only when some were not claimed, and some were, is the claim undone and made
        # again returning which; when none was, nothing changed.
        ordered = sorted(ids)
        self.savepoint(conn)  # a failure rolls back the caller's whole transaction
        changed = sum(
            self._claim(conn, chunk, now, since, returning=False).rowcount
            for chunk in _chunks(ordered)
        )
        if changed == len(ordered):
            self.release_savepoint(conn)
            return set(ordered)
        if changed == 0:
            self.release_savepoint(conn)
            return set()
        self.rollback_to_savepoint(conn)
        claimed: set[str] = set()
        for chunk in _chunks(ordered):
            rows = self._claim(conn, chunk, now, since, returning=True).fetchall()
            claimed.update(row[0] for row in rows)
        return claimed

    def _claim(
        self, conn: Any, chunk: Sequence[str], now: float, since: float, *, returning: bool
    ) -> Any:
        """Record ``chunk``'s ids as seen ``now`` where not seen since ``since``; the
        cursor counts them (``rowcount``), or (``returning``) returns them."""
        values = ", ".join(["(?, ?)"] * len(chunk))
        return conn.execute(
            self._sql(
                f"INSERT INTO event_ids (id, seen) VALUES {values} "
                "ON CONFLICT (id) DO UPDATE SET seen = excluded.seen "
                "WHERE event_ids.seen < ?" + (" RETURNING id" if returning else "")
            ),
            [value for event_id in chunk for value in (event_id, now)] + [since],
        )

    def purge_ids(self, conn: Any, before: float, limit: int) -> int:
        cursor = conn.execute(
            self._sql(
                # seen < ? twice: an id claimed again since the subquery read it is kept.
                "DELETE FROM event_ids WHERE id IN "
                "(SELECT id FROM event_ids WHERE seen < ? LIMIT ?) AND seen < ?"
            ),
            (before, limit, before),
        )
        count: int = cursor.rowcount
        return count

    def insert_new(self, conn: Any, rows: Sequence[UpsertRow], table: str = "rollups") -> set[Slot]:
        # Many rows per statement, returning those inserted, as upsert does. One
        # statement a row cost PostgreSQL a round trip each: a flush of 27,000 new rows
        # with sketches took 4.9 s so, 0.3 s by statements of 2,000 rows (the suite's tiers).
        found = self._many_rows(conn, self._insert_new, rows, table)
        return {(key, bucket, tags) for key, bucket, tags in found}

    def stored_sketches(
        self, conn: Any, slots: Sequence[Slot], table: str = "rollups"
    ) -> dict[Slot, StoredSketches]:
        found: dict[Slot, StoredSketches] = {}
        for chunk in _chunks(sorted(slots)):
            values = ", ".join(["(?, ?, ?)"] * len(chunk))
            rows = conn.execute(
                self._sql(
                    f"SELECT key, bucket, tags, quantiles_kll, distinct_hll FROM {table} "
                    f"WHERE (key, bucket, tags) IN (VALUES {values}){self.row_lock}"
                ),
                [value for slot in chunk for value in slot],
            ).fetchall()
            found.update(((k, b, t), (kll, hll)) for k, b, t, kll, hll in rows)
        return found

    def upsert(self, conn: Any, rows: Iterable[UpsertRow], table: str = "rollups") -> None:
        # In key order: the B-tree is walked once, left to right, and concurrent writers
        # lock rows in one order (measured on SQLite, 24,000 rows of 1,000 keys x 24 h
        # upserted into as many: 6.2 -> 4.9 us per row, the sort 0.6 us of it). A
        # slot is in one row only, so the rows' first three columns decide the order.
        # Many rows per statement, not one (executemany): the driver then releases and
        # takes back the GIL once per statement instead of once per row, and each time
        # it may wait for the GIL behind the event loop, holding the database's write
        # lock. 24,000 rows on SQLite, this machine: 160 ms one by one, 74 ms by 500;
        # beside a thread busy with Python, 470-1,240 ms one by one, 260 ms by 500 and
        # 190 ms by 2,000 (_UPSERT_ROWS, where the database binds 26,000 parameters).
        self._many_rows(conn, self._upsert, rows, table)

    def _many_rows(
        self, conn: Any, template: str, rows: Iterable[UpsertRow], table: str
    ) -> list[Any]:
        """Run ``template`` (its ``{table}`` and ``{values}`` to fill) over ``rows`` in
        key order, as many to a statement as the database binds (see :meth:`upsert`),
        each statement made once per count of rows; the rows the statements return."""
        found: list[Any] = []
        per_statement = min(_UPSERT_ROWS, self.max_parameters // len(COLUMNS.split(",")))
        for chunk in _chunks(sorted(rows), per_statement):
            statement = self._statements.get((template, table, len(chunk)))
            if statement is None:
                statement = self._statements[(template, table, len(chunk))] = template.format(
                    table=table, values=self.rows_of_values(len(chunk), 13)
                )
            found += self.execute_rows(conn, statement, list(chain.from_iterable(chunk)))
        return found

    def rows_of_values(self, count: int, width: int) -> str:
        """The placeholders of ``count`` rows of ``width`` values, for a VALUES list (the
        only ones of the statement that :meth:`execute_rows` runs)."""
        row = "(" + ", ".join([self.mark] * width) + ")"
        return ", ".join([row] * count)

    def execute_rows(self, conn: Any, statement: str, values: Sequence[Any]) -> list[Any]:
        """Run a statement of many rows of values (:meth:`rows_of_values`); its rows."""
        cursor = conn.execute(statement, values)
        return list(cursor.fetchall()) if cursor.description is not None else []

    # -- Tiers (see trioagg.core.tiers): the rolled marks in meta, and moving rows.

    def read_rolled(self, conn: Any, *, exclusive: bool) -> list[int]:
        """Inside a transaction: the rolled mark of every tier but the last, locked until
        it ends (``exclusive``: against flushes too, for a roll)."""
        assert self.tiers is not None
        names = [f"rolled_{index}" for index in range(len(self.tiers) - 1)]
        lock = self.row_lock_plain if exclusive else self.share_lock
        rows = conn.execute(
            self._sql(
                f"SELECT name, value FROM meta WHERE name IN ({', '.join('?' * len(names))}) "
                f"ORDER BY name{lock}"
            ),
            names,
        ).fetchall()
        marks = dict(rows)
        return [int(marks.get(name, 0)) for name in names]

    def write_rolled(self, conn: Any, index: int, mark: int) -> None:
        conn.execute(
            self._sql(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
            ),
            (f"rolled_{index}", str(mark)),
        )

    def oldest_bucket(self, conn: Any, table: str, before: int) -> int | None:
        """The first bucket of ``table`` that starts before ``before``; None if none."""
        row = conn.execute(
            self._sql(f"SELECT min(bucket) FROM {table} WHERE bucket < ?"), (before,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def rows_before(self, conn: Any, table: str, before: int, limit: int) -> list[Row]:
        """The first ``limit`` rows of ``table`` whose bucket starts before ``before``,
        in (bucket, key, tags) order, sketches too."""
        records = conn.execute(
            self._sql(
                "SELECT key, bucket, tags, count, shift, s1, s2, min, max, last_value, "
                f"coalesce(last_ts, bucket + ?), quantiles_kll, distinct_hll FROM {table} "
                "WHERE bucket < ? ORDER BY bucket, key, tags LIMIT ?"
            ),
            (self.bucket, before, limit),
        ).fetchall()
        return to_rows(records, sketches=True)

    def delete_through(self, conn: Any, table: str, before: int, last: Slot) -> int:
        """Delete the rows of ``table`` whose bucket starts before ``before``, up to
        ``last`` in (bucket, key, tags) order: those :meth:`rows_before` read. How many
        went."""
        key, bucket, tags = last
        cursor = conn.execute(
            self._sql(f"DELETE FROM {table} WHERE bucket < ? AND (bucket, key, tags) <= (?, ?, ?)"),
            (before, bucket, key, tags),
        )
        count: int = cursor.rowcount
        return count

    def delete_before(self, conn: Any, table: str, before: int, limit: int) -> int:
        """Delete up to ``limit`` rows of ``table`` whose bucket starts before ``before``;
        how many went."""
        cursor = conn.execute(
            self._sql(
                f"DELETE FROM {table} WHERE (key, bucket, tags) IN "
                f"(SELECT key, bucket, tags FROM {table} WHERE bucket < ? LIMIT ?)"
            ),
            (before, limit),
        )
        count: int = cursor.rowcount
        return count

    def union_of_tiers(self, tables: Sequence[tuple[str, int]]) -> str:
        """A relation of every row of ``tables``, (table, its tier's width) pairs, with
        the width as a last column, ``width``."""
        return " UNION ALL ".join(
            f"SELECT {COLUMNS}, {width} AS width FROM {table}" for table, width in tables
        )

    def upsert_series(self, conn: Any, spans: Sequence[SeriesSpan]) -> None:
        conn.cursor().executemany(
            self._upsert_series, sorted(spans) if self.ordered_writes else spans
        )

    def savepoint(self, conn: Any) -> None:
        conn.execute("SAVEPOINT rows")

    def release_savepoint(self, conn: Any) -> None:
        conn.execute("RELEASE SAVEPOINT rows")

    def rollback_to_savepoint(self, conn: Any) -> None:
        conn.execute("ROLLBACK TO SAVEPOINT rows")
        conn.execute("RELEASE SAVEPOINT rows")

    def set_aside(self, conn: Any, rows: Sequence[UpsertRow], now: float) -> None:
        if rows:
            conn.cursor().executemany(
                self._sql(
                    f"INSERT INTO refused_rollups ({COLUMNS}, refused_at) "
                    f"VALUES ({', '.join('?' * 14)})"
                ),
                [(*row, now) for row in rows],
            )

    def append_journal(self, conn: Any, owner: str, events: int, blob: bytes) -> int:
        seq: int = conn.execute(self._append_journal, (owner, events, blob)).fetchone()[0]
        return seq

    def read_journal(
        self, conn: Any, owner: str, limit: int | None, *, lock: bool
    ) -> list[tuple[int, int, bytes]]:
        rows = conn.execute(
            self._sql(
                "SELECT seq, events, batch FROM journal WHERE owner = ? ORDER BY seq"
                + ("" if limit is None else " LIMIT ?")
                + (self.row_lock_plain if lock else "")
            ),
            (owner,) if limit is None else (owner, limit),
        ).fetchall()
        return [(seq, events, bytes(blob)) for seq, events, blob in rows]

    def delete_journal(self, conn: Any, owner: str, first: int, last: int) -> int:
        cursor = conn.execute(
            self._sql("DELETE FROM journal WHERE owner = ? AND seq >= ? AND seq <= ?"),
            (owner, first, last),
        )
        count: int = cursor.rowcount
        return count

    def count_journal(self, conn: Any, owner: str, first: int, last: int) -> int:
        count: int = conn.execute(
            self._sql("SELECT count(*) FROM journal WHERE owner = ? AND seq >= ? AND seq <= ?"),
            (owner, first, last),
        ).fetchone()[0]
        return count

    def journal_owners(self, conn: Any) -> list[str]:
        return [row[0] for row in conn.execute("SELECT DISTINCT owner FROM journal").fetchall()]

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
        blobs = ", quantiles_kll, distinct_hll" if sketches else ""
        widths = ", width" if self.tiers is not None else ""
        only, only_params = self._tenant_clause(tenant)
        records = conn.execute(
            self._sql(
                "SELECT key, bucket, tags, count, shift, s1, s2, min, max, "
                f"last_value, coalesce(last_ts, bucket + ?){blobs}{widths} "
                f"FROM {self.tables['rollups']} "
                f"WHERE key IN ({', '.join('?' * len(keys))}) AND bucket >= ? AND bucket < ?"
                + only
                + ("" if limit is None else " LIMIT ?")
            ),
            [self.bucket, *keys, start, end, *only_params, *([] if limit is None else [limit])],
        ).fetchall()
        if widths:
            records = _whole_buckets(records, self.bucket, fits)
        return to_rows(records, sketches=sketches)

    def list_keys(
        self, conn: Any, prefix: str, after: str, limit: int, tenant: str | None = None
    ) -> list[KeyInfo]:
        series = self.tables["series"]
        only, only_params = self._tenant_clause(tenant)
        # A series whose hours span shards has a span in each: the keys index is their union.
        rows = conn.execute(
            self._sql(
                f"SELECT key, tags, min(first_bucket), max(last_bucket) FROM {series} "
                f"WHERE key IN (SELECT DISTINCT key FROM {series} "
                f"  WHERE key > ? AND key >= ? AND key < ?{only} ORDER BY key LIMIT ?"
                f"){only} GROUP BY key, tags ORDER BY key, tags"
            ),
            (after, prefix, prefix + _PREFIX_END, *only_params, limit, *only_params),
        ).fetchall()
        return [(key, tags, first, last) for key, tags, first, last in rows]

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
        measure = "sum(count)" if stat == "count" else "sum(count * shift + s1)"
        only, only_params = self._tenant_clause(tenant)
        rows = conn.execute(
            self._sql(
                f"SELECT key, {measure} AS measure FROM {self.tables['rollups']} "
                f"WHERE bucket >= ? AND bucket < ? AND key >= ? AND key < ?{only} "
                "GROUP BY key ORDER BY measure DESC, key LIMIT ?"
            ),
            (start, end, prefix, prefix + _PREFIX_END, *only_params, limit),
        ).fetchall()
        # PostgreSQL sums BIGINT to NUMERIC: counts are whole numbers.
        return [(key, int(measure) if stat == "count" else measure) for key, measure in rows]

    def _tenant_clause(self, tenant: str | None) -> tuple[str, tuple[str, ...]]:
        """`` AND <tags hold tenant=VALUE>`` and its parameters; nothing for no tenant.
        Tags are canonical JSON (msgspec, keys sorted, strings escaped the same way every
        time), so the pair is found as text (see :func:`~trioagg.store.head.tenant_needles`)."""
        if tenant is None:
            return "", ()
        clause = f" AND ({self.position}(tags, ?) > 0 OR {self.position}(tags, ?) > 0)"
        return clause, tenant_needles(tenant)

    # -- API keys: every statement a single one, so none needs a transaction of its own.

    def create_keys_table(self, conn: Any) -> None:
        conn.execute(KEYS_TABLE)

    def insert_api_key(self, conn: Any, row: Sequence[Any]) -> bool:
        """Insert a key; False when its name is taken."""
        cursor = conn.execute(
            self._sql(
                f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({', '.join('?' * 8)}) "
                "ON CONFLICT (name) DO NOTHING"
            ),
            tuple(row),
        )
        return bool(cursor.rowcount)

    def find_api_key(self, conn: Any, digest: str) -> tuple[Any, ...] | None:
        row = conn.execute(
            self._sql(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = ?"), (digest,)
        ).fetchone()
        return None if row is None else tuple(row)

    def list_api_keys(self, conn: Any) -> list[tuple[Any, ...]]:
        rows = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY name").fetchall()
        return [tuple(row) for row in rows]

    def any_api_key(self, conn: Any) -> bool:
        return conn.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def revoke_api_key(self, conn: Any, name: str, now: float) -> bool:
        """Revoke a key by name; False when no unrevoked key has that name."""
        cursor = conn.execute(
            self._sql("UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL"),
            (now, name),
        )
        return bool(cursor.rowcount)

    def touch_api_keys(self, conn: Any, used: Sequence[tuple[float, str]]) -> None:
        """Record (last used, digest) pairs; a later time never goes back."""
        conn.cursor().executemany(
            self._sql(
                "UPDATE api_keys SET last_used = ? WHERE digest = ? "
                "AND (last_used IS NULL OR last_used < ?)"
            ),
            [(when, digest, when) for when, digest in sorted(used, key=lambda pair: pair[1])],
        )

    def check_readable(self, *, main_only: bool = False) -> None:
        pass  # a database server's tables cannot vanish under an open connection

    def change_stamp(self, conn: Any) -> Hashable:
        # PostgreSQL has no cheap, exact counter of this database's commits (tells_changes
        # is False, so this is never asked): its answers expire at the read cache's ttl.
        raise NotImplementedError("this backend cannot tell whether its store changed")

    def ping(self, conn: Any) -> None:
        conn.execute("SELECT 1 FROM meta LIMIT 1").fetchall()

    def close(self, conn: Any) -> None:
        conn.close()

    def deadline(self, *, write: bool) -> float | None:
        return None  # a file's operations end by themselves (busy_timeout bounds locks)

    def interrupt(self, conn: Any) -> None:
        raise NotImplementedError("only operations with a deadline are interrupted")

    def read_meta(
        self, conn: Any, bucket: int, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Inside the schema transaction: the stored settings, recording them (and
        ``extra``) if new."""
        stored = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        if not stored:
            settings = {"bucket_seconds": str(bucket), "schema_version": SCHEMA_VERSION}
            conn.cursor().executemany(
                self._sql("INSERT INTO meta (name, value) VALUES (?, ?)"),
                list({**settings, **(extra or {})}.items()),
            )
        return stored

    def record_tiers(self, conn: Any, stored: dict[str, str], where: str) -> None:
        """Inside the schema transaction, once ``stored`` (the meta read) passed
        :func:`check_meta`: refuse tiers whose widths differ from the recorded ones
        (ConfigError naming both), else record the declared tiers (new horizons)."""
        recorded = parse_tiers(stored.get("tiers", "none"))
        trouble = changed(recorded, self.tiers)
        if trouble is not None:
            raise ConfigError(
                f"the store at {where}: {trouble}; start with --tiers '{recorded}', or "
                "use a new --db"
            )
        if self.tiers is None:
            return
        # The marks' rows exist before any flush or roll: they are what those lock.
        conn.cursor().executemany(
            self._sql("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"),
            [(f"rolled_{index}", "0") for index in range(len(self.tiers) - 1)],
        )
        if str(self.tiers) != stored.get("tiers"):
            conn.execute(
                self._sql(
                    "INSERT INTO meta (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                ("tiers", str(self.tiers)),
            )


def _whole_buckets(
    records: list[Any], finest: int, fits: Callable[[int, int], bool] | None
) -> list[Any]:
    """Records of tiers (their width last) without it, once every record of a coarse
    tier ``fits`` (its bucket, its width) in one answer bucket; raises
    :class:`~trioagg.store.base.TierCut` for the first that does not."""
    if fits is not None:
        for record in records:
            width = record[-1]
            if width > finest and not fits(record[1], width):
                raise TierCut(record[1], width)
    return [record[:-1] for record in records]


def check_meta(stored: dict[str, str], bucket: int, where: str) -> None:
    """Raise ConfigError when an existing store was made with other settings."""
    if not stored:
        return
    if stored.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(
            f"the store at {where} has schema version {stored.get('schema_version')!r}; "
            f"this trioagg reads version {SCHEMA_VERSION}"
        )
    stored_bucket = int(stored["bucket_seconds"])
    if stored_bucket != bucket:
        raise ConfigError(
            f"the store at {where} was created with {BUCKET_NAMES.get(stored_bucket)} buckets, "
            f"but --bucket is {BUCKET_NAMES.get(bucket)}; start with --bucket "
            f"{BUCKET_NAMES.get(stored_bucket)} or use a new --db"
        )
