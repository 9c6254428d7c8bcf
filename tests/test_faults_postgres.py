"""Fault injection on the PostgreSQL store: the database server stopped and restarted
under load and during a flush, hung (SIGSTOP) past the store's deadlines, and the id
purge racing a transaction that claims an expired id again."""

from __future__ import annotations

import functools
import secrets
import signal
import time
from typing import Any

import httpx
import psycopg
import pytest
import trio

from trioagg.core.events import TAGS_BYTES
from trioagg.core.settings import Settings
from trioagg.store.base import IDLE_CHECK_SECONDS
from trioagg.store.postgres import WRITE_DEADLINES, PostgresBackend

from . import clock
from .conftest import (
    Ledger,
    PostgresCluster,
    StartServer,
    assert_store_holds,
    post,
    sample_of,
    sql,
    tags_of_json_bytes,
)

pytestmark = pytest.mark.slow


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_postgres_stopped_and_restarted_under_load_counts_every_event_once(
    server_process: Any, own_postgres: PostgresCluster
) -> None:
    server = server_process(db=own_postgres.dsn).start()
    assert server.url, server.output
    ledger = Ledger()
    done = trio.Event()
    leaks: list[str] = []
    where = f"{own_postgres.port}"

    def check_body(response: httpx.Response) -> None:
        assert response.status_code != 500, response.text
        if where in response.text or "127.0.0.1" in response.text:
            leaks.append(response.text)

    async def client_loop(number: int, client: httpx.AsyncClient) -> None:
        while not done.is_set():
            request = ledger.new(f"pg{number}")
            while True:
                response = await ledger.send(client, request)
                check_body(response)
                if response.status_code == 200:
                    break
                assert response.status_code == 503, response.text
                await trio.sleep(0.05)

    async def outage_answers(client: httpx.AsyncClient) -> set[tuple[str, int, str]]:
        """What POST, GET /v1/aggregates and /readyz answer while the server is down."""
        seen = set()
        for _ in range(5):
            answers = [
                ("post", await post(client, [{"key": "probe"}])),
                ("post wait=false", await post(client, [{"key": "probe"}], wait="false")),
                ("get", await client.get("/v1/aggregates", params={"key": "pg0"})),
                ("keys", await client.get("/v1/keys")),
                ("top", await client.get("/v1/top")),
                ("readyz", await client.get("/readyz")),
            ]
            for name, response in answers:
                check_body(response)
                code = response.json().get("error", {}).get("code", "")
                seen.add((name, response.status_code, code))
            await trio.sleep(0.1)
        return seen

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async with trio.open_nursery() as nursery:
            for number in range(6):
                nursery.start_soon(client_loop, number, client)
            await trio.sleep(0.7)
            await trio.to_thread.run_sync(own_postgres.stop)
            seen = await outage_answers(client)
            await trio.to_thread.run_sync(own_postgres.start)
            acknowledged = len(ledger.acknowledged)
            with trio.fail_after(20):
                while len(ledger.acknowledged) < acknowledged + 30:
                    await trio.sleep(0.05)
            done.set()
        assert seen == {
            ("post", 503, "commit_failed"),
            ("post wait=false", 503, "store_unavailable"),
            ("get", 503, "store_unavailable"),
            ("keys", 503, "store_unavailable"),
            ("top", 503, "store_unavailable"),
            ("readyz", 503, ""),
        }
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
    assert leaks == []
    assert set(ledger.statuses) == {200, 503}
    assert server.stop() == 0, server.output
    assert_store_holds(own_postgres.dsn, ledger.expected())


JOURNAL_ROWS = "SELECT count(*) FROM journal"


def flushing(dsn: str) -> bool:
    """Whether a flush is writing rollup rows (a transaction under way)."""
    rows = sql(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE state <> 'idle' "
        "AND query LIKE '%INSERT INTO rollups%' AND pid <> pg_backend_pid()",
    )
    return bool(rows[0][0])


async def test_postgres_restarted_during_a_flush_stores_every_acknowledged_event_once(
    server_process: Any, own_postgres: PostgresCluster
) -> None:
    # 20,000 series in the head: a flush of about a second to restart the server in.
    server = server_process("--flush-window", "6s", db=own_postgres.dsn).start()  # idle: 0.3 s
    assert server.url, server.output
    ledger = Ledger()
    bodies = [[{"key": f"k{r}-{i:05d}", "id": f"{r}-{i}"} for i in range(10_000)] for r in (0, 1)]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for body in bodies:
            assert (await post(client, body)).status_code == 200
        with trio.fail_after(10):
            while not await trio.to_thread.run_sync(flushing, own_postgres.dsn):
                await trio.sleep(0.01)
        await trio.to_thread.run_sync(own_postgres.stop)
        during = ledger.new("during")
        response = await ledger.send(client, during)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "commit_failed"
        await trio.to_thread.run_sync(own_postgres.start)

        with trio.fail_after(20):  # the retries: the flush is written once it is back
            while await trio.to_thread.run_sync(sql, own_postgres.dsn, JOURNAL_ROWS) != [(0,)]:
                await trio.sleep(0.05)
        scrape = (await client.get("/metrics")).text
        assert sample_of(scrape, "trioagg_flush_failures_total") >= 1, "it was flushing"
        assert (await ledger.send(client, during)).status_code == 200
    assert server.stop() == 0, server.output
    assert sql(own_postgres.dsn, JOURNAL_ROWS) == [(0,)]
    expected = {event["key"]: 1 for body in bodies for event in body}
    assert_store_holds(own_postgres.dsn, expected | ledger.expected())


