"""A request the store refuses fails alone: the writer bisects a failed batch down to
the culprit and stores everything else, on real SQLite and PostgreSQL stores.

The culprit is made the way a real client once could: a value of -1e308 stored in a
bucket makes every later merge into that bucket overflow (SQLite: NOT NULL on s2,
PostgreSQL: "value out of range"). Validation now refuses such values, so these tests
hand points to the writer directly, as a store holding an old poisoned row would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import trio

from trioagg.errors import Unstorable
from trioagg.metrics import Metrics
from trioagg.settings import Settings
from trioagg.store import open_store
from trioagg.writer import Receipt, Submission, Writers

from . import clock
from .conftest import stored_counts


def point(key: str, value: float = 1.0, ts: float | None = None) -> Any:
    return (key, clock.now() if ts is None else ts, value, "{}", None, None)


@contextlib.asynccontextmanager
async def poisoned_writers(db_url: str) -> AsyncIterator[tuple[Writers, Metrics]]:
    """Writers over a store whose bucket of key "poison" is poisoned."""
    store = await open_store(Settings.from_text({"db": db_url, "busy_timeout": "30s"}))
    try:
        await store.write([[point("poison", -1e308)]])
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


async def test_a_poison_request_among_200_concurrent_ones_fails_alone(
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
        try:
            await submission.wait_committed()
        except Unstorable as error:
            outcomes[number] = error.code
        else:
            outcomes[number] = "ok"

    async with trio.open_nursery() as clients:
        for number in range(200):
            clients.start_soon(request, number)
        with trio.fail_after(10):
            while queued < 200:
                await trio.sleep(0.01)
        hold_write_lock.release()

    assert outcomes.pop(137) == "unstorable_events"
    assert set(outcomes.values()) == {"ok"}
    counts = stored_counts(db_url)
    assert counts.pop("poison") == 1  # the poisoned row as it was: nothing merged into it
    assert sum(counts.values()) == 199 * 3
    assert metrics.registry.get_sample_value("trioagg_events_committed_total") == 199 * 3


async def test_a_refused_202_request_is_counted_as_lost_and_the_rest_stored(
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
        assert writers.waiting() == (0, 0)  # the failed request, the others: all answered
    assert stored_counts(db_url) == {"poison": 1, "fine": 9}
    lost = metrics.registry.get_sample_value(
        "trioagg_events_lost_total", {"reason": "refused by the store"}
    )
    assert lost == 2


async def test_a_failing_follow_up_of_a_commit_leaves_the_writer_running(
    tmp_path: Any, caplog: Any
) -> None:
    """The commit stands and is acknowledged; the failure is logged once with its
    traceback and counted; the writer goes on committing (issue 19: a read cache bug
    raised here and took the process down)."""
    db = str(tmp_path / "trioagg.db")
    store = await open_store(Settings.from_text({"db": db}))
    told: list[set[str]] = []

    def committed(touched: Any) -> None:
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
