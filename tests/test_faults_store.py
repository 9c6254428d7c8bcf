"""Fault injection on a running server's SQLite store: disk full and the write lock held
by another process (as batches are journalled, and as a head is flushed), the file made
read-only, the file deleted. The server runs in this process (real hypercorn on
loopback) so that the test can reach its write connection."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioagg.core.errors import CommitFailed, StoreOutage
from trioagg.core.events import Point
from trioagg.core.settings import Settings
from trioagg.ingest.writer import Writers
from trioagg.keys import admin as api_keys
from trioagg.service.metrics import Metrics
from trioagg.store import make_backend, open_store

from . import clock
from .conftest import Server, StartServer, assert_store_holds, metric, post, sql

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def many_keys(prefix: str, count: int = 2000) -> list[dict[str, Any]]:
    return [{"key": f"{prefix}-{i:05d}-{'x' * 40}"} for i in range(count)]


async def assert_outage(server: Server, key: str) -> dict[str, Any]:
    """Durable POSTs fail 503 commit_failed, /readyz reports the store failing, and
    wait=false is refused 503; returns /readyz's body."""
    response = await post(server.client, many_keys(key))
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "commit_failed"
    ready = await server.client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["checks"]["store"].startswith("failing: "), ready.text
    refused = await post(server.client, [{"key": key}], wait="false")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "store_unavailable"
    body: dict[str, Any] = ready.json()
    return body


async def assert_recovered(server: Server) -> None:
    """A durable POST succeeds, and /readyz turns ready once a flush succeeds too (the
    one this commit brings forward)."""
    response = await post(server.client, [{"key": "after"}])
    assert response.status_code == 200, response.text
    with trio.fail_after(5):
        while (await server.client.get("/readyz")).status_code != 200:
            await trio.sleep(0.05)


async def on_write_connection(server: Server, statement: str, shard: int = 0) -> list[Any]:
    """Run ``statement`` on the server's write connection to ``shard``, in turn with its
    commits."""
    store = server.app.service.store
    conn = store._write_links[shard].conn
    assert conn is not None, "the write connection opens with the first commit"
    return await trio.to_thread.run_sync(
        lambda: conn.execute(statement).fetchall(), limiter=store._write_limiters[shard]
    )


async def test_disk_full_fails_durable_requests_and_recovers(start_server: StartServer) -> None:
    server = await start_server()
    assert (await post(server.client, [{"key": "before"}] * 2)).status_code == 200
    ((pages,),) = await on_write_connection(server, "PRAGMA page_count")
    await on_write_connection(server, f"PRAGMA max_page_count = {pages}")

    ready = await assert_outage(server, "full")
    assert ready["checks"]["store"] == "failing: the disk holding the database is full"
    reads = await server.client.get("/v1/aggregates", params={"key": "before"})
    assert reads.status_code == 200, "reads go on while writes cannot"

    await on_write_connection(server, "PRAGMA max_page_count = 1073741823")
    await assert_recovered(server)
    stored = await post(server.client, many_keys("room"))
    assert stored.status_code == 200, stored.text
    expected = {"before": 2, "after": 1} | {event["key"]: 1 for event in many_keys("room")}
    assert_store_holds(server.db, expected)


async def test_a_write_lock_held_past_busy_timeout_fails_then_recovers(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="300ms")
    assert (await post(server.client, {"key": "before"})).status_code == 200
    hold_write_lock.acquire(server.db)
    ready = await assert_outage(server, "locked")
    assert "locked" in ready["checks"]["store"]
    hold_write_lock.release()
    await assert_recovered(server)
    assert_store_holds(server.db, {"before": 1, "after": 1})


def journal_rows(db: str) -> int:
    ((rows,),) = sql(db, "SELECT count(*) FROM journal")
    return int(rows)


async def flushes_failed(server: Server, failures: int) -> None:
    """Wait until ``failures`` flushes failed: the first, and retries."""
    with trio.fail_after(10):
        while await metric(server, "trioagg_flush_failures_total") < failures:
            await trio.sleep(0.02)


async def journal_flushed(server: Server) -> None:
    with trio.fail_after(10):
        while await trio.to_thread.run_sync(journal_rows, server.db):
            await trio.sleep(0.02)