async def test_the_first_requests_after_a_quiet_restart_reconnect(
    server_process: Any, own_postgres: PostgresCluster
) -> None:
    # A database restart while the service is idle leaves every connection dead; a
    # connection idle for IDLE_CHECK_SECONDS is pinged before use, so no client sees it.
    readers = 3
    server = server_process("--readers", str(readers), db=own_postgres.dsn).start()
    assert server.url, server.output
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def list_keys() -> list[int]:
            # /v1/keys is never cached: each takes the next idle read connection in turn.
            return [(await client.get("/v1/keys")).status_code for _ in range(2 * readers)]

        assert (await post(client, [{"key": "before", "value": 1}])).status_code == 200
        assert await list_keys() == [200] * 2 * readers
        await trio.to_thread.run_sync(own_postgres.stop)
        await trio.to_thread.run_sync(own_postgres.start)
        await trio.sleep(IDLE_CHECK_SECONDS)  # the connections have now been idle that long
        answers = [(await post(client, [{"key": "after", "value": 2}])).status_code]
        answers += await list_keys()
    assert answers == [200] * (1 + 2 * readers), answers
    assert server.stop() == 0, server.output
    assert_store_holds(own_postgres.dsn, {"before": 1, "after": 1})


async def test_a_hung_postgresql_is_an_outage_within_the_deadline_then_recovers(
    server_process: Any, own_postgres: PostgresCluster
) -> None:
    # A server stopped, not down (SIGSTOP: a frozen VM or process), keeps every connection
    # open, and its kernel acknowledges what is sent: no TCP timeout fires, and a thread
    # blocked reading waited for as long as the hang lasted. Each operation now has a
    # deadline: the answers are 503s naming it, the service recovers after, and a
    # shutdown during a hang ends.
    timeout = 2.0  # libpq connects in whole seconds, at least 2: a read may connect
    margin = 2.0  # a loaded machine's scheduling; the hang itself is unbounded
    drain = 1.0
    server = server_process(
        "--store-timeout", f"{timeout:g}s", "--drain-timeout", f"{drain:g}s", db=own_postgres.dsn
    ).start()
    assert server.url, server.output
    ledger = Ledger()
    before, during, after = ledger.new("before"), ledger.new("during"), ledger.new("after")
    fire_and_forget = [{"key": "fired", "id": f"fired-{n}"} for n in range(2)]
    answers: dict[str, tuple[httpx.Response, float]] = {}

    async with httpx.AsyncClient(base_url=server.url, timeout=10 * timeout) as client:

        async def timed(name: str, send: Any, *args: Any) -> None:
            started = trio.current_time()
            response = await send(*args)
            answers[name] = (response, trio.current_time() - started)

        assert (await ledger.send(client, before)).status_code == 200
        assert (await client.get("/v1/keys")).status_code == 200
        await trio.to_thread.run_sync(own_postgres.pause)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(timed, "post", ledger.send, client, during)
                await trio.sleep(0.2)  # its commit is under way: the writer is not failing yet
                fire = functools.partial(post, client, fire_and_forget, wait="false")
                nursery.start_soon(timed, "post wait=false", fire)
                nursery.start_soon(timed, "keys", client.get, "/v1/keys")
                nursery.start_soon(timed, "readyz", client.get, "/readyz")
        finally:
            await trio.to_thread.run_sync(own_postgres.resume)

        deadlines = {"post": WRITE_DEADLINES * timeout, "keys": timeout, "readyz": timeout}
        for name, deadline in deadlines.items():
            response, took = answers[name]
            assert response.status_code == 503, (name, response.text)
            assert f"within {deadline:g}s" in response.text, (name, response.text)
            assert took < deadline + margin, (name, took)
        assert answers["post"][0].json()["error"]["code"] == "commit_failed"
        assert answers["keys"][0].json()["error"]["code"] == "store_unavailable"
        assert answers["keys"][0].headers["Retry-After"] == "1"
        assert answers["readyz"][0].json()["checks"]["store"].startswith("unreachable: ")
        assert answers["post wait=false"][0].status_code == 202  # kept, and retried

        with trio.fail_after(30):  # the writer's retries commit the 202 events
            while (ready := await client.get("/readyz")).status_code != 200:
                await trio.sleep(0.1)
            while (await ledger.send(client, during)).status_code != 200:
                await trio.sleep(0.1)
        assert ready.json()["checks"] == {"store": "ok", "writer": "running", "queue": "ok"}
        assert (await ledger.send(client, after)).status_code == 200
        assert (await client.get("/v1/keys")).status_code == 200

        # The drain's deadline cancels the writer, which waits for its commit under way:
        # that commit still ends at its own deadline, and the 202 event is counted lost.
        await trio.to_thread.run_sync(own_postgres.pause)
        try:
            late = await post(client, [{"key": "late", "id": "late-0"}], wait="false")
            assert late.status_code == 202, late.text
            started = trio.current_time()
            server.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(server.wait, 20)
            took = trio.current_time() - started
        finally:
            await trio.to_thread.run_sync(own_postgres.resume)
    assert code == 0, server.output
    assert took < WRITE_DEADLINES * timeout + margin, took
    assert "1 events answered 202 were lost" in server.output
    assert_store_holds(own_postgres.dsn, {**ledger.expected(), "fired": 2})


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_reads_held_up_in_postgresql_fail_at_their_deadline_and_readyz_in_time(
    start_server: StartServer,
) -> None:
    # Reads waiting on a lock (a migration's, say) on a server that answers otherwise: each
    # gets 503 at its deadline, and /readyz, queued behind them for the one read
    # connection, answers by its own deadline instead of after all of them.
    server = await start_server(readers="1", store_timeout="1s")
    assert (await post(server.client, {"key": "k"})).status_code == 200
    await server.app.service.writers.flushed()  # /v1/keys then has no flush to wait for
    locker = await trio.to_thread.run_sync(lambda: psycopg.connect(server.db, autocommit=True))
    answers: dict[str, tuple[httpx.Response, float]] = {}

    async def timed(name: str, path: str) -> None:
        started = trio.current_time()
        response = await server.client.get(path)
        answers[name] = (response, trio.current_time() - started)

    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE series IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            for number in range(3):
                nursery.start_soon(timed, f"keys {number}", "/v1/keys")
            await trio.sleep(0.3)  # so that it queues after them
            nursery.start_soon(timed, "readyz", "/readyz")
    finally:
        locker.close()
    keys = sorted((answers[f"keys {n}"] for n in range(3)), key=lambda answer: answer[1])
    for place, (response, took) in enumerate(keys):  # each waited for those before
        assert response.status_code == 503, response.text
        assert "did not answer within 1s" in response.json()["error"]["message"]
        assert took < (place + 1) * 1.0 + 2.0, took
    ready, took = answers["readyz"]
    assert ready.status_code == 503, ready.text
    assert (
        ready.json()["checks"]["store"] == "unreachable: every read connection stayed busy for 1s"
    )
    assert took < 1.0 + 2.0, took
    assert (await server.client.get("/readyz")).status_code == 200
    assert (await server.client.get("/v1/keys")).json()["keys"][0]["key"] == "k"


