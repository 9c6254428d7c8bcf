"""The writers' timing logic, deterministic under ``trio.testing.MockClock``: outages,
retries of 202 events, the drain deadline and slots for requests spanning writers.

The store here is a stand-in that fails or succeeds on cue (the issue of these tests
is the writer's timing, not SQL); the same paths run against real stores in
test_writer.py, test_writer_isolation.py and the fault-injection suite.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

from trioagg.core.errors import CommitFailed, Overloaded, StoreOutage, StoreUnavailable
from trioagg.ingest.writer import EVENT_BYTES, FAILING_MEMORY, Writers
from trioagg.service.loopwatch import watch_loop_stalls
from trioagg.service.metrics import Metrics
from trioagg.store import Appended
from trioagg.store.head import Head


class CuedStore:
    """Commits after ``delay`` seconds, or fails with an outage while ``down``; its
    flushes fail with an outage while ``flush_down``. A commit adds a journal row to the
    head (of nothing: these tests are about when the writer commits and flushes)."""

    def __init__(self, delay: float = 0.01, writers: int = 2) -> None:
        self.delay = delay
        self.down = False
        self.flush_down = False
        self.stored: list[Any] = []
        self.flushed = 0
        self.heads = [Head() for _ in range(writers)]

    async def append(self, batch: list[list[Any]], shard: int = 0) -> Appended:
        await trio.sleep(self.delay)
        if self.down:
            raise StoreOutage("the disk holding the database is full")
        self.stored.extend(point for points in batch for point in points)
        self.heads[shard].journal.append(len(self.stored))
        return Appended([0] * len(batch), sum(len(points) for points in batch))

    async def flush(self, shard: int = 0, *, report: bool = False) -> None:
        await trio.sleep(self.delay)
        if self.flush_down:
            raise StoreOutage("the disk holding the database is full")
        self.heads[shard].journal.clear()
        self.flushed += 1

    async def replay_dead(self, shard: int = 0) -> tuple[int, int]:
        return 0, 0


def event(hour: int = 0) -> Any:
    return ("k", hour * 3600.0 + 1, 1.0, "{}", None, None)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def start_writers(
    store: CuedStore, nursery: trio.Nursery, **settings: Any
) -> tuple[Writers, Metrics]:
    metrics = Metrics()
    options = {"count": 1, "batch_size": 1000, "queue_size": 100, "enqueue_timeout": 1.0}
    options.update(settings)
    writers = Writers(store, metrics, **options)  # type: ignore[arg-type]
    await nursery.start(writers.run)
    return writers, metrics


def lost(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("trioagg_events_lost_total", {"reason": reason}) or 0


async def test_202_events_are_retried_through_an_outage_until_they_commit(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CuedStore()
    writers, metrics = await start_writers(store, nursery)
    store.down = True
    await writers.submit([event()] * 3, durable=False)
    await trio.sleep(5)
    # Durable requests meanwhile are answered at once: they can retry themselves.
    durable = await writers.submit([event()], durable=True)
    with pytest.raises(CommitFailed, match="disk holding the database is full"):
        await durable.wait_committed()
    # While the store fails, 202 is not promised for new events.
    with pytest.raises(StoreUnavailable):
        await writers.submit([event()], durable=False)
    assert store.stored == []
    store.down = False
    await trio.sleep(5)
    assert len(store.stored) == 3
    assert writers.failing is None
    assert lost(metrics, "the service stopped before these events could be committed") == 0
    assert await writers.drain(10)


async def test_the_drain_deadline_answers_what_is_left_and_counts_lost_202s(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CuedStore()
    writers, metrics = await start_writers(store, nursery)
    store.down = True
    await writers.submit([event()] * 4, durable=False)
    waiting = await writers.submit([event()], durable=True)
    outcome: list[str] = []

    async def wait_durable() -> None:
        try:
            await waiting.wait_committed()
        except CommitFailed as error:
            outcome.append(error.message)

    nursery.start_soon(wait_durable)
    started = trio.current_time()
    assert not await writers.drain(30)
    assert trio.current_time() - started == pytest.approx(30, abs=1)
    await trio.sleep(0)
    assert len(outcome) == 1  # answered 503, not left hanging
    assert lost(metrics, "the service stopped before these events could be committed") == 4
    with pytest.raises(Overloaded, match="not running"):
        await writers.submit([event()], durable=True)


async def test_an_idle_service_forgets_an_outage_after_a_while(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CuedStore()
    writers, _ = await start_writers(store, nursery)
    store.down = True
    with pytest.raises(CommitFailed):
        await (await writers.submit([event()], durable=True)).wait_committed()
    assert writers.failing == "the disk holding the database is full"
    await trio.sleep(FAILING_MEMORY + 1)
    assert writers.failing is None
    writers.close()


async def test_requests_spanning_writers_wait_in_line_instead_of_starving(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Single-writer requests keep writer 0's channel full; a request with events in
    the hours of both writers must still get its turn within enqueue_timeout."""
    store = CuedStore(delay=0.05)
    writers, _ = await start_writers(store, nursery, count=2, queue_size=2, enqueue_timeout=1.0)
    spanning_results: list[str] = []

    async def hammer_writer_0() -> None:
        while True:
            with contextlib.suppress(Overloaded):
                await writers.submit([event(0)], durable=False)
            await trio.sleep(0)

    async with trio.open_nursery() as load:
        for _ in range(20):
            load.start_soon(hammer_writer_0)
        for _ in range(20):
            try:
                receipt = await writers.submit([event(0), event(1)], durable=True)
                await receipt.wait_committed()
                spanning_results.append("ok")
            except Overloaded:
                spanning_results.append("503")
        load.cancel_scope.cancel()
    assert spanning_results == ["ok"] * 20
    assert await writers.drain(30)