async def test_disk_full_during_a_flush_keeps_the_journal_and_retries_until_space_returns(
    start_server: StartServer,
) -> None:
    # Batches journalled while there was room, and a flush that has none for their rows.
    server = await start_server(flush_window="2s")  # flushed once idle for 0.1 s
    assert (await post(server.client, many_keys("first"))).status_code == 200
    await journal_flushed(server)  # the first batch's journal pages are free again
    ((pages,),) = await on_write_connection(server, "PRAGMA page_count")
    await on_write_connection(server, f"PRAGMA max_page_count = {pages}")
    held = await post(server.client, many_keys("held"))
    assert held.status_code == 200, "journalled in the pages the first batch's row freed"

    await flushes_failed(server, 2)
    expected = {event["key"]: 1 for event in many_keys("first") + many_keys("held")}
    assert journal_rows(server.db) == 1
    assert_store_holds(server.db, expected)  # the journal holds what the table cannot
    ready = await assert_outage(server, "full")  # no room to journal new work: 503
    assert ready["checks"]["store"] == "failing: the disk holding the database is full"

    await on_write_connection(server, "PRAGMA max_page_count = 1073741823")
    await journal_flushed(server)  # by the next retry
    await assert_recovered(server)
    assert_store_holds(server.db, expected | {"after": 1})


async def test_a_write_lock_held_through_a_flush_fails_it_until_the_lock_goes(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="300ms", flush_window="10s")  # idle: 0.5 s
    assert (await post(server.client, many_keys("held", 200))).status_code == 200
    hold_write_lock.acquire(server.db)
    ((rows,),) = hold_write_lock.conn.execute("SELECT count(*) FROM journal").fetchall()
    assert rows == 1, "the lock must be taken before the head is flushed"

    await flushes_failed(server, 2)
    expected = {event["key"]: 1 for event in many_keys("held", 200)}
    assert_store_holds(server.db, expected)  # reads go on under the lock
    ready = await assert_outage(server, "locked")
    assert "locked" in ready["checks"]["store"]

    hold_write_lock.release()
    await journal_flushed(server)
    await assert_recovered(server)
    assert_store_holds(server.db, expected | {"after": 1})


@contextlib.contextmanager
def immutable(paths: list[Path]) -> Iterator[None]:
    """Make files immutable (chattr +i): unlike chmod, this stops root, and writes
    through descriptors already open, as a read-only remount would."""
    done: list[Path] = []
    try:
        for path in paths:
            subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)


def can_make_immutable(folder: Path) -> str | None:
    """Why files in ``folder`` cannot be made immutable here, or None if they can."""
    if shutil.which("chattr") is None:
        return "no chattr"
    probe = folder / "probe"
    probe.write_bytes(b"x")
    descriptor = os.open(probe, os.O_WRONLY | os.O_APPEND)
    try:
        with immutable([probe]):
            os.write(descriptor, b"y")
        return "writes through an open descriptor still reach an immutable file"
    except PermissionError:
        return None
    except subprocess.CalledProcessError as error:
        return f"chattr +i failed: {error.stderr.decode().strip()}"
    finally:
        os.close(descriptor)
        probe.unlink()


async def test_a_read_only_database_fails_durable_requests_and_recovers(
    start_server: StartServer, tmp_path: Path
) -> None:
    # chmod 0444 is no fault: root writes anyway, and a connection writes through the
    # descriptors it opened before. An immutable file refuses both, like a read-only mount.
    why_not = can_make_immutable(tmp_path)
    if why_not is not None:
        pytest.skip(f"cannot make a database read-only under a running server: {why_not}")
    server = await start_server()
    assert (await post(server.client, {"key": "before"})).status_code == 200
    # Not the -shm file: SQLite writes it through a shared mapping, and a write fault on
    # an immutable mapping is SIGBUS, a crash, not a read-only store.
    with immutable([Path(server.db), Path(f"{server.db}-wal")]):
        await assert_outage(server, "read-only")
    await assert_recovered(server)
    assert_store_holds(server.db, {"before": 1, "after": 1})


async def test_a_deleted_database_file_never_acknowledges_again(
    start_server: StartServer,
) -> None:
    server = await start_server()
    assert (await post(server.client, {"key": "before"})).status_code == 200
    for _ in range(4):  # every read connection of the pool opened on the file before
        assert (await server.client.get("/v1/keys")).status_code == 200
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(server.db + suffix)
    ready = await assert_outage(server, "gone")
    assert "deleted" in ready["checks"]["store"]
    for _ in range(3):
        assert (await post(server.client, {"key": "gone"})).status_code == 503
        for path in ("/v1/aggregates?key=before", "/v1/keys", "/v1/top"):
            response = await server.client.get(path)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
    assert not os.path.exists(server.db), "a connection created a new, empty database"


