"""The embedded SQLite store: its schema, shard files, connections and transactions.

The statements are shared with PostgreSQL (:mod:`trioagg.store.sql`). WAL mode
lets readers run beside the writer; ``synchronous`` is FULL by default (a
commit survives power loss) or NORMAL (a process crash only). Several
processes may share the files: SQLite serializes their transactions on each
file, and a locked database is "busy" for :class:`~trioagg.store.base.Store`
to retry.

**Shards**: a store made with ``--writers N`` is N files, one per writer, so
that N writers commit in parallel: the main file (``--db``, shard 0) and
``<db>-shard1`` ... ``<db>-shard<N-1>``. Writer ``i`` owns the buckets where
``bucket_hour % N == i`` and writes their rollups, series spans and event ids
in shard ``i`` alone, so a bucket lives in exactly one file. Every file has
the shard tables (:data:`_SHARD_SCHEMA`) and a ``meta`` table recording the
bucket width, N and its own number; tables the store needs once live in the
main file only (:data:`_MAIN_SCHEMA`). The main file's ``meta`` is the record
of the store: its shard files are created in the transaction that creates it,
and an existing store opens only with the N it was made with. Read connections
open the main file and ``ATTACH`` the others, and read through ``TEMP`` views
that ``UNION ALL`` the shards' tables.

**Tiers** (``--tiers``): every shard file has each coarser tier's table and its
own rolled marks in its ``meta``, and is rolled on its writer's connection, so a
wider bucket may have a row in each shard that held some of its hours; reads
merge them. The declared tiers are recorded in the main file only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import sqlite3
import time
from collections.abc import Hashable, Sequence
from typing import Any

from ..core.errors import ConfigError, StoreCannotOpen
from ..core.tiers import Tiers
from .sql import KEYS_TABLE, LAST_COLUMNS, SQLBackend, check_meta

_META = """CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID"""

#: The tables of the main file only: the store's settings (and what a store holds once).
_MAIN_SCHEMA = [_META, KEYS_TABLE]

#: The tables every shard file has, the main file included: what a writer writes.
_SHARD_SCHEMA = [
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
        last_value REAL,
        last_ts REAL,
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
    # Batches committed and not flushed yet (see trioagg.store.head); AUTOINCREMENT so
    # that a sequence number is never reused, even once the table was emptied.
    """CREATE TABLE IF NOT EXISTS journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        owner TEXT NOT NULL,
        events INTEGER NOT NULL,
        batch BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS journal_by_owner ON journal (owner, seq)",
    # Rollups the rollups table refused at a flush (a stored row that cannot take a
    # merge), kept rather than lost: the same columns, and when.
    """CREATE TABLE IF NOT EXISTS refused_rollups (
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
        refused_at REAL NOT NULL,
        last_value REAL,
        last_ts REAL
    )""",
]

#: What the shard tables read as on a read connection of a store of several shards.
_SHARD_VIEWS = {"rollups": "all_rollups", "series": "all_series"}

# Short on purpose: waiting on a lock happens in Store.write's backoff loop,
# where it is cancellable, not inside a worker thread.
_LOCK_WAIT_SECONDS = 0.2
_LOCK_POLL_SECONDS = 0.0005

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


class _Connection(sqlite3.Connection):
    """A connection that knows its file, and for writing, the file it opened."""

    path = ""
    #: (device, inode) of the file a write connection opened: see :meth:`SQLiteBackend.begin`.
    identity: tuple[int, int] | None = None


def shard_path(path: str, shard: int) -> str:
    """The file of shard ``shard`` of the store whose main file is ``path``."""
    return path if shard == 0 else f"{path}-shard{shard}"


#: A read connection attaches every shard file but its own, and SQLite attaches at most
#: 10 databases to a connection (SQLITE_MAX_ATTACHED, as Debian and CPython build it).
MAX_SHARDS = 11


