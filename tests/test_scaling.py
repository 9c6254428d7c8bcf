"""Scaling out: several writers, several processes on one store, PostgreSQL outages."""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any

import httpx
import pytest
import trio

from trioagg.core.errors import ConfigError
from trioagg.core.settings import Settings
from trioagg.store import open_store

from . import clock
from .conftest import SHARDED, PostgresCluster, StartServer, fresh_schema, post, stored_counts

HOUR = 3600
DAY = clock.whole_days_ago(1)


@pytest.fixture(params=["sqlite", SHARDED, "postgres"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, list[str]]:
    """A store several server processes share, and the flags they need."""
    if request.param == "sqlite":
        return str(tmp_path / "shared.db"), []
    if request.param == SHARDED:
        return str(tmp_path / "shared.db"), ["--writers", "2"]
    _, url = fresh_schema(request.getfixturevalue("postgres_dsn"))
    return url, ["--writers", "2"]


# Requests cut off at shutdown leave httpx's body iterators unfinished.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_several_processes_on_one_store_keep_exact_totals(
    server_process: Any, shared_store: tuple[str, list[str]]
) -> None:
    db, flags = shared_store
    servers = [server_process(*flags, db=db).start() for _ in range(3)]
    assert all(server.url for server in servers), [s.output for s in servers]
    expected: dict[str, int] = {}
    statuses: list[int] = []

    async def client(number: int, http: httpx.AsyncClient) -> None:
        urls = itertools.cycle(server.url for server in servers)
        for i in range(25):
            key = f"k{(number + i) % 4}"
            size = 1 + (i % 3) * 10
            body = [{"key": key, "ts": DAY + (i % 6) * HOUR + number} for _ in range(size)]
            wait = "false" if i % 5 == 0 else "true"
            response = await http.post(f"{next(urls)}/v1/events", json=body, params={"wait": wait})
            statuses.append(response.status_code)
            expected[key] = expected.get(key, 0) + size

    async with httpx.AsyncClient(timeout=60) as http, trio.open_nursery() as nursery:
        for number in range(8):
            nursery.start_soon(client, number, http)
    assert set(statuses) <= {200, 202}
    for server in servers:
        assert server.stop() == 0, server.output
    assert stored_counts(db) == expected


#: Stores of several writers: shard files of SQLite, or PostgreSQL.
WRITERS = pytest.mark.parametrize("db_url", [SHARDED, "postgres"], indirect=True)


@WRITERS
async def test_a_request_spanning_writers_is_acknowledged_once_every_part_commits(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(writers="4", busy_timeout="30s")
    db = server.db
    body = [{"key": "span", "ts": DAY + hour * HOUR} for hour in range(8)]  # every writer
    hold_write_lock.acquire(db)
    answers: list[int] = []
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            answers.append((await post(server.client, body)).status_code)

        nursery.start_soon(send)
        await trio.sleep(0.5)
        assert answers == [], "acknowledged before its parts committed"
        hold_write_lock.release()
    assert answers == [200]
    assert stored_counts(db) == {"span": 8}


@WRITERS
async def test_a_request_whose_parts_all_fail_stores_nothing(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(writers="2", busy_timeout="300ms")
    db = server.db
    hold_write_lock.acquire(db)
    body = [{"key": "fail", "ts": DAY + hour * HOUR, "id": f"f{hour}"} for hour in range(4)]
    response = await post(server.client, body)
    assert response.status_code == 503
    assert "2 of the 2 writers" in response.json()["error"]["message"]
    hold_write_lock.release()
    assert (await post(server.client, body)).json() == {"accepted": 4, "duplicates": 0}
    assert stored_counts(db) == {"fail": 4}


def test_more_sqlite_shards_than_a_connection_can_attach_are_refused_before_any_file(
    server_process: Any, tmp_path: Any
) -> None:
    refused = server_process("--writers", "12").start()
    assert refused.wait() == 2
    assert "at most 11 shard files" in refused.output
    assert list(tmp_path.iterdir()) == []
    most = server_process("--writers", "11").start()
    assert most.url, most.output
    assert most.stop() == 0


def test_a_sqlite_store_opens_only_with_the_writers_it_was_made_with(
    server_process: Any, tmp_path: Any
) -> None:
    db = tmp_path / "trioagg.db"
    made = server_process("--writers", "2").start()
    assert made.url, made.output
    assert made.stop() == 0
    assert (tmp_path / "trioagg.db-shard1").exists()
    for writers in ("1", "3"):
        other = server_process("--writers", writers).start()
        assert other.wait() == 2
        assert "created with --writers 2" in other.output
        assert f"but --writers is {writers}" in other.output
    assert not (tmp_path / "trioagg.db-shard2").exists(), "a refused start made a shard"
    (tmp_path / "trioagg.db-shard1").rename(tmp_path / "elsewhere.db")
    missing = server_process("--writers", "2").start()
    assert missing.wait() == 2
    assert "trioagg.db-shard1 is missing" in missing.output
    assert not (tmp_path / "trioagg.db-shard1").exists(), "a missing shard was made anew"
    (tmp_path / "elsewhere.db").rename(tmp_path / "trioagg.db-shard1")
    assert server_process("--writers", "2").start().stop() == 0
    assert db.exists()


async def test_a_shard_file_with_data_never_joins_a_new_main_file(tmp_path: Any) -> None:
    db = str(tmp_path / "trioagg.db")
    settings = Settings.from_text({"db": db, "writers": "2"})
    store = await open_store(settings)
    await store.append([[("k", DAY + HOUR, 1.0, "{}", None, None)]], shard=1)
    await store.aclose()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"trioagg.db{suffix}").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=r"trioagg\.db-shard1 holds data of another store"):
        await open_store(settings)
    assert stored_counts(db + "-shard1") == {"k": 1}


def test_a_sqlite_store_of_one_file_keeps_opening(server_process: Any, tmp_path: Any) -> None:
    """A store made before shard files existed records no shard count: it is one file."""
    db = tmp_path / "trioagg.db"
    made = server_process().start()
    assert made.stop() == 0
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM meta WHERE name IN ('shards', 'shard')")
    again = server_process().start()
    assert again.url, again.output
    assert again.stop() == 0
    refused = server_process("--writers", "2").start()
    assert refused.wait() == 2
    assert "created with --writers 1" in refused.output


# Requests cut off by the restart leave httpx's body iterators unfinished.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_postgres_restart_during_load_loses_no_acknowledged_event(
    server_process: Any, own_postgres: PostgresCluster
) -> None:
    server = server_process("--writers", "2", db=own_postgres.dsn).start()
    assert server.url, server.output
    clients = 8
    acknowledged = [0] * clients
    sent = [0] * clients
    refused = [0] * clients
    stop = trio.Event()

    async def load(number: int, http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            sent[number] += 1
            response = await http.post(
                f"{server.url}/v1/events", json={"key": f"c{number}", "ts": DAY + number * HOUR}
            )
            if response.status_code == 200:
                acknowledged[number] += 1
            else:
                assert response.status_code == 503, response.text
                refused[number] += 1
                await trio.sleep(0.05)

    async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
        for number in range(clients):
            nursery.start_soon(load, number, http)
        await trio.sleep(1.0)
        before = sum(acknowledged)
        await trio.to_thread.run_sync(own_postgres.stop, "fast")
        await trio.sleep(0.5)
        await trio.to_thread.run_sync(own_postgres.start)
        with trio.fail_after(30):  # it recovers by itself
            while sum(acknowledged) < before + 200:
                await trio.sleep(0.1)
        stop.set()
    assert sum(refused) > 0, "the outage was never noticed"
    assert server.stop() == 0, server.output
    stored = stored_counts(own_postgres.dsn)
    for number in range(clients):
        assert acknowledged[number] <= stored.get(f"c{number}", 0) <= sent[number]


async def test_readyz_follows_the_database_and_durable_writes_wait_for_it(
    server_process: Any, own_postgres: PostgresCluster
) -> None:
    server = server_process(db=own_postgres.dsn).start()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/readyz")).status_code == 200
        await trio.to_thread.run_sync(own_postgres.stop, "fast")
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["store"].startswith("unreachable")
        response = await http.post("/v1/events", json={"key": "down"})
        assert response.status_code == 503  # never acknowledged without a commit
        assert response.headers["Retry-After"]
        await trio.to_thread.run_sync(own_postgres.start)
        # Ready again once the failed commit is older than the writers' memory of it.
        with trio.fail_after(20):
            while (await http.get("/readyz")).status_code != 200:
                await trio.sleep(0.2)
        assert (await http.post("/v1/events", json={"key": "up"})).status_code == 200
    assert server.stop() == 0
    assert stored_counts(own_postgres.dsn) == {"up": 1}
