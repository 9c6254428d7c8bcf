"""The writers: tasks that turn queued requests into committed rollups.

What the words mean here:

* **accepted**: a request's events passed validation and its
  :class:`Submission` is in a writer's bounded channel. ``?wait=false``
  requests are answered 202 at this point.
* **committed**: the transaction appending the request's events to the journal
  has committed. Durable requests are answered 200 only after this, and never
  otherwise.

The loop takes the first waiting submission, drains every other one already
waiting (up to ``batch_size`` events, but never splitting a request), and
hands the batch to the store, which deduplicates ids, appends the events to
the journal as one transaction in a worker thread and folds their rollups into
the writer's head (:mod:`trioagg.store.head`). Then it wakes every durable
request of that batch. The head is flushed to the rollups table, one UPSERT
per series and bucket however many batches fed it, once ``flush_window``
passed since its first batch, once it holds ``head_max`` bytes, once no batch
came for a twentieth of the window (:data:`IDLE_PART`), and at shutdown. A flush runs between
batches, in a worker thread, so the event loop is never held by it. Journal
rows that dead processes left (or this process's last run) are replayed at
start and every :data:`REPLAY_EVERY` seconds.

When a commit fails, who hears of it depends on why:

* **Tied to the data** (the store refused a value, or a bug met an input):
  the batch is split in halves and each half committed on its own, down to
  single requests, so only the request that cannot be stored gets the error
  (422 ``unstorable_events``) and every other one is stored.
* **A store outage** (locked past ``busy_timeout``, unreachable, full,
  read-only, its file gone): durable requests get 503 ``commit_failed`` at
  once and may retry. Events already answered 202 are kept and retried with
  backoff until they commit or the drain deadline passes; while the store
  fails, new ``wait=false`` requests are refused (503) rather than
  acknowledged, since they might never be stored.

Cancellation: :meth:`Writers.submit` is cancellable while it waits for room
(and then nothing was queued). A writer stops by itself once its channel is
closed and drained; :meth:`Writers.stop_draining` ends the drain early, and
then every submission not committed is answered (503 for durable ones) and
counted as lost. A commit under way always finishes: a transaction running
in a thread is never abandoned.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

import trio

from ..core.errors import CommitFailed, Overloaded, StoreOutage, StoreUnavailable, Unstorable
from ..core.events import TS, Point
from ..service.metrics import Metrics
from ..store import Store
from ..store.plan import Flushed

log = logging.getLogger("trioagg.writer")

#: Told the keys a flush wrote, each with its first and last bucket (gathered in its
#: thread), the writer's number, its head's generation then and, when the table holds
#: them all, the rollups it wrote by key (:attr:`~trioagg.store.plan.Plan.flushed`): to
#: keep cached reads current.
Committed = Callable[[Mapping[str, tuple[int, int]], int, int, Flushed | None], None]

#: A writer flushes its head once no batch came for this part of the flush window.
IDLE_PART = 1 / 20
#: Seconds between looks for journal rows of dead processes.
REPLAY_EVERY = 5.0

#: What one decoded event is taken to hold in memory until it is committed.
EVENT_BYTES = 300
_FIRST_RETRY = 0.1
_MAX_RETRY = 2.0
#: Seconds an outage is remembered after the last failed commit (see Writer.failing).
FAILING_MEMORY = 10.0


class Submission:
    """One request's events (or the part of them one writer owns) on their way."""

    __slots__ = ("done", "duplicates", "durable", "error", "event", "points", "weight")

    def __init__(self, points: list[Point], *, durable: bool, weight: int = 0) -> None:
        self.points = points
        self.durable = durable
        #: Bytes of :class:`InflightBytes` these events hold until they are done.
        self.weight = weight
        #: Set when a durable submission is answered: committed, or failed with ``error``.
        self.event: trio.Event | None = trio.Event() if durable else None
        self.error: CommitFailed | Unstorable | None = None
        #: Events of this request whose id was already stored (not counted again).
        self.duplicates = 0
        #: Whether this submission has had its outcome: committed, failed or lost.
        self.done = False

    async def wait_committed(self) -> None:
        """Wait for the commit; raise the error the request should answer if it failed."""
        assert self.event is not None, "only durable submissions are waited on"
        await self.event.wait()
        if self.error is not None:  # a fresh exception per waiter: one shared would
            raise type(self.error)(self.error.message)  # gather every waiter's traceback


