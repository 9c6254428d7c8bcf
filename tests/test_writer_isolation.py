"""A rollup the store refuses is set aside alone: the flush isolates the rows the
rollups table refuses, keeps them in ``refused_rollups``, and stores everything else,
on real SQLite and PostgreSQL stores.

The culprit is made the way a real client once could: a value of -1e308 stored in a
bucket makes every later merge into that bucket overflow (SQLite: NOT NULL on s2,
PostgreSQL: "value out of range"). Validation now refuses such values, so these tests
hand points to the store directly, as a store holding an old poisoned row would. The
requests are acknowledged once journalled; the refusal comes at the flush, which sets
the merge aside (nothing lost) and goes on with the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import trio

from trioagg.core.settings import Settings
from trioagg.ingest.writer import Receipt, Submission, Writers
from trioagg.service.metrics import Metrics
from trioagg.store import open_store

from . import clock
from .conftest import sql, stored_counts


def point(key: str, value: float = 1.0, ts: float | None = None) -> Any:
    return (key, clock.now() if ts is None else ts, value, "{}", None, None)


@contextlib.asynccontextmanager
async def poisoned_writers(db_url: str) -> AsyncIterator[tuple[Writers, Metrics]]:
    """Writers over a store whose bucket of key "poison" is poisoned."""
    store = await open_store(Settings.from_text({"db": db_url, "busy_timeout": "30s"}))
    try:
        await store.append([[point("poison", -1e308)]])
        await store.flush()
        metrics = Metrics()
        writers = Writers(
            store, metrics, count=1, batch_size=100_000, queue_size=1000, enqueue_timeout=10
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(writers.run)
            yield writers, metrics
            writers.close()
    finally:
        await store.aclose()


def refused(db_url: str) -> list[tuple[str, int]]:
    return [
        (key, int(count)) for key, count in sql(db_url, "SELECT key, count FROM refused_rollups")
    ]


async def test_a_poisoned_row_among_200_concurrent_requests_is_set_aside_alone(
    db_url: str, hold_write_lock: Any
) -> None:
    async with poisoned_writers(db_url) as (writers, metrics):
        await poison_among_200(writers, metrics, db_url, hold_write_lock)


async def poison_among_200(
    writers: Writers, metrics: Metrics, db_url: str, hold_write_lock: Any
) -> None:
    # Hold the lock so that all 200 requests queue and meet in one batch.
    hold_write_lock.acquire(db_url)
    outcomes: dict[int, str] = {}
    queued = 0

    async def request(number: int) -> None:
        nonlocal queued
        points = [point("poison", 5.0)] if number == 137 else [point(f"k{number % 7}")] * 3
        submission = await writers.submit(points, durable=True)
        queued += 1
        await submission.wait_committed()
        outcomes[number] = "ok"

    async with trio.open_nursery() as clients:
        for number in range(200):
            clients.start_soon(request, number)
        with trio.fail_after(10):
            while queued < 200:
                await trio.sleep(0.01)
        hold_write_lock.release()
    await writers.flushed()

    assert set(outcomes.values()) == {"ok"} and len(outcomes) == 200
    counts = stored_counts(db_url)
    assert counts.pop("poison") == 1  # the poisoned row as it was: nothing merged into it
    assert sum(counts.values()) == 199 * 3
    assert refused(db_url) == [("poison", 1)]  # the merge it refused, kept
    assert sql(db_url, "SELECT count(*) FROM journal") == [(0,)]
    registry = metrics.registry
    assert registry.get_sample_value("trioagg_events_committed_total") == 199 * 3 + 1
    assert registry.get_sample_value("trioagg_rollups_refused_total") == 1


async def test_a_refused_merge_of_202_events_is_set_aside_and_the_rest_stored(
    db_url: str, hold_write_lock: Any
) -> None:
    async with poisoned_writers(db_url) as (writers, metrics):
        hold_write_lock.acquire(db_url)
        submissions: list[Submission | Receipt] = []
        for number in range(10):
            points = [point("poison", 5.0)] * 2 if number == 4 else [point("fine")]
            submissions.append(await writers.submit(points, durable=False))
        hold_write_lock.release()
        with trio.fail_after(10):
            while not all(isinstance(s, Submission) and s.done for s in submissions):
                await trio.sleep(0.01)
        assert writers.waiting() == (0, 0)  # all answered
        await writers.flushed()
        # The writer goes on flushing: the poisoned slot again, and the others.
        await writers.submit([point("poison", 6.0), point("fine")], durable=True)
        await writers.flushed()
    assert stored_counts(db_url) == {"poison": 1, "fine": 10}
    assert refused(db_url) == [("poison", 2), ("poison", 1)]
    assert (
        metrics.registry.get_sample_value(
            "trioagg_events_lost_total", {"reason": "refused by the store"}
        )
        is None
    )


async def test_a_failing_follow_up_of_a_commit_leaves_the_writer_running(
    tmp_path: Any, caplog: Any
) -> None:
    """The flush stands; the failure is logged once with its traceback and counted; the
    writer goes on committing and flushing (issue 19: a read cache bug raised here and
    took the process down)."""
    db = str(tmp_path / "trioagg.db")
    store = await open_store(Settings.from_text({"db": db}))
    told: list[set[str]] = []

    def committed(touched: Any, shard: int, generation: int, flushed: Any) -> None:
        told.append(set(touched))
        raise RuntimeError("a bug after the commit")

    try:
        metrics = Metrics()
        writers = Writers(
            store,
            metrics,
            count=1,
            batch_size=100,
            queue_size=10,
            enqueue_timeout=10,
            committed=committed,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(writers.run)
            for key in ("first", "second"):
                submission = await writers.submit([point(key)], durable=True)
                assert isinstance(submission, Submission)
                await submission.wait_committed()
                await writers.flushed()  # the read cache is told at each flush
            assert writers.running
            writers.close()
    finally:
        await store.aclose()
    assert told == [{"first"}, {"second"}]
    assert stored_counts(db) == {"first": 1, "second": 1}
    registry = metrics.registry
    assert registry.get_sample_value("trioagg_events_committed_total") == 2
    where = {"where": "commit_follow_up"}
    assert registry.get_sample_value("trioagg_contained_failures_total", where) == 2
    failures = [r for r in caplog.records if "after a commit failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info is not None for r in failures)
