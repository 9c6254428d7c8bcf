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
        batch_size: int,
        queue_size: int,
        enqueue_timeout: float,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.batch_size = batch_size
        self.enqueue_timeout = enqueue_timeout
        self._send, self._receive = trio.open_memory_channel[Submission](queue_size)
        self.running = False
        self.stopped = trio.Event()
        self.committed_events = 0
        metrics.watch_channel(self._send.statistics)

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._send.statistics()

    async def submit(self, points: list[Point], *, durable: bool) -> Submission:
        """Queue one request's events; raise :class:`Overloaded` if the channel stays
        full for longer than ``enqueue_timeout`` (nothing is queued then)."""
        submission = Submission(points, durable=durable)
        try:
            self._send.send_nowait(submission)
        except trio.WouldBlock:
            with trio.move_on_after(self.enqueue_timeout):
                await self._send.send(submission)
                return submission
            raise Overloaded(
                f"the writer's queue stayed full for {self.enqueue_timeout:g}s; retry later",
                retry_after=max(1, math.ceil(self.enqueue_timeout)),
            ) from None
        except trio.ClosedResourceError:
            raise Overloaded("the server is shutting down", retry_after=1) from None
        return submission

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
                    await self._commit(self._drain(first))
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
            result = await self.store.write([submission.points for submission in batch])
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
        for submission in batch:
            if submission.committed is not None:
                submission.error = error
                submission.committed.set()


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