def test_postgresql_connections_carry_their_deadlines(postgres_dsn: str) -> None:
    # The server's side of the deadlines, a second after the client's: it cancels a
    # statement still running (an outage; the connection stays usable) and closes a
    # session whose transaction stays open (the connection is gone).
    backend = PostgresBackend(postgres_dsn, timeout=0.1)
    assert Settings().store_timeout == 5  # far above a healthy answer's time
    read = backend.connect(write=False)
    write = backend.connect(write=True)
    try:
        show = "SELECT current_setting(%s)"
        assert read.execute(show, ("statement_timeout",)).fetchone() == ("1100ms",)
        assert write.execute(show, ("statement_timeout",)).fetchone() == ("1200ms",)
        idle_in_transaction = ("idle_in_transaction_session_timeout",)
        assert write.execute(show, idle_in_transaction).fetchone() == ("1200ms",)
        assert write.execute(show, ("lock_timeout",)).fetchone() == ("200ms",)
        with pytest.raises(psycopg.Error) as late:
            read.execute("SELECT pg_sleep(5)")
        assert not backend.is_disconnect(late.value)
        assert backend.outage_reason(late.value) is not None
        assert read.execute("SELECT 1").fetchone() == (1,)
        write.execute("BEGIN")
        time.sleep(1.5)
        with pytest.raises(psycopg.Error) as idle:
            write.execute("SELECT 1")
        assert idle.value.sqlstate == "25P03"
        assert backend.is_disconnect(idle.value)
    finally:
        read.close()
        write.close()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_purge_keeps_an_id_claimed_again_while_it_ran(start_server: StartServer) -> None:
    server = await start_server()
    event = {"key": "raced", "id": "evt-raced"}
    assert (await post(server.client, event)).json() == {"accepted": 1, "duplicates": 0}
    window = server.app.settings.dedup_window
    sql_now = f"UPDATE event_ids SET seen = seen - {2 * window} WHERE id = 'evt-raced'"
    await trio.to_thread.run_sync(execute, server.db, sql_now)  # the id has expired

    backend = PostgresBackend(server.db, timeout=Settings().store_timeout)
    claimer = await trio.to_thread.run_sync(lambda: psycopg.connect(server.db, autocommit=True))
    purger = await trio.to_thread.run_sync(lambda: psycopg.connect(server.db, autocommit=True))
    purged: list[int] = []

    def purge() -> None:
        backend.begin(purger)
        purged.append(backend.purge_ids(purger, clock.now() - window, 1000))
        backend.commit(purger)

    try:
        # A writer's transaction claims the expired id again (and stores its event) and
        # holds the row lock; the purge, which read the id as expired, waits for it.
        now = clock.now()
        backend.begin(claimer)
        assert backend.claim_ids(claimer, ["evt-raced"], now, now - window) == {"evt-raced"}
        hour = int(now // 3600 * 3600)
        row = ("raced", hour, "{}", 1, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, float(hour), None, None)
        backend.upsert(claimer, [row])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, purge)
            with trio.fail_after(10):
                while not await trio.to_thread.run_sync(waits_on_a_lock, server.db):
                    await trio.sleep(0.02)
            await trio.to_thread.run_sync(backend.commit, claimer)
    finally:
        claimer.close()
        purger.close()
    assert purged == [0]
    assert sql(server.db, "SELECT id FROM event_ids") == [("evt-raced",)]
    retry = await post(server.client, event)
    assert retry.json() == {"accepted": 1, "duplicates": 1}
    assert_store_holds(server.db, {"raced": 2})