# Two past hours, owned by writer 0 and writer 1 of a store of two shard files.
EVEN_HOUR = clock.whole_periods_ago(2 * clock.HOUR, 1)
ODD_HOUR = EVEN_HOUR + 3600


def in_hour(events: list[dict[str, Any]], hour: int) -> list[dict[str, Any]]:
    return [{**event, "ts": hour} for event in events]


async def test_a_full_shard_fails_its_hours_only_and_recovers(start_server: StartServer) -> None:
    server = await start_server(writers="2")
    both = in_hour([{"key": "before"}], EVEN_HOUR) + in_hour([{"key": "before"}], ODD_HOUR)
    assert (await post(server.client, both)).status_code == 200
    ((pages,),) = await on_write_connection(server, "PRAGMA page_count", shard=1)
    await on_write_connection(server, f"PRAGMA max_page_count = {pages}", shard=1)

    full = await post(server.client, in_hour(many_keys("full"), ODD_HOUR))
    assert full.status_code == 503, full.text
    assert full.json()["error"]["code"] == "commit_failed"
    ready = await server.client.get("/readyz")
    assert ready.json()["checks"]["store"] == "failing: the disk holding the database is full"
    spanning = await post(
        server.client,
        in_hour(many_keys("span", 100), EVEN_HOUR) + in_hour(many_keys("lost"), ODD_HOUR),
    )
    assert spanning.status_code == 503, "a request is answered 200 only if every part commits"
    other = await post(server.client, in_hour(many_keys("room"), EVEN_HOUR))
    assert other.status_code == 200, "the other shard's writer goes on"

    await on_write_connection(server, "PRAGMA max_page_count = 1073741823", shard=1)
    assert (await post(server.client, in_hour(many_keys("full"), ODD_HOUR))).status_code == 200
    # The spanning request's even-hour part was committed by its writer (atomic per writer).
    expected = {"before": 2} | {event["key"]: 1 for event in many_keys("room")}
    expected |= {event["key"]: 1 for event in many_keys("full")}
    expected |= {event["key"]: 1 for event in many_keys("span", 100)}
    assert_store_holds(server.db, expected)


async def test_a_deleted_shard_file_never_acknowledges_its_hours_again(
    start_server: StartServer,
) -> None:
    # drain_timeout: the deleted shard's hours can never be committed, and shutdown
    # would wait its default 20 s for them; the test is of what is answered before.
    server = await start_server(writers="2", drain_timeout="1s")
    assert (await post(server.client, in_hour([{"key": "b"}], ODD_HOUR))).status_code == 200
    shard = server.db + "-shard1"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(shard + suffix)
    for _ in range(3):
        gone = await post(server.client, in_hour([{"key": "gone"}], ODD_HOUR))
        assert gone.status_code == 503, gone.text
        assert gone.json()["error"]["code"] == "commit_failed"
    ready = await server.client.get("/readyz")
    assert "deleted" in ready.json()["checks"]["store"], ready.text
    refused = await post(server.client, in_hour([{"key": "gone"}], ODD_HOUR), wait="false")
    assert refused.json()["error"]["code"] == "store_unavailable"
    kept = await post(server.client, in_hour([{"key": "kept"}], EVEN_HOUR))
    assert kept.status_code == 200, kept.text
    response = await server.client.get("/v1/aggregates", params={"key": "kept"})
    assert response.status_code == 503, "a read never answers without a shard's hours"
    assert not os.path.exists(shard), "a connection created a new, empty shard file"


async def test_a_deleted_shard_file_does_not_stop_key_lookups(
    start_server: StartServer,
) -> None:
    server = await start_server(writers="2", auth="on", drain_timeout="1s")  # as above
    backend = make_backend(Settings(db=server.db, writers=2))
    early, fresh = (api_keys.create_key(backend, name, ("ingest",)) for name in ("early", "fresh"))
    events = in_hour([{"key": "b"}], EVEN_HOUR) + in_hour([{"key": "b"}], ODD_HOUR)
    assert (await post(server.client, events)).status_code == 401, "auth is on"
    sent = await server.client.post(
        "/v1/events", json=events, headers={"Authorization": f"Bearer {early}"}
    )
    assert sent.status_code == 200, sent.text
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(server.db + "-shard1" + suffix)
    # A key the server has not cached is looked up in the main file, which is intact.
    kept = await server.client.post(
        "/v1/events",
        json=in_hour([{"key": "kept"}], EVEN_HOUR),
        headers={"Authorization": f"Bearer {fresh}"},
    )
    assert kept.status_code == 200, kept.text
    gone = await server.client.post(
        "/v1/events",
        json=in_hour([{"key": "gone"}], ODD_HOUR),
        headers={"Authorization": f"Bearer {fresh}"},
    )
    assert gone.status_code == 503, gone.text