class SQLiteBackend(SQLBackend):
    """SQLite in WAL mode over ``shards`` files; ``sync`` is ``"full"`` or ``"normal"``."""

    tells_changes = True

    def __init__(
        self, path: str, sync: str = "full", shards: int = 1, tiers: Tiers | None = None
    ) -> None:
        if shards > MAX_SHARDS:
            # Refused before any file exists: a store made with more could never be read.
            raise ConfigError(
                f"--writers is {shards}, but a SQLite store has at most {MAX_SHARDS} shard "
                f"files (SQLite attaches at most {MAX_SHARDS - 1} databases to the one that "
                f"reads them): use --writers {MAX_SHARDS} or fewer, or a postgresql:// --db"
            )
        super().__init__(tiers)
        self.path = path
        self.sync = sync
        self.shards = shards
        if shards > 1 or tiers is not None:
            self.tables = _SHARD_VIEWS
        files = f", {shards} shard files" if shards > 1 else ""
        #: (device, inode) of each shard file once the store is prepared, for the reads.
        self._identities: list[tuple[int, int] | None] = []
        #: Lock files of this process's journal owners (held shared while it lives), and
        #: of dead owners whose journal it replays (held exclusively meanwhile).
        self._held: dict[str, int] = {}
        self._taken: dict[str, int] = {}
        self.description = f"sqlite {path} (synchronous={sync}{files})"

    def connect(self, *, write: bool, shard: int = 0) -> sqlite3.Connection:
        path = shard_path(self.path, shard)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise StoreCannotOpen(self.description, f"{folder} does not exist")
        # Only the main file's write connection creates its file (shard files are created
        # with the store, in prepare). A read connection never creates one: opened after a
        # file was deleted, it fails (SQLITE_CANTOPEN, an outage) instead of reading, or
        # writing, a new empty database.
        mode = "rwc" if write and shard == 0 else "rw" if write else "ro"
        conn = sqlite3.connect(
            _uri(path, mode),
            isolation_level=None,
            check_same_thread=False,
            timeout=_LOCK_WAIT_SECONDS,
            uri=True,
            factory=_Connection,
        )
        conn.path = path
        if write:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
            conn.execute("PRAGMA busy_timeout=0")  # begin() waits for the lock itself
            conn.identity = _file_identity(path)
            return conn
        for other in range(1, self.shards):
            where = _uri(shard_path(path, other), "ro")
            conn.execute(f"ATTACH DATABASE ? AS {_schema(other)}", (where,))
        if self.shards > 1 or self.tiers is not None:
            # Every shard's series, and every shard's rows of every tier.
            shards = [_schema(other) for other in range(self.shards)]
            series = " UNION ALL ".join(f"SELECT * FROM {schema}.series" for schema in shards)
            conn.execute(f"CREATE TEMP VIEW {_SHARD_VIEWS['series']} AS {series}")
            tables = [
                (f"{schema}.{table}", width)
                for schema in shards
                for table, width in self._tier_tables()
            ]
            rows = self.union_of_tiers(tables)
            conn.execute(f"CREATE TEMP VIEW {_SHARD_VIEWS['rollups']} AS {rows}")
        conn.execute("PRAGMA query_only=ON")
        return conn

    def exists(self) -> bool:
        if not os.path.isfile(self.path):
            return False
        # The main file alone, read-only: a file that holds no meta table (empty, or some
        # other database) is no store, and stays as it is.
        conn = sqlite3.connect(_uri(self.path, "ro"), uri=True, timeout=_LOCK_WAIT_SECONDS)
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
        finally:
            conn.close()
        return found is not None

    def prepare(self, conn: sqlite3.Connection, bucket: int) -> None:
        """Create or check the main file; a new store's shard files are created in the
        same transaction, under the main file's lock, so that processes starting
        together wait for the whole store to exist, and an existing store's shard
        files are checked (never created: a missing one would read as empty). Every
        file made before ``last`` existed gets its columns."""
        self.bucket = bucket
        # SQLite's limit is set when it is built (999 before 3.32, 32,766 since).
        self.max_parameters = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.begin(conn)
        try:
            stored = self._prepare_file(conn, _MAIN_SCHEMA, bucket, 0)
            self._check_shards(stored, bucket, 0)
            self.record_tiers(conn, stored, self.path)
            for shard in range(1, self.shards):
                self._prepare_shard(shard, bucket, new=not stored)
            self.commit(conn)
        except BaseException:
            self.rollback(conn)
            raise
        self._identities = [
            _file_identity(shard_path(self.path, shard)) for shard in range(self.shards)
        ]

    def _prepare_shard(self, shard: int, bucket: int, *, new: bool) -> None:
        path = shard_path(self.path, shard)
        if not new and not os.path.exists(path):
            raise ConfigError(
                f"the store at {self.path} has {self.shards} shard files, but {path} is "
                "missing: restore it with the others from the same backup"
            )
        conn = sqlite3.connect(path, isolation_level=None, timeout=_LOCK_WAIT_SECONDS)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored = self._prepare_file(conn, [_META], bucket, shard)
                # A shard file left by a creation that crashed before its main file
                # committed is empty; one with data belongs to a store whose main file
                # is gone, and must not join a new one.
                held = "SELECT 1 FROM rollups UNION ALL SELECT 1 FROM journal LIMIT 1"
                if new and conn.execute(held).fetchall():
                    raise ConfigError(
                        f"{path} holds data of another store (its main file {self.path} "
                        "is new): move it away, or restore that store's main file"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()
        self._check_shards(stored, bucket, shard)

    def _prepare_file(
        self, conn: sqlite3.Connection, schema: Sequence[str], bucket: int, shard: int
    ) -> dict[str, str]:
        """Inside the file's transaction: create its tables; its meta as it was."""
        for statement in [*schema, *_SHARD_SCHEMA, *self._tier_schema()]:
            conn.execute(statement)
        for table in ("rollups", "refused_rollups"):  # a file made before last existed
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for column in LAST_COLUMNS:
                if column not in present:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} REAL")
        return self.read_meta(conn, bucket, {"shards": str(self.shards), "shard": str(shard)})

    def _tier_tables(self) -> list[tuple[str, int]]:
        """Every tier's table and width: ``rollups`` alone without tiers."""
        tiers = self.tiers
        if tiers is None:
            return [("rollups", self.bucket)]
        return [(tiers.table(i), tiers.tiers[i].width) for i in range(len(tiers))]

    def _tier_schema(self) -> list[str]:
        """The tables of the coarser tiers: rollups' columns, and its index by bucket."""
        rollups, by_bucket = _SHARD_SCHEMA[0], _SHARD_SCHEMA[1]
        return [
            statement
            for table, _ in self._tier_tables()[1:]
            for statement in (
                rollups.replace("EXISTS rollups (", f"EXISTS {table} ("),
                by_bucket.replace("rollups_by_bucket ON rollups", f"{table}_by_bucket ON {table}"),
            )
        ]

    def _check_shards(self, stored: dict[str, str], bucket: int, shard: int) -> None:
        path = shard_path(self.path, shard)
        check_meta(stored, bucket, path)
        if not stored:
            return
        # Stores made before shards existed record neither: one file, shard 0.
        shards, number = int(stored.get("shards", "1")), int(stored.get("shard", "0"))
        if shard == 0 and shards != self.shards:
            raise ConfigError(
                f"the store at {path} was created with --writers {shards} ({shards} shard "
                f"file(s), each writer owning its hours), but --writers is {self.shards}; "
                f"start with --writers {shards} or use a new --db"
            )
        if (shards, number) != (self.shards, shard):
            raise ConfigError(
                f"{path} is shard {number} of {shards} of another store, not shard {shard} "
                f"of {self.shards} of {self.path}"
            )

    # -- Leases: a lock file per journal owner in <db>-owners/, held with flock(2) by the
    # process that owns it (shared) for as long as it lives. The kernel releases it when
    # the process dies, however it dies: a process that can lock it exclusively knows
    # its owner dead. (flock, not fcntl locks: SQLite's own fcntl locks on other files
    # are unaffected, and a lock belongs to its open file, not to the whole process.)

    def _lease_path(self, owner: str) -> str:
        return os.path.join(f"{self.path}-owners", owner.replace("/", "-") + ".lock")

    def hold_leases(self, owners: Sequence[str]) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(f"{self.path}-owners")  # beside the store's file, never its folder
        for owner in owners:
            fd = os.open(self._lease_path(owner), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._held[owner] = fd

    def end_leases(self) -> None:
        for owner, fd in list(self._held.items()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lease_path(owner))
            os.close(fd)
            del self._held[owner]

    def take_lease(self, conn: Any, owner: str) -> bool:
        try:
            fd = os.open(self._lease_path(owner), os.O_RDWR)
        except FileNotFoundError:
            return True  # removed by a process that replayed it: whatever is left is ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._taken[owner] = fd
        return True

    def drop_lease(self, conn: Any, owner: str, replayed: bool) -> None:
        fd = self._taken.pop(owner, None)
        if fd is None:
            return
        if replayed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lease_path(owner))
        os.close(fd)

    def change_stamp(self, conn: Any) -> Hashable:
        # PRAGMA data_version changes on a connection when any other connection, this
        # process's writers included, has committed a change to that file since.
        return tuple(
            conn.execute(f"PRAGMA {_schema(shard)}.data_version").fetchone()[0]
            for shard in range(self.shards)
        )

    def journal_owners(self, conn: Any) -> list[str]:
        """The owners with rows in this shard's journal, and the dead owners of this
        shard whose lock file is left (a process killed with nothing unflushed), so that
        their files are removed too."""
        owners = set(super().journal_owners(conn))
        shard = next(s for s in range(self.shards) if shard_path(self.path, s) == conn.path)
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(f"{self.path}-owners"):
                process, _, rest = name.partition("-")
                if rest == f"{shard}.lock":
                    owners.add(f"{process}/{shard}")
        return sorted(owners)

    def begin(self, conn: Any) -> None:
        # Only for write connections; a stat per transaction costs microseconds.
        if conn.identity is not None and _file_identity(conn.path) != conn.identity:
            raise DatabaseFileGone(conn.path)
        # SQLite's own wait for a lock sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 ms
        # between tries: a writer of another process holding the lock for 3 ms was waited
        # for 25 ms and more. Tries every _LOCK_POLL_SECONDS take it within a poll.
        waited = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if not self.is_busy(error) or time.monotonic() >= waited:
                    raise
            time.sleep(_LOCK_POLL_SECONDS)

    def check_readable(self, *, main_only: bool = False) -> None:
        # Before every read (a stat per file: microseconds): a read connection opened
        # before a file was deleted or replaced would go on reading the old one. The API
        # keys live in the main file only, so their look-ups check it alone: a lost shard
        # file must not stop ingest into the healthy shards.
        identities = self._identities[:1] if main_only else self._identities
        for shard, identity in enumerate(identities):
            path = shard_path(self.path, shard)
            if _file_identity(path) != identity:
                raise DatabaseFileGone(path)

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


def _uri(path: str, mode: str) -> str:
    return f"{pathlib.Path(path).absolute().as_uri()}?mode={mode}"


def _schema(shard: int) -> str:
    """The name a read connection gives the file of ``shard``."""
    return "main" if shard == 0 else f"shard{shard}"


def _file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None where it does not exist."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino
