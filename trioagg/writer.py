"""The writer: one task that turns queued requests into committed rollups.

What the words mean here:

* **accepted**: a request's events passed validation and its
  :class:`Submission` is in the writer's bounded channel. ``?wait=false``
  requests are answered 202 at this point; a crash before the commit loses them.
* **committed**: the transaction holding the request's events has committed.
  Durable requests are answered 200 only after this, and never otherwise.

The loop takes the first waiting submission, drains every other one already
waiting (up to ``batch_size`` events, but never splitting a request), and
hands the batch to the store, which deduplicates ids, merges the events in
memory per (series, bucket) and commits the result as one transaction in a
worker thread (meanwhile the event loop goes on accepting requests). Then it
wakes every durable request of that batch, with its duplicate count or with
the error if the commit failed (in which case nothing of the batch is
stored), and goes on with the next batch.

Cancellation: :meth:`Writer.submit` is cancellable while it waits for room
(and then nothing was queued). :meth:`Writer.run` should not be cancelled;
it ends by itself after :meth:`Writer.close` once the channel is drained, and
a commit under way always finishes, cancelled or not.
"""

from __future__ import annotations

import logging
import math
import time

import trio

from .errors import CommitFailed, Overloaded
from .ingest import Point
from .metrics import Metrics
from .store import Store

log = logging.getLogger("trioagg.writer")


class Submission:
    """One request's events on their way to the store."""

    __slots__ = ("committed", "duplicates", "error", "points")

    def __init__(self, points: list[Point], *, durable: bool) -> None:
        self.points = points
        #: Set once the batch holding these events has committed or failed.
        self.committed: trio.Event | None = trio.Event() if durable else None
        self.error: CommitFailed | None = None
        #: Events of this request whose id was already stored (not counted again).
        self.duplicates = 0

    async def wait_committed(self) -> None:
        """Wait for the commit; raise :class:`CommitFailed` if it failed."""
        assert self.committed is not None, "only durable submissions are waited on"
        await self.committed.wait()
        if self.error is not None:
            raise self.error