class Writer:
    """One bounded channel and the task that drains it into one write connection."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        shard: int = 0,
        batch_size: int,
        queue_size: int,
        inflight: InflightBytes | None = None,
        committed: Committed | None = None,
        flush_window: float = 1.0,
        head_max: int = 64 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.metrics = metrics
        #: Told the keys of each flush, as soon as it committed.
        self.committed = committed
        self.flush_window = flush_window
        self.head_max = head_max
        self.head = store.heads[shard]
        self.inflight = inflight or InflightBytes(None)
        self.shard = shard
        self.batch_size = batch_size
        self._send, self._receive = trio.open_memory_channel[Submission](queue_size)
        # A slot is a place in the channel, taken before sending and given back when the
        # writer receives: requests spanning writers take one slot of each, in shard order.
        self._slots = trio.Semaphore(queue_size)
        self._drain_scope = trio.CancelScope()
        self._current: list[Submission] = []
        self.running = False
        self.stopped = trio.Event()
        self.committed_events = 0
        #: Requests and events queued or being committed, not yet answered.
        self.waiting_requests = 0
        self.waiting_events = 0
        self._outage: str | None = None
        self._outage_at = -math.inf
        #: Why flushes fail, while they do (see failing).
        self._flush_outage: str | None = None
        self._last_batch_at = -math.inf
        #: When the head took its first batch since the last flush.
        self._opened_at: float | None = None
        self._replayed_at = -math.inf
        #: When a failed flush may be tried again.
        self._flush_retry_at = -math.inf
        self._flush_backoff = _FIRST_RETRY
        #: Set by every flush that committed (or found nothing to write); for readers
        #: that need the table to hold what was acknowledged (see :meth:`flushed`).
        self._flush_asked = False
        self._flush_done = trio.Event()
        #: A flush is under way (its thread may have emptied the head already).
        self._flushing = False
        #: The loop's wait for a batch, while it waits.
        self._waiting: trio.CancelScope | None = None

    @property
    def failing(self) -> str | None:
        """Why the store failed to commit (an outage): while flushes fail for that
        reason, and else until a commit succeeds or ``FAILING_MEMORY`` seconds pass
        without another failure (then requests probe the store again, so an idle service
        does not stay "failing" for ever)."""
        if self._flush_outage is not None:
            return self._flush_outage
        if trio.current_time() - self._outage_at > FAILING_MEMORY:
            return None
        return self._outage

    def statistics(self) -> trio.MemoryChannelStatistics:
        return self._send.statistics()

    def has_room(self) -> bool:
        return self._slots.value > 0

    async def reserve(self, deadline: float) -> bool:
        """Take a slot in the channel by ``deadline``; False if none freed in time."""
        try:
            self._slots.acquire_nowait()
            return True
        except trio.WouldBlock:
            pass
        with trio.move_on_at(deadline):
            await self._slots.acquire()
            return True
        return False

    def unreserve(self) -> None:
        self._slots.release()

    def put(self, points: list[Point], *, durable: bool, weight: int = 0) -> Submission:
        """Queue events in a slot taken with :meth:`reserve` (never blocks)."""
        submission = Submission(points, durable=durable, weight=weight)
        try:
            self._send.send_nowait(submission)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._slots.release()
            raise _not_writing() from None
        self.waiting_requests += 1
        self.waiting_events += len(points)
        return submission

    def close(self) -> None:
        """Accept no more submissions; :meth:`run` returns once the channel is drained."""
        self._send.close()

    def stop_draining(self) -> None:
        """End the drain now: what is not committed is answered and counted as lost."""
        self._drain_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit batches until :meth:`close` was called and everything queued is stored
        (or :meth:`stop_draining`), then flush the head. Whatever way it ends, a crash
        included, every submission it holds is answered before it returns or raises.
        Before it starts, journal rows of dead processes are replayed."""
        self.running = True
        await self._replay_dead()
        task_status.started()
        why = "the service stopped before these events could be committed"
        try:
            with self._drain_scope:
                while True:
                    first = None
                    with trio.move_on_at(self._next_chore()) as self._waiting:
                        try:
                            first = await self._receive.receive()
                        except trio.EndOfChannel:
                            break
                    self._waiting = None
                    if first is not None:
                        self._slots.release()
                        self._current = self._drain([first])
                        await self._write(self._current)
                        self._current = []
                        self._last_batch_at = trio.current_time()
                        if self._opened_at is None and self.head.journal:
                            self._opened_at = self._last_batch_at
                    await self._chores()
                await self._flush_for_shutdown()
        except BaseException:
            why = "the writer crashed before these events could be committed"
            raise
        finally:
            self.running = False
            # Leftovers first: receiving from a closed channel gets nothing of what it holds.
            self._fail_leftovers(why)
            self._receive.close()  # senders get "not writing" from now on
            self.stopped.set()

    def _flush_why(self) -> str | None:
        """Why the head should be flushed now, if it should."""
        head, now = self.head, trio.current_time()
        if not (head.journal or head.stale or head.uncertain) or now < self._flush_retry_at:
            return None
        if self._flush_asked:
            return "read"
        if head.size >= self.head_max:
            return "size"
        # The same sums as _next_chore's deadlines: a wait that ends at one finds it due.
        opened = self._opened_at if self._opened_at is not None else now
        if now >= opened + self.flush_window:
            return "window"
        if now >= self._last_batch_at + self.flush_window * IDLE_PART:
            return "idle"
        return None

    def _next_chore(self) -> float:
        """When the loop should stop waiting for a batch to flush or replay."""
        head = self.head
        chore = self._replayed_at + REPLAY_EVERY
        if head.journal or head.stale or head.uncertain:
            opened = self._opened_at if self._opened_at is not None else trio.current_time()
            idle = self._last_batch_at + self.flush_window * IDLE_PART
            due = min(opened + self.flush_window, idle)
            if self._flush_asked:
                due = -math.inf
            chore = min(chore, max(due, self._flush_retry_at))
        return chore

    async def _chores(self) -> None:
        """Flush the head if it is due; while it is full and cannot be flushed, take no
        more batches (the channel fills and senders get 503), trying again with backoff."""
        while True:
            why = self._flush_why()
            if why is not None:
                await self._flush(why)
            if self.head.size < self.head_max or self._flush_retry_at <= trio.current_time():
                break
            await trio.sleep_until(self._flush_retry_at)
        if trio.current_time() - self._replayed_at >= REPLAY_EVERY:
            await self._replay_dead()

    async def _flush(self, why: str) -> bool:
        """Flush the head; on failure keep it and try again later. Whether it is empty."""
        started = time.perf_counter()
        self._flushing = True
        try:
            plan = await self.store.flush(self.shard, report=self.committed is not None)
        except Exception as failure:
            self.metrics.flush_failures.inc()
            reason = failure.reason if isinstance(failure, StoreOutage) else str(failure)
            if self._flush_backoff == _FIRST_RETRY:
                log.error(
                    "flushing %d rollups of %d events failed (kept, retrying): %s",
                    len(self.head),
                    self.head.events,
                    reason,
                )
            if isinstance(failure, StoreOutage):
                # Kept until a flush succeeds: a journal commit that still fits on a
                # nearly full disk must not make the service look well.
                self._flush_outage = failure.reason
            self._flush_retry_at = trio.current_time() + self._flush_backoff
            self._flush_backoff = min(self._flush_backoff * 2, _MAX_RETRY)
            return False
        finally:
            self._flushing = False
        self._flush_retry_at = -math.inf
        self._flush_backoff = _FIRST_RETRY
        self._flush_outage = None
        self._flush_asked = False
        self._opened_at = None
        self._flush_done.set()
        self._flush_done = trio.Event()
        if plan is not None:
            if self.committed is not None:
                with self._following_up("telling the read cache"):
                    self.committed(plan.touched, self.shard, self.head.generation, plan.flushed)
            with self._following_up("counting the flush"):
                self.metrics.rows_upserted.inc(plan.rows - len(plan.refused))
                self.metrics.rollups_refused.inc(len(plan.refused))
                self.metrics.flushes.labels(why).inc()
                self.metrics.flush_seconds.observe(time.perf_counter() - started)
        return True

    async def flushed(self) -> None:
        """Wait until a flush that began after this call committed (at once when the
        head is empty): then the table holds every batch acknowledged before the call.
        A flush under way whose thread emptied the head already is waited for too: the
        read cache is told of it only once it is back (see :meth:`_flush`)."""
        head = self.head
        if not (head.journal or head.stale or head.uncertain or self._flushing) or not self.running:
            return
        if self._flush_retry_at > trio.current_time():
            return  # flushing fails now: the table holds what it holds
        done = self._flush_done
        self._flush_asked = True
        if self._waiting is not None:  # waiting for a batch: look at the chores now
            self._waiting.cancel()
        await done.wait()

    async def _flush_for_shutdown(self) -> None:
        """Flush what the head holds, trying again through an outage until the drain is
        ended; what stays unflushed is in the journal, replayed at the next start."""
        try:
            while self.head.journal or self.head.stale or self.head.uncertain:
                if await self._flush("shutdown"):
                    break
                await trio.sleep_until(self._flush_retry_at)
        finally:
            if self.head.journal:
                log.warning(
                    "%d events of %d journal rows are not flushed: they stay in the journal, "
                    "and the next start (or another process) replays them",
                    self.head.events,
                    len(self.head.journal),
                )

    async def _replay_dead(self) -> None:
        """Store the journal rows dead processes left in this writer's database."""
        self._replayed_at = trio.current_time()
        try:
            rows, events = await self.store.replay_dead(self.shard)
        except Exception as failure:
            log.warning("replaying the journal of dead processes failed (will retry): %s", failure)
            return
        if rows:
            log.info("replayed %d events of %d journal rows left unflushed", events, rows)
            self.metrics.journal_replayed.inc(events)

    def _drain(self, batch: list[Submission]) -> list[Submission]:
        """Add submissions already waiting to ``batch``, up to ``batch_size`` events."""
        events = sum(len(submission.points) for submission in batch)
        while events < self.batch_size:
            try:
                submission = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self._slots.release()
            batch.append(submission)
            events += len(submission.points)
        return batch

    async def _write(self, batch: list[Submission]) -> None:
        """Commit ``batch``; retry its 202 submissions through an outage (see module)."""
        held = await self._commit(batch)
        delay = _FIRST_RETRY
        while held:
            await trio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY)
            # Requests queued meanwhile join the retry, as far as the batch has room;
            # the channel fills up behind it, so the 202s held stay bounded.
            held = self._drain(held)
            self._current = held
            held = await self._commit(held)

    async def _commit(self, batch: list[Submission]) -> list[Submission]:
        """Commit ``batch`` in one transaction, isolating a failure tied to the data.
        Returns the 202 submissions an outage kept from being stored."""
        started = time.perf_counter()
        events = sum(len(submission.points) for submission in batch)
        try:
            result = await self.store.append(
                [submission.points for submission in batch], shard=self.shard
            )
        except StoreOutage as outage:
            if self.failing is None:
                log.error("the store cannot commit (%s): %s", outage.reason, outage.__cause__)
            self._outage, self._outage_at = outage.reason, trio.current_time()
            self.metrics.commit_failures.inc()
            failure = CommitFailed(
                f"the store could not commit this request ({outage.reason}); "
                "nothing of it was stored: retry later"
            )
            for submission in batch:
                if submission.durable:
                    self._answer(submission, failure)
            return [submission for submission in batch if not submission.durable]
        except Exception as failure:
            self.metrics.commit_failures.inc()
            if len(batch) > 1:  # find the request the store refuses, store the others
                middle = len(batch) // 2
                return await self._commit(batch[:middle]) + await self._commit(batch[middle:])
            (culprit,) = batch
            log.error("the store refused a request of %d events: %s", events, failure)
            if culprit.durable:
                self._answer(
                    culprit,
                    Unstorable(
                        "the store refused this request's events; nothing of it was stored "
                        "and retrying it cannot help (the server log says why)"
                    ),
                )
            else:
                self._lose([culprit], "refused by the store")
            return []
        self._outage = None
        if self._flush_outage is not None:  # the store took this: try the head now
            self._flush_retry_at = -math.inf
        # The batch is stored whatever happens next: a failure of the work that follows
        # (a bug, a callback) is reported and skipped, never taken for a failed commit.
        for submission, duplicates in zip(batch, result.duplicates, strict=True):
            submission.duplicates = duplicates
            self._answer(submission, None)
        duplicates = sum(result.duplicates)
        self.committed_events += events - duplicates
        with self._following_up("counting the commit"):
            self.metrics.events_committed.inc(events - duplicates)
            self.metrics.events_duplicate.inc(duplicates)
            self.metrics.batch_events.observe(events)
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        return []

    @contextlib.contextmanager
    def _following_up(self, step: str) -> Iterator[None]:
        """Run a step of a commit's follow-up work: if it raises, log it with its
        traceback, count it in ``trioagg_contained_failures{where="commit_follow_up"}``
        and go on."""
        try:
            yield
        except Exception:
            log.exception("%s after a commit failed; the commit stands", step)
            self.metrics.count_contained("commit_follow_up")

    def _answer(self, submission: Submission, error: CommitFailed | Unstorable | None) -> None:
        self._done(submission)
        if submission.event is not None:
            submission.error = error
            submission.event.set()

    def _lose(self, submissions: Sequence[Submission], why: str) -> None:
        """Count and log 202 events that will never be stored."""
        events = sum(len(submission.points) for submission in submissions)
        for submission in submissions:
            self._done(submission)
        if events:
            self.metrics.events_lost.labels(why).inc(events)
            log.error("%d events answered 202 were lost: %s", events, why)

    def _done(self, submission: Submission) -> None:
        if not submission.done:
            self.waiting_requests -= 1
            self.waiting_events -= len(submission.points)
        submission.done = True
        self.inflight.give_back(submission.weight)
        submission.weight = 0

    def _fail_leftovers(self, why: str) -> None:
        """Answer every submission still held or queued: 503 for durable ones, and the
        202 ones counted as lost."""
        leftovers = [submission for submission in self._current if not submission.done]
        self._current = []
        while True:
            try:
                leftovers.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        if not leftovers:
            return
        failure = CommitFailed(f"{why}; nothing of this request was stored: retry")
        for submission in leftovers:
            if submission.durable:
                self._answer(submission, failure)
        self._lose([submission for submission in leftovers if not submission.durable], why)
        log.error("%d queued requests were answered unstored: %s", len(leftovers), why)