async def wait_committed(server: Server, events: int) -> None:
    with trio.fail_after(10):
        while server.app.service.writers.committed_events < events:
            await trio.sleep(0.02)


async def test_202s_held_through_a_lock_are_committed_once_it_goes(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="200ms")
    assert (await post(server.client, {"key": "before"})).status_code == 200
    hold_write_lock.acquire(server.db)
    accepted = 0
    while True:  # 202 until the first commit fails, then 503
        response = await post(server.client, [{"key": "held"}] * 3, wait="false")
        if response.status_code != 202:
            break
        accepted += 3
        await trio.sleep(0.02)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "store_unavailable"
    assert accepted > 0
    hold_write_lock.release()
    await wait_committed(server, 1 + accepted)
    assert_store_holds(server.db, {"before": 1, "held": accepted})


async def test_202s_still_unstored_at_the_drain_deadline_are_counted_as_lost(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="2s", drain_timeout="500ms")
    assert (await post(server.client, {"key": "before"})).status_code == 200
    hold_write_lock.acquire(server.db)
    for _ in range(4):
        response = await post(server.client, [{"key": "lost"}] * 5, wait="false")
        assert response.status_code == 202, response.text
    with trio.fail_after(10):
        await server.shutdown()
    lost = [
        sample
        for family in text_string_to_metric_families(server.app.metrics.render().decode())
        for sample in family.samples
        if sample.name == "trioagg_events_lost_total"
    ]
    assert sum(sample.value for sample in lost) == 20
    assert all(sample.labels["reason"] for sample in lost)
    hold_write_lock.release()
    assert_store_holds(server.db, {"before": 1})


async def test_requests_still_queued_at_the_drain_deadline_are_answered_and_counted(
    db_url: str, hold_write_lock: Any
) -> None:
    # One submission per batch: the first waits in its commit for the lock, and the
    # others wait in the writer's channel when the drain deadline passes.
    store = await open_store(Settings.from_text({"db": db_url, "busy_timeout": "10s"}))
    metrics = Metrics()
    writers = Writers(store, metrics, count=1, batch_size=1, queue_size=10, enqueue_timeout=1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(writers.run)
            hold_write_lock.acquire(db_url)
            first = await writers.submit([point("first")], durable=True)
            with trio.fail_after(5):
                while not writers.writers[0]._current:  # the writer took it
                    await trio.sleep(0.01)
            queued = await writers.submit([point("queued")], durable=True)
            await writers.submit([point("unacknowledged")] * 2, durable=False)
            assert not await writers.drain(0.3)
            for submission in (first, queued):
                with trio.fail_after(1), pytest.raises(CommitFailed):
                    await submission.wait_committed()
    finally:
        hold_write_lock.release()
        await store.aclose()
    lost = [
        sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "trioagg_events_lost_total"
    ]
    assert sum(lost) == 2
    assert_store_holds(db_url, {})


def point(key: str) -> Point:
    return (key, clock.now(), 1.0, "{}", None, None)


async def test_a_failing_shard_does_not_stop_the_purge_of_the_others(db_url: str) -> None:
    """Expired ids of shard 1 are forgotten though shard 0's file is gone; the purge
    still reports shard 0's outage."""
    db = Path(db_url)
    store = await open_store(Settings.from_text({"db": str(db), "writers": "2"}))
    try:
        for path in (db, Path(f"{db}-shard1")):
            with contextlib.closing(sqlite3.connect(path)) as conn, conn:
                conn.executemany("INSERT INTO event_ids (id, seen) VALUES (?, 0)", [("a",), ("b",)])
        os.remove(db)
        with pytest.raises(StoreOutage, match="deleted or replaced"):
            await store.purge_expired_ids()
        with contextlib.closing(sqlite3.connect(f"{db}-shard1")) as conn:
            assert conn.execute("SELECT count(*) FROM event_ids").fetchone() == (0,)
    finally:
        await store.aclose()