class Writer:
    """The bounded channel and the task that drains it into the store."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        shard: int = 0,
        batch_size: int,
        queue_size: int,
        enqueue_timeout: float,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.shard = shard
        self.batch_size = batch_size
        self.enqueue_timeout = enqueue_timeout
        self._send, self._receive = trio.open_memory_channel[Submission](queue_size)
        self.running = False
        self.stopped = trio.Event()
        self.committed_events = 0

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._send.statistics()

    def has_room(self) -> bool:
        stats = self._send.statistics()
        return stats.current_buffer_used < stats.max_buffer_size

    def submit_nowait(self, points: list[Point], *, durable: bool) -> Submission:
        """Queue one request's events now; raises ``trio.WouldBlock`` if the channel is full."""
        submission = Submission(points, durable=durable)
        try:
            self._send.send_nowait(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise _not_writing() from None
        return submission

    async def submit(self, points: list[Point], *, durable: bool) -> Submission:
        """Queue one request's events; raise :class:`Overloaded` if the channel stays
        full for longer than ``enqueue_timeout`` (nothing is queued then)."""
        try:
            return self.submit_nowait(points, durable=durable)
        except trio.WouldBlock:
            pass
        submission = Submission(points, durable=durable)
        with trio.move_on_after(self.enqueue_timeout):
            try:
                await self._send.send(submission)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                raise _not_writing() from None
            return submission
        raise _overloaded(self.enqueue_timeout)

    def close(self) -> None:
        """Accept no more submissions; :meth:`run` returns once the channel is drained."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until :meth:`close` was called and everything queued is stored."""
        self.running = True
        task_status.started()
        try:
            async with self._receive:
                async for first in self._receive:
                    batch = self._drain(first)
                    try:
                        await self._commit(batch)
                    except Exception as failure:  # a bug: answer the batch, keep writing
                        log.exception("the writer failed on a batch of %d requests", len(batch))
                        self._answer(batch, CommitFailed(f"the writer failed: {failure}"))
        finally:
            self.running = False
            self.stopped.set()

    def _drain(self, first: Submission) -> list[Submission]:
        batch = [first]
        events = len(first.points)
        while events < self.batch_size:
            try:
                submission = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.append(submission)
            events += len(submission.points)
        return batch

    async def _commit(self, batch: list[Submission]) -> None:
        started = time.perf_counter()
        events = sum(len(submission.points) for submission in batch)
        error = None
        try:
            result = await self.store.write(
                [submission.points for submission in batch], shard=self.shard
            )
        except Exception as failure:
            log.error("commit of %d events failed, none stored: %s", events, failure)
            self.metrics.commit_failures.inc()
            error = CommitFailed(f"the transaction holding these events failed: {failure}")
        else:
            for submission, duplicates in zip(batch, result.duplicates, strict=True):
                submission.duplicates = duplicates
            duplicates = sum(result.duplicates)
            self.committed_events += events - duplicates
            self.metrics.events_committed.inc(events - duplicates)
            self.metrics.events_duplicate.inc(duplicates)
            self.metrics.rows_upserted.inc(result.rows)
            self.metrics.batch_events.observe(events)
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self._answer(batch, error)

    @staticmethod
    def _answer(batch: list[Submission], error: CommitFailed | None) -> None:
        """Wake the durable requests of ``batch``, with ``error`` if it was not stored."""
        for submission in batch:
            if submission.committed is not None:
                submission.error = error
                submission.committed.set()


def _not_writing() -> Overloaded:
    return Overloaded("the writer is not running (shutting down); retry later", retry_after=1)


def _overloaded(timeout: float) -> Overloaded:
    return Overloaded(
        f"the writer's queue stayed full for {timeout:g}s; retry later",
        retry_after=max(1, math.ceil(timeout)),
    )


class Receipt:
    """The parts of one request that went to several writers."""

    def __init__(self, parts: list[Submission]) -> None:
        self.parts = parts

    @property
    def duplicates(self) -> int:
        return sum(part.duplicates for part in self.parts)

    async def wait_committed(self) -> None:
        """Wait for every part; raise :class:`CommitFailed` if any part failed."""
        failed = 0
        for part in self.parts:
            try:
                await part.wait_committed()
            except CommitFailed:
                failed += 1
        if failed:
            raise CommitFailed(
                f"{failed} of the {len(self.parts)} writers holding this request's events "
                "failed to commit; the events of the other writers' hours are stored. "
                "Retry the request with event ids to count every event once"
            )


class Writers:
    """``count`` writers; writer ``i`` owns the buckets where ``bucket_hour % count == i``.

    A request whose events fall in the hours of several writers is split into
    one part per writer; the parts are queued together or not at all, and the
    request is acknowledged once every part has committed.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        count: int,
        batch_size: int,
        queue_size: int,
        enqueue_timeout: float,
    ) -> None:
        self.enqueue_timeout = enqueue_timeout
        self.writers = [
            Writer(
                store,
                metrics,
                shard=shard,
                batch_size=batch_size,
                queue_size=queue_size,
                enqueue_timeout=enqueue_timeout,
            )
            for shard in range(count)
        ]
        self.stopped = trio.Event()
        self._admission = trio.Semaphore(queue_size * count)
        metrics.watch_channels(lambda: [writer.statistics() for writer in self.writers])

    @property
    def running(self) -> bool:
        return all(writer.running for writer in self.writers)

    @property
    def committed_events(self) -> int:
        return sum(writer.committed_events for writer in self.writers)

    def queued(self) -> int:
        return sum(writer.statistics().current_buffer_used for writer in self.writers)

    def saturated(self) -> bool:
        return not all(writer.has_room() for writer in self.writers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every writer until :meth:`close` and their channels are drained."""
        try:
            async with trio.open_nursery() as nursery:
                for writer in self.writers:
                    await nursery.start(writer.run)
                task_status.started()
        finally:
            self.stopped.set()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    async def admit(self) -> None:
        """Take one of ``queue_size`` admission tokens, waiting up to ``enqueue_timeout``,
        or raise :class:`Overloaded`; give it back with :meth:`admitted` once the request
        is queued or refused. Taken before a request's body is read and decoded, it
        bounds how many requests are decoded at once, so that under overload the server
        answers 503 before paying for the work, and the writer still gets its turn."""
        try:
            self._admission.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self.enqueue_timeout):
            await self._admission.acquire()
            return
        raise _overloaded(self.enqueue_timeout)

    def admitted(self) -> None:
        """Give back the token of :meth:`admit`."""
        self._admission.release()

    async def submit(self, points: list[Point], *, durable: bool) -> Submission | Receipt:
        """Queue a request's events with the writers owning their hours (see the class)."""
        count = len(self.writers)
        if count == 1:
            return await self.writers[0].submit(points, durable=durable)
        parts: dict[int, list[Point]] = {}
        for point in points:
            parts.setdefault(int(point[1] // 3600) % count, []).append(point)
        if len(parts) == 1:
            ((shard, part),) = parts.items()
            return await self.writers[shard].submit(part, durable=durable)
        deadline = trio.current_time() + self.enqueue_timeout
        while not all(self.writers[shard].has_room() for shard in parts):
            if trio.current_time() >= deadline:
                raise _overloaded(self.enqueue_timeout)
            await trio.sleep(0.005)
        # No checkpoint from the check to the last send: every part is queued, or none.
        return Receipt(
            [
                self.writers[shard].submit_nowait(part, durable=durable)
                for shard, part in parts.items()
            ]
        )


async def purge_expired_ids(store: Store, interval: float, scope: trio.CancelScope) -> None:
    """Forget expired idempotency ids every ``interval`` seconds until ``scope`` is
    cancelled. Each chunk is a short transaction, so the writer is never held up long."""
    with scope:
        while True:
            await trio.sleep(interval)
            try:
                purged = await store.purge_expired_ids()
            except Exception as failure:
                log.warning("purging expired event ids failed (will retry): %s", failure)
            else:
                if purged:
                    log.debug("forgot %d expired event ids", purged)