def execute(db: str, statement: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statement)


def waits_on_a_lock(db: str) -> bool:
    """Whether some transaction waits for a row lock on the DELETE of the purge."""
    rows = sql(
        db,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE 'DELETE FROM event_ids%'",
    )
    return bool(rows[0][0])


def random_characters(size: int) -> str:
    """``size`` bytes that do not compress: PostgreSQL compresses large index entries."""
    return secrets.token_urlsafe(size)[:size]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_the_largest_valid_event_is_stored_on_postgresql(start_server: StartServer) -> None:
    # The largest key and tags validation accepts fit PostgreSQL's index entries (2,704
    # bytes): the limit is checked at the edge, never found at commit.
    server = await start_server()
    key = random_characters(255)
    event = {"key": key, "tags": tags_of_json_bytes(TAGS_BYTES, random_characters)}
    assert (await post(server.client, event)).json() == {"accepted": 1, "duplicates": 0}
    assert_store_holds(server.db, {key: 1})


def test_postgresql_errors_tell_a_lost_connection_from_a_row_too_large(
    postgres_dsn: str,
) -> None:
    # A row too large for an index is an OperationalError in psycopg, as a lost
    # connection is: taken for an outage, it turned /readyz failing and refused every
    # client's wait=false requests for 10 s. It belongs to its data (only its request
    # fails); a connection that is gone is an outage.
    backend = PostgresBackend(postgres_dsn, timeout=Settings().store_timeout)
    conn = psycopg.connect(postgres_dsn, autocommit=True)
    doomed = psycopg.connect(postgres_dsn, autocommit=True)
    idle = psycopg.connect(postgres_dsn, autocommit=True)
    try:
        conn.execute("CREATE TEMP TABLE wide (x TEXT PRIMARY KEY)")
        with pytest.raises(psycopg.Error) as too_large:
            conn.execute("INSERT INTO wide VALUES (%s)", (random_characters(4000),))
        assert not backend.is_disconnect(too_large.value)
        assert backend.outage_reason(too_large.value) is None
        conn.execute("SELECT pg_terminate_backend(%s)", (doomed.info.backend_pid,))
        for _ in range(2):  # the server's "terminating connection", then "closed"
            with pytest.raises(psycopg.Error) as gone:
                doomed.execute("SELECT 1")
            assert backend.is_disconnect(gone.value)
            assert backend.outage_reason(gone.value) == "the database server cannot be reached"
        # A session the server closed for idling (57P05, idle_session_timeout) is gone too.
        idle.execute("SET idle_session_timeout = '50ms'")
        time.sleep(0.3)
        with pytest.raises(psycopg.Error) as timed_out:
            idle.execute("SELECT 1")
        assert timed_out.value.sqlstate == "57P05"
        assert backend.is_disconnect(timed_out.value)
    finally:
        conn.close()
        doomed.close()
        idle.close()
