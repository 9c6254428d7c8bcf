"""Fixtures: real trioagg servers (hypercorn on loopback) over real stores.

``start_server`` runs the app in this process on hypercorn's trio worker, as
``trioagg serve`` does, and stops it gracefully after the test. It runs every
test that uses it twice: on a fresh SQLite file and on a fresh schema of a
real PostgreSQL server (see :func:`postgres_dsn` for how one is found).
``ServerProcess`` runs ``python -m trioagg serve`` as a child process, for
tests of signals, crashes, restarts and several processes sharing a store.

Collection marks ``slow`` the tests that start processes (``just test-fast`` leaves
them out) and ``wall_clock`` those of the modules that take times from
:mod:`tests.clock`; ``--store sqlite`` (or another) keeps the tests of one store.
"""

from __future__ import annotations

import collections
import compileall
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioagg.app import create_app
from trioagg.core.settings import Settings
from trioagg.http.app import TrioaggApp
from trioagg.keys.auth import is_loopback
from trioagg.server.serving import run_server
from trioagg.store.head import decode_batch

from . import clock

#: The SQLite store of two shard files (``--writers 2``), as ``db_url``'s parameter.
SHARDED = "sqlite-2-shards"
#: Every parameter of ``db_url`` (what ``--store`` chooses from).
STORES = ("sqlite", SHARDED, "postgres")
#: Fixtures that start processes of their own (servers, Python programs, PostgreSQL
#: clusters, a browser): the tests that use them are ``slow``, which ``just test-fast``
#: leaves out.
SLOW_FIXTURES = frozenset({"server_process", "start_program", "own_postgres", "browser"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store",
        action="append",
        choices=STORES,
        help="run the tests that take a store (db_url) on this one only; may be repeated "
        "(default: every store each test asks for)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's modules to bytecode once, in the controlling process.

    Where bytecode is not written (``PYTHONDONTWRITEBYTECODE``, as on this project's
    machine) every Python process the suite starts (each ``trioagg serve``, program,
    bench peer, xdist worker and faketime run) compiled trioagg's 16,000 lines again:
    0.3 s of CPU of the ~1 s each of ~200 processes pays to start. Processes read
    bytecode that exists whatever that variable says; ``compileall`` writes it into
    the ``__pycache__`` folders git ignores, and rewrites a module only once its source
    changed (a stale file is never read: Python checks the source's time and size).
    """
    if hasattr(config, "workerinput"):  # an xdist worker: its controller did it
        return
    root = Path(__file__).resolve().parent.parent
    for package in ("trioagg", "tests", "bench"):
        compileall.compile_dir(root / package, quiet=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``slow`` the tests that use :data:`SLOW_FIXTURES`, and ``wall_clock`` those of
    the modules that take times from :mod:`tests.clock`; with ``--store``, leave out the
    tests of the other stores."""
    stores = config.getoption("store")
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if getattr(getattr(item, "module", None), "clock", None) is clock:
            item.add_marker(pytest.mark.wall_clock)
        callspec = getattr(item, "callspec", None)
        store = callspec.params.get("db_url") if callspec is not None else None
        (left_out if stores and store is not None and store not in stores else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@dataclass
class Server:
    """A running in-process server and a client pointed at it."""

    url: str
    app: TrioaggApp
    client: httpx.AsyncClient
    stop: trio.Event
    stopped: trio.Event

    @property
    def db(self) -> str:
        return self.app.settings.db

    async def shutdown(self) -> None:
        """Graceful shutdown, as SIGTERM would do it."""
        self.stop.set()
        await self.stopped.wait()


StartServer = Callable[..., Awaitable[Server]]


class PostgresCluster:
    """A throwaway PostgreSQL cluster of our own, which tests may stop and restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.bin = _postgres_bin()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, capture_output=True, check=True, timeout=60)

    def create(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        # --no-sync: initdb's closing fsync of every file it wrote guards against the
        # machine crashing, which a throwaway cluster does not outlive anyway. The
        # cluster itself runs with PostgreSQL's defaults (fsync on).
        self._run("initdb", "--no-sync", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        return self.start()

    def start(self) -> PostgresCluster:
        options = f"-p {self.port} -k {self.folder} -h 127.0.0.1"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.folder / "log"),
            "-o",
            options,
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def processes(self) -> list[int]:
        """The postmaster's process id, then those of its children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it has just exited
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:  # field 4: the parent
                children.append(int(entry.name))
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP every process of the cluster: a server hung, not down. Its kernel still
        accepts connections and acknowledges what is sent, so nothing fails by itself."""
        for pid in self.processes():  # the postmaster first: it starts no child then
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in reversed(self.processes()):
            os.kill(pid, signal.SIGCONT)


def _postgres_bin() -> Path:
    found = shutil.which("pg_ctl")
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:  # Debian keeps the real binaries here
        if (folder / "pg_ctl").exists() and (folder / "initdb").exists():
            return folder
    if found:
        return Path(found).parent
    raise FileNotFoundError("no PostgreSQL binaries (initdb, pg_ctl)")


def _can_make_clusters() -> bool:
    try:
        _postgres_bin()
    except FileNotFoundError:
        return False
    if os.geteuid() == 0:
        return shutil.which("runuser") is not None and _user_exists("postgres")
    return True


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


NO_POSTGRES = (
    "NO POSTGRESQL: set TRIOAGG_TEST_PG=postgresql://... or install PostgreSQL "
    "(initdb, pg_ctl) so that the PostgreSQL store can be tested"
)


def _cluster_folder() -> Path:
    # Not under pytest's tmp_path: as root, the cluster runs as the postgres user,
    # who cannot enter root's private pytest folders.
    return Path(tempfile.mkdtemp(prefix="trioagg-pg-"))


def _no_postgres(reason: str) -> None:
    """Skip loudly; fail where PostgreSQL is required (CI sets TRIOAGG_REQUIRE_PG=1)."""
    if os.environ.get("TRIOAGG_REQUIRE_PG"):
        pytest.fail(reason + " (TRIOAGG_REQUIRE_PG is set)")
    pytest.skip(reason)


NO_BROWSER = (
    "NO BROWSER: install Debian's chromium (apt-get install chromium) and playwright "
    "(pip install -e '.[test]'), or point TRIOAGG_CHROMIUM at a Chromium, so that the "
    "dashboard can be tested"
)


def _no_browser(reason: str) -> None:
    """Skip loudly; fail where the browser is required (CI sets TRIOAGG_REQUIRE_BROWSER=1)."""
    if os.environ.get("TRIOAGG_REQUIRE_BROWSER"):
        pytest.fail(reason + " (TRIOAGG_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium from the system's packages (``TRIOAGG_CHROMIUM``, else
    ``chromium`` on the PATH), driven by Playwright; never a downloaded browser."""
    executable = os.environ.get("TRIOAGG_CHROMIUM") or shutil.which("chromium")
    if not executable or not os.access(executable, os.X_OK):
        _no_browser(NO_BROWSER + f" (no chromium found: {executable or 'not on the PATH'})")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser(NO_BROWSER + " (playwright is not installed)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, for stopping and restarting it."""
    if not _can_make_clusters():
        _no_postgres(NO_POSTGRES + " (this test restarts a cluster of its own)")
    cluster = PostgresCluster(_cluster_folder()).create()
    yield cluster
    with contextlib.suppress(subprocess.CalledProcessError):
        cluster.stop("immediate")
    shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A PostgreSQL server: ``TRIOAGG_TEST_PG`` (a DSN), else one on the usual local
    port, else a throwaway cluster made with ``initdb`` and ``pg_ctl``; else skip."""
    dsn = os.environ.get("TRIOAGG_TEST_PG")
    if dsn:
        yield dsn
        return
    local = "postgresql://127.0.0.1:5432/test"
    if _postgres_answers(local):
        yield local
        return
    if not _can_make_clusters():
        _no_postgres(NO_POSTGRES)
    cluster = PostgresCluster(_cluster_folder()).create()
    yield cluster.dsn
    cluster.stop("immediate")
    shutil.rmtree(cluster.folder, ignore_errors=True)


def _postgres_answers(dsn: str) -> bool:
    import psycopg

    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def fresh_schema(dsn: str) -> tuple[str, str]:
    """Create a schema of its own; return (its name, a DSN that uses it)."""
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in dsn else "?"
    return schema, f"{dsn}{separator}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def schema_of_its_own(dsn: str) -> Iterator[str]:
    """A DSN whose schema is fresh (:func:`fresh_schema`), dropped at the end."""
    import psycopg

    schema, url = fresh_schema(dsn)
    try:
        yield url
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


class StoreUrl(str):
    """A store's ``--db``, with the flags its servers start with by default."""

    flags: dict[str, str]

    def __new__(cls, url: str, **flags: str) -> StoreUrl:
        made = super().__new__(cls, url)
        made.flags = flags
        return made


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store: a SQLite file, or a PostgreSQL schema of its own; or, where
    a test asks for :data:`SHARDED`, a SQLite store of two shard files."""
    if request.param in ("sqlite", SHARDED):
        writers = {"writers": "2"} if request.param == SHARDED else {}
        yield StoreUrl(str(tmp_path / "trioagg.db"), **writers)
        return
    with schema_of_its_own(request.getfixturevalue("postgres_dsn")) as url:
        yield url


@pytest.fixture
async def start_server(db_url: str, nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    """Start servers with settings given as flag text: ``await start_server(bucket="5m")``."""
    servers: list[Server] = []

    async def start(**settings: str) -> Server:
        values = {"db": db_url, "port": "0", "log_level": "warning"}
        values.update(getattr(db_url, "flags", {}))
        values.update(settings)
        app = create_app(Settings.from_text(values))
        stop, stopped = trio.Event(), trio.Event()

        async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await run_server(app, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        (url,) = await nursery.start(serve)
        client = httpx.AsyncClient(base_url=url, timeout=30)
        server = Server(url, app, client, stop, stopped)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.client.aclose()
        await server.shutdown()


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    """A server with default settings on a fresh store."""
    return await start_server()


def assert_envelope(body: dict[str, Any], code: str) -> None:
    """``body`` is the error envelope, ``{"error": {"code", "message", "details"}}``."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def post(client: httpx.AsyncClient, body: Any, **params: str) -> Awaitable[httpx.Response]:
    """POST /v1/events with a JSON body."""
    return client.post("/v1/events", json=body, params=params)


def shard_files(db: str | Path) -> list[Path]:
    """The files of a SQLite store: the main file, then its shard files in order."""
    main = Path(db)
    numbers = [
        int(found.name.rsplit("-shard", 1)[1])
        for found in main.parent.glob(f"{main.name}-shard*")
        if re.fullmatch(r"\d+", found.name.rsplit("-shard", 1)[1])
    ]
    return [main, *(Path(f"{main}-shard{number}") for number in sorted(numbers))]


def sql(db: str | Path, query: str) -> list[tuple[Any, ...]]:
    """Rows of ``query``, read straight from a store (SQLite file or PostgreSQL URL).
    On a SQLite store of several shard files, its tables read as the union of every
    shard's (``TEMP`` views of the same names, which come first in name lookup)."""
    (rows,) = sql_snapshot(db, query)
    return rows


def sql_snapshot(db: str | Path, *queries: str) -> list[list[tuple[Any, ...]]]:
    """The rows of each of ``queries``, all read from one snapshot of the store (so
    that a flush moving rows from the journal to the rollups table meanwhile is seen
    entirely or not at all)."""
    if str(db).startswith("postgresql://"):
        import psycopg

        with psycopg.connect(str(db)) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return [[tuple(row) for row in conn.execute(q).fetchall()] for q in queries]
    files = shard_files(db)
    with contextlib.closing(sqlite3.connect(files[0], isolation_level=None)) as conn:
        if len(files) > 1:
            for number, path in enumerate(files[1:], start=1):
                conn.execute(f"ATTACH DATABASE ? AS shard{number}", (str(path),))
            for table in ("rollups", "series", "event_ids", "journal"):
                arms = [f"SELECT * FROM shard{n}.{table}" for n in range(1, len(files))]
                union = " UNION ALL ".join([f"SELECT * FROM main.{table}", *arms])
                conn.execute(f"CREATE TEMP VIEW {table} AS {union}")
        conn.execute("BEGIN")  # the first read fixes the snapshot of every file
        try:
            return [conn.execute(query).fetchall() for query in queries]
        finally:
            conn.execute("ROLLBACK")


def stored_counts(db: str | Path) -> dict[str, int]:
    """Events stored per key, read straight from the store: in the rollups table, and in
    journal rows not flushed yet (durable all the same)."""
    counts: collections.Counter[str] = collections.Counter()
    table, journal = sql_snapshot(
        db, "SELECT key, sum(count) FROM rollups GROUP BY key", "SELECT batch FROM journal"
    )
    for key, count in table:
        counts[key] += int(count)
    for (blob,) in journal:
        counts.update(event[0] for event in decode_batch(bytes(blob)))
    return dict(counts)


def stored_series(db: str | Path) -> list[tuple[str, str, int, int]]:
    """The keys index as the store holds it: the series table, widened by the events of
    journal rows not flushed yet (which the next flush adds to it)."""
    meta, series, journal = sql_snapshot(
        db,
        "SELECT value FROM meta WHERE name = 'bucket_seconds'",
        "SELECT key, tags, first_bucket, last_bucket FROM series",
        "SELECT batch FROM journal",
    )
    width = int(meta[0][0])
    spans: dict[tuple[str, str], tuple[int, int]] = {}
    for key, tags, first, last in series:
        known = spans.get((key, tags), (first, last))
        spans[(key, tags)] = (min(known[0], first), max(known[1], last))
    for (blob,) in journal:
        for key, ts, _, tags, *_ in decode_batch(bytes(blob)):
            bucket = int(ts // width) * width
            known = spans.get((key, tags), (bucket, bucket))
            spans[(key, tags)] = (min(known[0], bucket), max(known[1], bucket))
    return sorted((key, tags, first, last) for (key, tags), (first, last) in spans.items())


class ServerProcess:
    """``python -m trioagg serve`` in a child process, on a free port. Its stderr goes
    to a file, never to a pipe: a pipe nobody reads fills up and stops the server."""

    def __init__(self, db: str | Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.args = ["--db", str(db), "--port", "0", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._log: Path | None = None
        self._kept = ""  # the log once the process has exited and its file is gone

    def start(
        self, command: list[str] | None = None, timeout: float = 60, cwd: Path | None = None
    ) -> ServerProcess:
        """Start (in ``cwd``, by default this process's) and wait until it listens (or
        exits)."""
        command = command or [sys.executable, "-m", "trioagg", "serve", *self.args]
        descriptor, name = tempfile.mkstemp(prefix="trioagg-server-", suffix=".log")
        self._log = Path(name)
        with os.fdopen(descriptor, "w") as sink:
            self.proc = subprocess.Popen(
                command, stderr=sink, stdout=subprocess.DEVNULL, text=True, env=self.env, cwd=cwd
            )
        self.wait_for("Running on", timeout=timeout)
        match = re.search(r"Running on (https?://[\d.]+:\d+)", self.output)
        self.url = match[1] if match else ""
        return self

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> None:
        """Until the log holds ``text`` ``count`` times, the process exits or ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.output.count(text) < count and self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in the server's log: {self.output}")
            time.sleep(0.02)

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the exit, keep the log and delete its file."""
        assert self.proc is not None
        self.proc.wait(timeout)
        self.discard_log()
        return self.proc.returncode

    def stop(self) -> int:
        self.send_signal(signal.SIGTERM)
        return self.wait()

    def discard_log(self) -> None:
        if self._log is not None:
            self._kept = self.output
            self._log.unlink(missing_ok=True)
            self._log = None

    @property
    def output(self) -> str:
        if self._log is None:
            return self._kept
        return self._log.read_text(errors="replace")


@pytest.fixture
def server_process(tmp_path: Path) -> Any:
    """A factory of child-process servers, all killed after the test."""
    started: list[ServerProcess] = []

    def make(
        *args: str, db: Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        process = ServerProcess(db or tmp_path / "trioagg.db", *args, env=env)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
        process.discard_log()


@pytest.fixture
def hold_write_lock() -> Any:
    """Lock a store against writes from another connection, so commits wait: SQLite's
    write lock, or PostgreSQL's EXCLUSIVE table locks (reads still go through)."""

    class Lock:
        def __init__(self) -> None:
            self.conn: Any = None

        def acquire(self, db: str | Path) -> None:
            if str(db).startswith("postgresql://"):
                import psycopg

                self.conn = psycopg.connect(str(db), autocommit=True)
                self.conn.execute("BEGIN")
                self.conn.execute(
                    "LOCK TABLE rollups, series, event_ids, journal IN EXCLUSIVE MODE"
                )
            else:  # BEGIN IMMEDIATE takes the write lock of every attached file too
                self.conn = sqlite3.connect(db, isolation_level=None)
                for number, path in enumerate(shard_files(db)[1:], start=1):
                    self.conn.execute(f"ATTACH DATABASE ? AS shard{number}", (str(path),))
                self.conn.execute("BEGIN IMMEDIATE")

        def release(self) -> None:
            if self.conn is not None:
                self.conn.execute("ROLLBACK")
                self.conn.close()
                self.conn = None

    lock = Lock()
    yield lock
    lock.release()


def public_address() -> str:
    """An address of this machine that is not loopback (skip where there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError as error:
            pytest.skip(f"no non-loopback address to reach the server on: {error}")
        address: str = probe.getsockname()[0]
    if is_loopback(address):
        pytest.skip("no non-loopback address to reach the server on")
    return address


async def wait_until(predicate: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def metric(server: Any, name: str, **labels: str) -> float:
    return sample_of((await server.client.get("/metrics")).text, name, **labels)


def process_metric(url: str, name: str, **labels: str) -> float:
    """A sample of a server process's /metrics (with ``--workers``, every worker's sum)."""
    with httpx.Client(base_url=url, timeout=10) as client:
        return sample_of(client.get("/metrics").text, name, **labels)


def sample_of(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def ascii_characters(size: int) -> str:
    return "x" * size


def tags_of_json_bytes(size: int, make: Callable[[int], str] = ascii_characters) -> dict[str, str]:
    """Tags whose compact JSON has exactly ``size`` bytes, of values of up to 255 bytes
    made by ``make(bytes)``."""
    tags: dict[str, str] = {}
    for number in range(16):
        name = f"t{number:02}"
        tags[name] = "y"
        left = size - len(json.dumps(tags, separators=(",", ":"), ensure_ascii=False).encode())
        tags[name] = make(min(left + 1, 255))
        if left + 1 <= 255:
            return tags
    raise AssertionError(f"{size} bytes of tags do not fit in 16 tags")


def assert_store_holds(db: str | Path, expected: dict[str, int]) -> None:
    """The store holds exactly ``expected`` events per key, and every SQLite file is sound."""
    assert stored_counts(db) == expected
    if not str(db).startswith("postgresql://"):
        for path in shard_files(db):
            assert sql(path, "PRAGMA integrity_check") == [("ok",)]


class Ledger:
    """What clients sent and were told: requests of ``size`` events, each with an id
    (unless ``ids`` is False), and which of them were answered 200. Sent again until
    answered 200, every request must be counted exactly once: :meth:`expected` is then
    what the store must hold."""

    def __init__(self, size: int = 3, hours: int = 1, *, ids: bool = True) -> None:
        self.size = size
        #: Events of a request spread over this many past hours (with ``hours`` > 1, a
        #: request spans the writers of a sharded store, atomic per writer only).
        self.hours = hours
        #: Without ids, a request sent again may count twice: it is not to be resent, and
        #: only :meth:`counts` of the acknowledged and of the unacknowledged ones tell
        #: what the store may hold.
        self.ids = ids
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        self.acknowledged: set[str] = set()
        self.statuses: dict[int, int] = {}

    def new(self, key: str) -> str:
        request = f"{key}-{len(self.bodies)}"
        self.bodies[request] = [{"key": key} for _ in range(self.size)]
        if self.ids:
            for j, event in enumerate(self.bodies[request]):
                event["id"] = f"{request}-{j}"
        if self.hours > 1:
            first = clock.whole_hours_ago(self.hours)
            for j, event in enumerate(self.bodies[request]):
                event["ts"] = first + (j % self.hours) * clock.HOUR
        return request

    async def send(self, client: httpx.AsyncClient, request: str) -> httpx.Response:
        """POST one request durably; a 200 must count all its events or none (a retry)."""
        response = await client.post("/v1/events", json=self.bodies[request])
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            whole = (0, self.size) if self.hours == 1 else range(self.size + 1)
            assert response.json()["duplicates"] in whole, response.text
            self.acknowledged.add(request)
        return response

    def unacknowledged(self) -> list[str]:
        return [request for request in self.bodies if request not in self.acknowledged]

    def counts(self, requests: Iterable[str]) -> dict[str, int]:
        """Events per key of ``requests``."""
        counts: dict[str, int] = {}
        for request in requests:
            body = self.bodies[request]
            counts[body[0]["key"]] = counts.get(body[0]["key"], 0) + len(body)
        return counts

    def expected(self) -> dict[str, int]:
        """What the store must hold once every request was answered 200."""
        return self.counts(self.bodies)


async def durable_load(
    url: str, ledger: Ledger, clients: int, seconds: float, key: str = "c"
) -> None:
    """``clients`` concurrent clients POST new requests for ``seconds`` or until the
    connection fails (the server died); client ``n`` sends key ``f"{key}{n}"``."""

    async def client_loop(number: int, client: httpx.AsyncClient) -> None:
        while True:
            request = ledger.new(f"{key}{number}")
            try:
                response = await ledger.send(client, request)
            except httpx.TransportError:
                return
            assert response.status_code == 200, response.text

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for number in range(clients):
                    nursery.start_soon(client_loop, number, client)


async def resend_unacknowledged(url: str, ledger: Ledger) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for request in ledger.unacknowledged():
            response = await ledger.send(client, request)
            assert response.status_code == 200, response.text
