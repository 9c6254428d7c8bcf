"""The writer under real contention: a second SQLite connection holds the write lock,
so commits genuinely wait, the channel fills, and busy retries run out."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from trioagg.store.base import flush_head, journal_batch
from trioagg.store.head import Head
from trioagg.store.plan import SeriesCache, WritePolicy
from trioagg.store.sqlite import SQLiteBackend

from .conftest import StartServer, metric, post, stored_counts, wait_until

POLICY = WritePolicy(3600, 86400.0, lambda key: False)


async def test_saturated_channel_answers_503_with_retry_after(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(queue_size="2", enqueue_timeout="200ms", busy_timeout="30s")
    hold_write_lock.acquire(server.db)
    writer = server.app.service.writers
    # The writer takes the first request and waits on the lock; two more fill the channel.
    assert (await post(server.client, [{"key": "q"}] * 2, wait="false")).status_code == 202
    await wait_until(lambda: writer.queued() == 0)
    for _ in range(2):
        assert (await post(server.client, [{"key": "q"}] * 2, wait="false")).status_code == 202
    assert writer.queued() == 2
    accepted = 6
    assert writer.waiting() == (3, accepted)  # one being committed, two queued

    with trio.fail_after(5):
        response = await post(server.client, {"key": "q"}, wait="false")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "overloaded"
    ready = await server.client.get("/readyz")
    assert ready.status_code == 503
    assert "saturated" in ready.json()["checks"]["queue"]

    hold_write_lock.release()
    assert (await post(server.client, {"key": "witness"})).status_code == 200
    assert stored_counts(server.db)["q"] == accepted
    assert writer.waiting() == (0, 0)


async def test_busy_database_is_retried_until_it_frees(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="30s")
    hold_write_lock.acquire(server.db)
    async with trio.open_nursery() as nursery:
        results: list[int] = []

        async def durable() -> None:
            results.append((await post(server.client, {"key": "busy"})).status_code)

        nursery.start_soon(durable)
        await trio.sleep(0.5)  # several retries with backoff
        assert results == []
        hold_write_lock.release()
    assert results == [200]
    assert stored_counts(server.db) == {"busy": 1}


async def test_failed_commit_answers_error_stores_nothing_and_writer_goes_on(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="300ms")
    hold_write_lock.acquire(server.db)
    response = await post(server.client, [{"key": "lost"}] * 3)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "commit_failed"
    assert server.app.service.writers.waiting() == (0, 0)  # answered: no longer waiting
    hold_write_lock.release()

    response = await post(server.client, {"key": "after"})
    assert response.status_code == 200
    assert stored_counts(server.db) == {"after": 1}
    assert await metric(server, "trioagg_commit_failures_total") == 1


async def test_queued_requests_share_one_transaction(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="30s")
    hold_write_lock.acquire(server.db)
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:

        async def durable(i: int) -> None:
            response = await post(server.client, {"key": "group", "value": i})
            statuses.append(response.status_code)

        for i in range(20):
            nursery.start_soon(durable, i)
        metrics = server.app.metrics
        await wait_until(
            lambda: metrics.registry.get_sample_value("trioagg_events_accepted_total") == 20
        )
        hold_write_lock.release()
    assert statuses == [200] * 20
    # Two commits: what the writer took first, then everything that queued behind it.
    assert await metric(server, "trioagg_batch_requests_count") == 2
    assert await metric(server, "trioagg_batch_requests_sum") == 20
    assert stored_counts(server.db) == {"group": 20}


async def test_batch_size_bounds_a_transaction_but_never_splits_a_request(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(batch_size="5", busy_timeout="30s")
    hold_write_lock.acquire(server.db)
    for _ in range(5):
        assert (await post(server.client, [{"key": "b"}] * 4, wait="false")).status_code == 202
    hold_write_lock.release()
    await wait_until(lambda: server.app.service.writers.committed_events == 20)
    # The first request alone, then [4 + 4] and [4 + 4]: a batch stops once it holds
    # batch_size events or more, and a request is never split.
    assert await metric(server, "trioagg_batch_events_count") == 3
    assert await metric(server, "trioagg_batch_events_sum") == 20
    assert stored_counts(server.db) == {"b": 20}


async def test_a_request_sending_its_body_holds_no_admission_token(
    start_server: StartServer,
) -> None:
    """With queue_size=1, one request still sending its body does not hold the only
    admission token (the body is read before the token is taken): another request is
    admitted and stored meanwhile; then the slow one is too."""
    server = await start_server(queue_size="1", enqueue_timeout="200ms")
    release = trio.Event()

    async def slow_body() -> Any:
        yield b'[{"key": "slow"},'
        await release.wait()
        yield b'{"key": "slow"}]'

    async with trio.open_nursery() as nursery:
        statuses: list[int] = []

        async def send_slowly() -> None:
            response = await server.client.post(
                "/v1/events", content=slow_body(), headers={"Content-Type": "application/json"}
            )
            statuses.append(response.status_code)

        nursery.start_soon(send_slowly)
        await trio.sleep(0.2)  # the slow request is reading its body
        assert (await post(server.client, {"key": "fast"})).status_code == 200
        release.set()
    assert statuses == [200]
    assert (await post(server.client, {"key": "fast"})).status_code == 200
    assert stored_counts(server.db) == {"slow": 2, "fast": 2}


# With ids: BEGIN, SAVEPOINT, the claim (counted, not returned), RELEASE, the journal
# row, COMMIT.
@pytest.mark.parametrize(("event_id", "statements"), [(None, 3), ("id-1", 6)])
def test_a_batch_is_one_journal_row_in_one_transaction(
    tmp_path: Path, event_id: str | None, statements: int
) -> None:
    """BEGIN, the ids' claim when there are ids (under a savepoint), one journal row,
    COMMIT: what a durable answer waits for, whatever the batch's rows; its rollups wait
    in the head."""
    backend = SQLiteBackend(str(tmp_path / "s.db"))
    conn = backend.connect(write=True)
    backend.prepare(conn, 3600)
    happened: list[str] = []
    conn.set_trace_callback(lambda statement: happened.append(" ".join(statement.split()[:3])))
    point = ("k", 1_764_000_000.0, 1.0, "{}", None, event_id)
    head = Head()
    appended = journal_batch(conn, backend, [[point, point]], POLICY, "t/0", head)
    conn.set_trace_callback(None)
    assert len(happened) == statements
    assert happened[0].startswith("BEGIN") and happened[-1] == "COMMIT"
    assert happened[-2] == "INSERT INTO journal"
    assert conn.execute("SELECT count(*), sum(events) FROM journal").fetchone() == (
        1,
        2 if event_id is None else 1,
    )
    assert appended.duplicates == [0 if event_id is None else 1]
    assert [rollup.count for rollup in head.rollups.values()] == [appended.events]
    assert conn.execute("SELECT count(*) FROM rollups").fetchone() == (0,)
    backend.close(conn)


def test_a_flush_names_the_buckets_each_key_it_wrote_touched(tmp_path: Path) -> None:
    """Gathered in the flush's thread for the read cache: per key, its first and last
    bucket, over every batch the flush writes; duplicates write nothing."""
    backend = SQLiteBackend(str(tmp_path / "s.db"))
    conn = backend.connect(write=True)
    backend.prepare(conn, 3600)
    seen = SeriesCache()
    head = Head()
    hour = 1_764_000_000 // 3600 * 3600

    def journal(*submissions: list[tuple[str, int, str | None]]) -> list[int]:
        batch = [
            [  # every other event of another series of its key: spans are per key
                (
                    key,
                    hour + 3600 * hours + 1.0,
                    1.0,
                    '{"t":"x"}' if n % 2 else "{}",
                    None,
                    event_id,
                )
                for n, (key, hours, event_id) in enumerate(points)
            ]
            for points in submissions
        ]
        return journal_batch(conn, backend, batch, POLICY, "t/0", head).duplicates

    def flush() -> dict[str, tuple[int, int]] | None:
        plan = flush_head(conn, backend, head, "t/0", POLICY, seen)
        return None if plan is None else plan.touched

    assert journal([("a", 2, None), ("b", 0, None)], [("c", 0, None)]) == [0, 0]
    assert journal([("a", -3, None)]) == [0]
    assert flush() == {
        "a": (hour - 3 * 3600, hour + 2 * 3600),
        "b": (hour, hour),
        "c": (hour, hour),
    }
    assert flush() is None  # nothing new
    # e repeats d's id: a duplicate, it writes nothing
    assert journal([("d", 0, "id-1"), ("e", 5, "id-1")]) == [1]
    assert flush() == {"d": (hour, hour)}
    # id-1 was stored before; f's other event is counted
    assert journal([("f", 1, "id-1"), ("f", 0, None)]) == [1]
    assert flush() == {"f": (hour, hour)}
    backend.close(conn)
    assert stored_counts(tmp_path / "s.db") == {"a": 2, "b": 1, "c": 1, "d": 1, "f": 1}


@pytest.mark.parametrize("limit", [999, 32_766])
def test_a_flush_binds_no_more_parameters_than_sqlite_allows(tmp_path: Path, limit: int) -> None:
    """A flush upserts many rows per statement: never more than the SQLite it runs on
    binds (999 parameters where it was built before 3.32), and every row lands."""
    backend = SQLiteBackend(str(tmp_path / "s.db"))
    conn = backend.connect(write=True)
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
    backend.prepare(conn, 3600)
    head = Head()
    hour = 1_764_000_000 // 3600 * 3600
    points = [(f"k{n}", hour + 1.0, float(n), "{}", None, None) for n in range(2_500)]
    happened: list[str] = []
    conn.set_trace_callback(happened.append)
    for _ in range(2):  # new rows, then rows merged into stored ones
        journal_batch(conn, backend, [points], POLICY, "t/0", head)
        assert flush_head(conn, backend, head, "t/0", POLICY, SeriesCache()) is not None
    conn.set_trace_callback(None)
    # Not a row refused and written alone: every statement of the flush passed.
    assert not [statement for statement in happened if statement.startswith("ROLLBACK")]
    assert conn.execute(
        "SELECT count(*), sum(count), sum(shift * count + s1) FROM rollups"
    ).fetchone() == (
        2_500,
        5_000,
        2.0 * sum(range(2_500)),
    )
    backend.close(conn)