async def test_a_stalled_event_loop_is_measured(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    metrics = Metrics()
    nursery.start_soon(watch_loop_stalls, metrics, 0.01)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(0.3)  # as if one task had held the loop for 0.3 s
    await trio.testing.wait_all_tasks_blocked()
    longest = metrics.registry.get_sample_value("trioagg_loop_stall_seconds_sum")
    assert longest == pytest.approx(0.29)
    assert b"trioagg_loop_stall_max_seconds 0.29" in metrics.render()


async def test_bytes_in_flight_are_held_until_the_events_are_done(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CuedStore(delay=1.0)
    writers, _ = await start_writers(store, nursery, count=2, max_inflight=3 * EVENT_BYTES + 100)
    receipt = await writers.submit([event(0), event(1), event(1)], durable=True)
    assert writers.inflight.used == 3 * EVENT_BYTES
    with pytest.raises(Overloaded, match="max_inflight"):
        await writers.submit([event()] * 1, durable=True)
    assert writers.inflight.used == 3 * EVENT_BYTES  # nothing held for the refused one
    await receipt.wait_committed()
    assert writers.inflight.used == 0
    # Events answered unstored give their bytes back too.
    store.down = True
    await writers.submit([event()] * 3, durable=False)
    assert not await writers.drain(5)
    assert writers.inflight.used == 0


async def test_every_waiter_gets_an_error_of_its_own(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CuedStore()
    writers, _ = await start_writers(store, nursery)
    store.down = True
    submissions = [await writers.submit([event()], durable=True) for _ in range(2)]
    errors = []
    for submission in submissions:
        with pytest.raises(CommitFailed) as caught:
            await submission.wait_committed()
        errors.append(caught.value)
    assert errors[0] is not errors[1]
    writers.close()


async def test_failing_flushes_keep_the_writer_failing_though_commits_succeed(
    clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A nearly full disk may still take a journal row but not a flush's rows: the
    service must not look well (readyz, 202s) until a flush succeeds."""
    store = CuedStore()
    writers, metrics = await start_writers(store, nursery, count=1, flush_window=1.0)
    store.flush_down = True
    await (await writers.submit([event()], durable=True)).wait_committed()
    await trio.sleep(0.5)  # idle: the flush is tried, and tried again
    assert (metrics.registry.get_sample_value("trioagg_flush_failures_total") or 0) >= 2
    await (await writers.submit([event()], durable=True)).wait_committed()
    await trio.sleep(FAILING_MEMORY + 1)
    assert writers.failing == "the disk holding the database is full"
    with pytest.raises(StoreUnavailable):
        await writers.submit([event()], durable=False)
    store.flush_down = False
    await trio.sleep(3)  # the next retry, after a backoff of at most 2 s
    assert writers.failing is None and store.heads[0].journal == []