class InflightBytes:
    """Memory that requests hold, in bytes: the bodies being read, as far as they have
    arrived (and inflated), and decoded events until they are committed (or answered
    unstored). At most ``limit`` (None: no limit); a request whose next bytes would
    pass it is refused at once with 503 and Retry-After."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise :class:`Overloaded` (nothing held then)."""
        if self.limit is not None and self.used + size > self.limit:
            raise Overloaded(
                f"the server holds {self.used} bytes of requests in flight and this one "
                f"would pass max_inflight ({self.limit}); retry later",
                retry_after=1,
            )
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size

    @contextlib.contextmanager
    def holding(self) -> Iterator[Hold]:
        """A hold that starts empty and grows with :meth:`Hold.grow`; all of it is given
        back when the ``with`` ends, however it ends."""
        hold = Hold(self)
        try:
            yield hold
        finally:
            self.give_back(hold.size)


class Hold:
    """The bytes one request holds of an :class:`InflightBytes`, taken as they arrive
    rather than reserved for what it might send: a slow upload holds only what it sent."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: InflightBytes) -> None:
        self._budget = budget
        self.size = 0

    def grow(self, size: int) -> None:
        """Hold ``size`` more bytes, or raise :class:`Overloaded` (the hold unchanged)."""
        self._budget.take(size)
        self.size += size


class Admission:
    """A request on its way in (:meth:`Writers.admission`)."""

    def __init__(self, writers: Writers, hold: Hold) -> None:
        self._writers = writers
        #: Hold more bytes of the request, or raise :class:`Overloaded` (see :class:`Hold`).
        self.grow = hold.grow

    async def queue(
        self, events: list[Point] | Callable[[], Awaitable[list[Point]]], *, durable: bool
    ) -> tuple[list[Point], Submission | Receipt | None]:
        """Under one admission token (waiting up to ``enqueue_timeout``, else
        :class:`Overloaded`), build the request's events with ``events()`` (unless they
        are built already) and queue them with the writers (see :meth:`Writers.submit`).
        Returns them and what to wait on: None when there were none. The token is given
        back however this ends."""
        writers = self._writers
        await writers._admit()
        try:
            points = events if isinstance(events, list) else await events()
            if not points:
                return points, None
            return points, await writers.submit(points, durable=durable)
        finally:
            writers._admission.release()


def _split(total: int, sizes: list[int]) -> list[int]:
    """``total`` in parts proportional to ``sizes`` (summing to ``total`` exactly)."""
    whole = sum(sizes) or 1
    shares = [total * size // whole for size in sizes]
    shares[-1] += total - sum(shares)
    return shares


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
        errors = []
        for part in self.parts:
            try:
                await part.wait_committed()
            except (CommitFailed, Unstorable) as error:
                errors.append(error)
        if errors:
            kind = type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) else None
            message = (
                f"{len(errors)} of the {len(self.parts)} writers holding this request's events "
                "failed to commit; the events of the other writers' hours are stored. "
                "Retry the request with event ids to count every event once"
            )
            raise (kind or CommitFailed)(message)


class Writers:
    """``count`` writers; writer ``i`` owns the buckets where ``bucket_hour % count == i``.

    A request whose events fall in the hours of several writers is split into
    one part per writer; the parts are queued together or not at all (a slot
    in each writer's channel is reserved first, in shard order, so requests
    spanning writers wait in line like the others), and the request is
    acknowledged once every part has committed.
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
        max_inflight: int | None = None,
        committed: Committed | None = None,
        flush_window: float = 1.0,
        head_max: int = 64 * 1024 * 1024,
    ) -> None:
        self.enqueue_timeout = enqueue_timeout
        self.metrics = metrics
        self.inflight = InflightBytes(max_inflight)
        self.writers = [
            Writer(
                store,
                metrics,
                shard=shard,
                batch_size=batch_size,
                queue_size=queue_size,
                inflight=self.inflight,
                committed=committed,
                flush_window=flush_window,
                head_max=head_max // count,
            )
            for shard in range(count)
        ]
        self.stopped = trio.Event()
        #: False once shutdown began: new requests are refused (503).
        self.accepting = True
        self._admission = trio.Semaphore(queue_size * count)
        metrics.watch_channels(lambda: [writer.statistics() for writer in self.writers])

    @property
    def running(self) -> bool:
        return all(writer.running for writer in self.writers)

    @property
    def failing(self) -> str | None:
        """Why some writer's store fails to commit, if one does."""
        return next((writer.failing for writer in self.writers if writer.failing), None)

    @property
    def committed_events(self) -> int:
        return sum(writer.committed_events for writer in self.writers)

    def waiting(self) -> tuple[int, int]:
        """Requests and events queued or being committed, not answered yet."""
        return (
            sum(writer.waiting_requests for writer in self.writers),
            sum(writer.waiting_events for writer in self.writers),
        )

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
            self.accepting = False
            self.stopped.set()

    async def flushed(self) -> None:
        """Wait until the table holds every batch acknowledged before the call (see
        :meth:`Writer.flushed`)."""
        for writer in self.writers:
            await writer.flushed()

    def close(self) -> None:
        """Refuse new requests; the writers stop once their channels are drained."""
        self.accepting = False
        for writer in self.writers:
            writer.close()

    async def drain(self, timeout: float) -> bool:
        """Close the channels and let the writers commit what is queued, for at most
        ``timeout`` seconds; then end the drain (see :meth:`Writer.stop_draining`).
        Returns whether everything queued was committed in time."""
        self.close()
        with trio.move_on_after(timeout):
            await self.stopped.wait()
            return True
        for writer in self.writers:
            writer.stop_draining()
        await self.stopped.wait()  # at most one transaction under way
        return False

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[Admission]:
        """One request's way in, for the body of the ``async with``: the in-flight bytes
        it holds as its body arrives (:meth:`Admission.grow`), all given back when it
        ends, however it ends; and :meth:`Admission.queue`, which builds its events and
        queues them under an admission token."""
        with self.inflight.holding() as hold:
            yield Admission(self, hold)

    async def _admit(self) -> None:
        """Take one of ``queue_size`` admission tokens, waiting up to ``enqueue_timeout``,
        or raise :class:`Overloaded`. Taken once the body is read and before it is
        decoded, it bounds how many requests are decoded at once, so that under overload
        the server answers 503 before paying for the work, and the writer still gets its
        turn."""
        if not self.accepting:
            raise _not_writing()
        try:
            self._admission.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self.enqueue_timeout):
            await self._admission.acquire()
            return
        raise _overloaded(self.enqueue_timeout)

    async def submit(self, points: list[Point], *, durable: bool) -> Submission | Receipt:
        """Queue a request's events with the writers owning their hours (see the class).
        They hold ``EVENT_BYTES`` each of :attr:`inflight` until they are done; if that
        would pass its limit, :class:`Overloaded` is raised and nothing is queued."""
        count = len(self.writers)
        parts: dict[int, list[Point]] = {0: points}
        if count > 1:
            parts = {}
            for point in points:
                parts.setdefault(int(point[TS] // 3600) % count, []).append(point)
        if not durable:
            failing = next(
                (self.writers[s].failing for s in parts if self.writers[s].failing), None
            )
            if failing is not None:
                raise StoreUnavailable(
                    f"the store cannot commit now ({failing}); events that might never be "
                    "stored are not acknowledged: retry later, or send with wait=true"
                )
        weight = len(points) * EVENT_BYTES
        self.inflight.take(weight)
        deadline = trio.current_time() + self.enqueue_timeout
        reserved: list[int] = []
        try:
            for shard in sorted(parts):
                if not await self.writers[shard].reserve(deadline):
                    raise _overloaded(self.enqueue_timeout)
                reserved.append(shard)
            if not self.accepting:
                raise _not_writing()
        except BaseException:
            for shard in reserved:
                self.writers[shard].unreserve()
            self.inflight.give_back(weight)
            raise
        # No checkpoint from here to the last put: every part is queued, or none.
        shares = _split(weight, [len(part) for part in parts.values()])
        submissions = [
            self.writers[shard].put(part, durable=durable, weight=share)
            for (shard, part), share in zip(parts.items(), shares, strict=True)
        ]
        return submissions[0] if len(submissions) == 1 else Receipt(submissions)


async def purge_expired_ids(store: Store, interval: float) -> None:
    """Forget expired idempotency ids every ``interval`` seconds, until cancelled. Each
    chunk is a short transaction, so the writer is never held up long."""
    while True:
        await trio.sleep(interval)
        try:
            purged = await store.purge_expired_ids()
        except Exception as failure:
            log.warning("purging expired event ids failed (will retry): %s", failure)
        else:
            if purged:
                log.debug("forgot %d expired event ids", purged)


#: Seconds between two rolls of the tiers (see :meth:`Store.roll_tiers`): a minute's
#: buckets pass a horizon every minute, and a roll with nothing to do reads one row.
ROLL_EVERY = 60.0


async def roll_tiers(store: Store, metrics: Metrics, interval: float) -> None:
    """Roll the tiers' buckets past their horizons into the next tier, and drop what
    passed the retention, at start and then every ``interval`` seconds, until
    cancelled. Each wider bucket moves in a short transaction of its own, so the
    writers' commits interleave; a failure is logged and tried again next time."""
    while True:
        try:
            rolled, dropped = await store.roll_tiers()
        except Exception as failure:
            log.warning("rolling the tiers failed (will retry): %s", failure)
        else:
            metrics.tier_rows_rolled.inc(rolled)
            metrics.tier_rows_dropped.inc(dropped)
            if rolled or dropped:
                log.info("tiers: rolled %d rows into wider buckets, dropped %d", rolled, dropped)
        await trio.sleep(interval)
