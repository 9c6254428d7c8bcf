"""The Python client: batching senders and typed queries.

:class:`AsyncClient` is for async programs. It is built on ``httpx.AsyncClient``
and anyio, so it runs under trio and under asyncio alike. :class:`Client` is
for plain synchronous code: it runs an :class:`AsyncClient` on trio in a
background thread of its own, and any number of threads may call it.

``send()`` never makes a request: events go into a bounded buffer, encoded,
and a flusher cuts the buffer into NDJSON requests (optionally gzip) when it
holds ``batch_events`` events or ``batch_bytes`` bytes, when its oldest event
is ``max_delay`` seconds old, on ``flush()``, and on ``close()``. Each event
gets a time-ordered id (UUIDv7) unless it has one, so a request retried after a
lost answer is counted once by the server (within its dedup window).
``close()`` flushes for at most ``close_timeout`` seconds in all, then raises
:class:`Undelivered` with the events it could not deliver. What leaving the
process does to a :class:`Client`'s buffer is :mod:`trioagg.client.exits`'s; the
errors the client raises, one tree under :class:`ClientError`, are
:mod:`trioagg.client.errors`'.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime
import functools
import gzip
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Final,
    Literal,
    ParamSpec,
    TypedDict,
    TypeVar,
    Unpack,
)

import anyio
import anyio.abc
import httpx
import msgspec

from ..core import answers
from ..core.answers import Accepted, KeyInfo, Keys
from . import exits
from .answers import Aggregates, Top, typed
from .errors import ClientError, ServerError, Timeout, TransportError, Undelivered

if TYPE_CHECKING:
    import trio

__all__ = [
    "DEFAULT_URL",
    "SERVER_MAX_BYTES",
    "SERVER_MAX_EVENTS",
    "AsyncClient",
    "Client",
    "ClientError",
    "ClientOptions",
    "Counters",
    "Policy",
    "Rejected",
    "ServerError",
    "Timeout",
    "TransportError",
    "Undelivered",
    "uuid7",
]

DEFAULT_URL: Final = "http://127.0.0.1:8000"
#: The server's default max_batch and max_body; a request never exceeds them.
SERVER_MAX_EVENTS: Final = 10_000
SERVER_MAX_BYTES: Final = 10 * 1024 * 1024
_RETRY_STATUS: Final = frozenset({502, 503, 504})
_T = TypeVar("_T")
_P = ParamSpec("_P")
_Params = list[tuple[str, str | int | float | bool | None]]

Policy = Literal["block", "drop_oldest"]


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10))
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))


class _Event(msgspec.Struct, omit_defaults=True):
    key: str
    value: float = 1.0
    ts: float | datetime.datetime | str | None = None
    tags: dict[str, str] | None = None
    distinct_id: str | None = None
    id: str | None = None


_encode = msgspec.json.Encoder().encode


@contextlib.contextmanager
def _noted_on(error: BaseException | None) -> Iterator[None]:
    """Let :class:`Undelivered` out of a ``with`` block's closing, but not over the
    block's own ``error``: then only as a note on it (the events went to ``on_error``)."""
    try:
        yield
    except Undelivered as undelivered:
        if error is None:
            raise
        error.add_note(str(undelivered))


@dataclass(frozen=True)
class Rejected:
    """Events that will not be sent again, and were not stored: refused by the server
    (a 4xx: a :class:`ServerError`), given up after ``retry_timeout`` (``error`` is
    the last error met: a :class:`ServerError` or a :class:`TransportError`), or cut
    off by ``close_timeout`` (an :class:`Undelivered`; a request cut off under way
    may have been stored).

    ``events`` are the events as sent (JSON lines); ``problems`` are the server's
    details for them (for ``invalid_events``, by index into ``events``).
    """

    error: ClientError
    events: list[bytes]
    problems: list[dict[str, Any]]


@dataclass
class Counters:
    """What the client did, readable at any time.

    ``sent``: events handed to a first request; ``acknowledged``: events the server
    answered for (durable: committed; ``wait=False``: queued); ``duplicates``: of those,
    events whose id the server had already stored; ``retried``: requests sent again;
    ``dropped``: events pushed out of a full buffer (policy ``drop_oldest``);
    ``failed``: events refused (4xx), given up after ``retry_timeout`` or cut off by
    ``close_timeout`` (all passed to ``on_error``);
    ``buffered``: events not yet acknowledged, refused or dropped.
    """

    sent: int = 0
    acknowledged: int = 0
    duplicates: int = 0
    retried: int = 0
    dropped: int = 0
    failed: int = 0
    buffered: int = 0


@dataclass
class _Batch:
    lines: list[bytes]
    size: int = field(default=0)


class _Buffer:
    """Encoded events waiting for a request; bounded, and safe to fill from any thread."""

    def __init__(self, capacity: int, policy: Policy, counters: Counters) -> None:
        self.lines: collections.deque[bytes] = collections.deque()
        self.bytes = 0
        self.first_at = 0.0
        #: the flusher was told about the events buffered (once between two takes)
        self.woken = False
        #: the client is closing and its flusher has left: a put would be lost
        self.sealed = False
        self.capacity = capacity
        self.policy = policy
        self.counters = counters
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)

    def put(self, line: bytes, limits: tuple[int, int], wait: bool) -> bool | None:
        """Add ``line``; True when the flusher should wake (first event or a full batch,
        once until it takes a batch), None when the buffer is full and the policy says
        to wait (``wait`` False). Raises RuntimeError once the buffer is sealed."""
        with self.lock:
            while not self.sealed and len(self.lines) >= self.capacity:
                if self.policy == "drop_oldest":
                    self.bytes -= len(self.lines.popleft())
                    self.counters.dropped += 1
                    self.counters.buffered -= 1
                elif wait:
                    self.room.wait()
                else:
                    return None
            if self.sealed:
                raise RuntimeError("the client is closed")
            if not self.lines:
                self.first_at = time.monotonic()
            self.lines.append(line)
            self.bytes += len(line)
            self.counters.buffered += 1
            count = len(self.lines)
            if count == 1:
                return True
            if self.woken or (count < limits[0] and self.bytes < limits[1]):
                return False
            self.woken = True
            return True

    def put_many(self, lines: Sequence[bytes], limits: tuple[int, int]) -> tuple[int, bool]:
        """Add the first of ``lines`` there is room for (all of them under
        ``drop_oldest``, which drops the oldest to make room); (how many, whether the
        flusher should wake, as :meth:`put` says). Raises RuntimeError once sealed."""
        with self.lock:
            if self.sealed:
                raise RuntimeError("the client is closed")
            if self.policy == "block" and len(lines) > self.capacity - len(self.lines):
                lines = lines[: max(self.capacity - len(self.lines), 0)]
            if not lines:
                return 0, False
            wake = not self.lines  # the first event: the flusher keeps time from it
            if wake:
                self.first_at = time.monotonic()
            self.lines.extend(lines)
            self.bytes += sum(map(len, lines))
            self.counters.buffered += len(lines)
            while len(self.lines) > self.capacity:
                self.bytes -= len(self.lines.popleft())
                self.counters.dropped += 1
                self.counters.buffered -= 1
            if not self.woken and (len(self.lines) >= limits[0] or self.bytes >= limits[1]):
                wake = self.woken = True
            return len(lines), wake

    def take(self, max_events: int, max_bytes: int) -> _Batch:
        with self.lock:
            # The first line, then as many as keep the batch within max_bytes: counted
            # in C (10,000 lines a batch, where the loop's Python was 0.15 us each).
            ends = list(accumulate(map(len, islice(self.lines, max_events))))
            count = max(bisect.bisect_right(ends, max_bytes), 1) if ends else 0
            lines = [self.lines.popleft() for _ in range(count)]
            size = ends[count - 1] if count else 0
            self.bytes -= size
            self.woken = False
            self.first_at = time.monotonic()
            self.room.notify_all()
            return _Batch(lines, size)

    def seal(self) -> list[bytes]:
        """Refuse every later put, and hand over what is buffered."""
        with self.lock:
            self.sealed = True
            lines = list(self.lines)
            self.lines.clear()
            self.bytes = 0
            self.room.notify_all()
            return lines

    def ready(self, max_events: int, max_bytes: int, max_delay: float, closing: bool) -> float:
        """Seconds until a batch is due (0: now; inf: the buffer is empty, and then
        sealed if ``closing``, so that no event comes in once the flusher is gone)."""
        with self.lock:
            if not self.lines:
                if closing:
                    self.sealed = True
                return math.inf
            if len(self.lines) >= max_events or self.bytes >= max_bytes:
                return 0.0
            return max(0.0, self.first_at + max_delay - time.monotonic())


class AsyncClient:
    """Send events in batches and query a trioagg server, from trio or asyncio.

    Use it as ``async with AsyncClient(url) as client:``; leaving the block flushes
    everything and waits for the answers. See the module docstring for batching.

    ``buffer``: events held at most before ``policy`` applies: ``block`` makes
    ``send()`` wait for room, ``drop_oldest`` drops the oldest waiting event and
    counts it. ``wait=False`` asks for 202 answers (queued, not yet committed).
    Connection errors and 502/503/504 answers are retried with exponential backoff
    and full jitter (at least the ``Retry-After`` asked for) for ``retry_timeout``
    seconds; 4xx answers are not retried: the refused events go to ``on_error``.
    A 422 ``invalid_events`` refuses only the invalid events: the others of the
    request are sent again. A 413 splits the request in two. ``gzip=None`` sends
    gzip bodies while the server takes them and stops at the first that it refuses.
    ``close_timeout``: the most seconds closing may take in all (see :meth:`aclose`).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        batch_events: int = 1000,
        batch_bytes: int = 1024 * 1024,
        max_delay: float = 0.1,
        buffer: int = 100_000,
        policy: Policy = "block",
        wait: bool = True,
        gzip: bool | None = None,
        concurrency: int = 2,
        retry_timeout: float = 60.0,
        close_timeout: float = 20.0,
        timeout: float = 30.0,
        on_error: Callable[[Rejected], None] | None = None,
    ) -> None:
        if not 1 <= batch_events <= SERVER_MAX_EVENTS:
            raise ValueError(f"batch_events must be 1 to {SERVER_MAX_EVENTS}")
        if not 1 <= batch_bytes <= SERVER_MAX_BYTES // 2:
            raise ValueError(f"batch_bytes must be 1 to {SERVER_MAX_BYTES // 2}")
        if policy not in ("block", "drop_oldest"):
            raise ValueError("policy must be block or drop_oldest")
        if not close_timeout >= 0:
            raise ValueError("close_timeout must be 0 or more seconds")
        self.url = url.rstrip("/")
        self.counters = Counters()
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.max_delay = max_delay
        self.wait = wait
        self.gzip = gzip
        self.concurrency = concurrency
        self.retry_timeout = retry_timeout
        self.close_timeout = close_timeout
        self.on_error = on_error
        self._buffer = _Buffer(max(buffer, 1), policy, self.counters)
        self._limits = (batch_events, batch_bytes)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
        self._in_flight = 0
        self._flushing = False
        self._closing = False
        #: when closing gives up (the loop's clock); aclose() sets it
        self._deadline = math.inf
        #: the scopes of the requests and retry pauses under way, which the deadline ends
        self._cutoffs: set[anyio.CancelScope] = set()
        self._undelivered: list[bytes] = []
        self._last_error: ClientError | None = None
        self._group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AsyncClient:
        self._wake = anyio.Event()
        self._room = anyio.Event()
        self._idle = anyio.Event()
        self._group = await anyio.create_task_group().__aenter__()
        send, receive = anyio.create_memory_object_stream[_Batch](0)
        self._group.start_soon(self._flusher, send)
        for _ in range(self.concurrency):
            self._group.start_soon(self._sender, receive.clone())
        receive.close()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        with _noted_on(exc[1]):
            await self.aclose()

    async def aclose(self) -> None:
        """Flush every buffered event, wait for the answers, and stop; in all for at most
        ``close_timeout`` seconds. Then what is still buffered, waiting for a retry or
        in a request under way is given up: it goes to ``on_error`` and counts as
        ``failed``, and :class:`Undelivered` is raised with it."""
        if self._group is None or self._closing:
            return
        self._closing = True
        self._deadline = anyio.current_time() + self.close_timeout
        for scope in self._cutoffs:
            scope.deadline = self._deadline
        self.wake()
        try:
            await self._group.__aexit__(None, None, None)
        finally:
            await self._http.aclose()
        if self._undelivered:
            raise Undelivered(self._undelivered, self.close_timeout, self._last_error)

    # -- sending --------------------------------------------------------------

    def event(
        self,
        key: str,
        value: float = 1,
        ts: float | datetime.datetime | str | None = None,
        tags: Mapping[str, str] | None = None,
        distinct_id: str | None = None,
        id: str | None = None,
    ) -> bytes:
        """One event encoded as an NDJSON line, with an id (a new UUIDv7 if none)."""
        return (
            _encode(
                _Event(
                    key, float(value), ts, dict(tags) if tags else None, distinct_id, id or uuid7()
                )
            )
            + b"\n"
        )

    async def send(
        self,
        key: str,
        value: float = 1,
        ts: float | datetime.datetime | str | None = None,
        tags: Mapping[str, str] | None = None,
        distinct_id: str | None = None,
        id: str | None = None,
    ) -> None:
        """Buffer one event; waits only when the buffer is full under ``policy="block"``."""
        await self.send_encoded(self.event(key, value, ts, tags, distinct_id, id))

    async def send_encoded(self, line: bytes) -> None:
        """Buffer one event already encoded as a JSON object and a newline (with its id)."""
        if self._closing:
            raise RuntimeError("the client is closed")
        while (wake := self._buffer.put(line, self._limits, wait=False)) is None:
            room = self._room
            self.wake()
            await room.wait()
        if wake:
            self._wake.set()

    async def send_encoded_many(self, lines: Sequence[bytes]) -> None:
        """Buffer events already encoded (see :meth:`send_encoded`), as many at a time as
        there is room for: for a caller with thousands at hand (``trioagg ingest``)."""
        if self._closing:
            raise RuntimeError("the client is closed")
        while True:
            taken, wake = self._buffer.put_many(lines, self._limits)
            if wake:
                self._wake.set()
            if taken == len(lines):
                return
            lines = lines[taken:]
            room = self._room
            self.wake()
            await room.wait()

    def put_nowait(self, line: bytes, *, wait: bool) -> bool | None:
        """For :class:`Client`: buffer ``line`` from another thread (see ``_Buffer.put``)."""
        return self._buffer.put(line, self._limits, wait=wait)

    def wake(self) -> None:
        """Make the flusher look at the buffer now (call it in the client's own thread)."""
        self._wake.set()

    async def flush(self) -> None:
        """Send everything buffered now and wait until every request has its answer."""
        self._flushing = True
        try:
            while self.counters.buffered:
                idle = self._idle
                self.wake()
                await idle.wait()
        finally:
            self._flushing = False

    async def _flusher(self, batches: anyio.abc.ObjectSendStream[_Batch]) -> None:
        async with batches:
            while True:
                self._wake = anyio.Event()  # before looking: a later wake() is not lost
                if anyio.current_time() >= self._deadline:
                    self._cut_off(self._buffer.seal())
                    self._room.set()  # senders waiting for room find the buffer sealed
                    return
                wait = self._buffer.ready(*self._limits, self.max_delay, self._closing)
                if wait and (self._flushing or self._closing) and wait != math.inf:
                    wait = 0.0
                if wait == math.inf and self._closing:
                    return
                if wait > 0:
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
                    continue
                batch = self._buffer.take(*self._limits)
                self._room.set()
                self._room = anyio.Event()
                self._in_flight += 1
                await batches.send(batch)

    async def _sender(self, batches: anyio.abc.ObjectReceiveStream[_Batch]) -> None:
        async with batches:
            async for batch in batches:
                self.counters.sent += len(batch.lines)
                try:
                    await self._deliver(batch.lines)
                finally:
                    self._in_flight -= 1
                    if not self._in_flight:
                        self._idle.set()
                        self._idle = anyio.Event()

    async def _deliver(self, lines: list[bytes]) -> None:
        """Send ``lines`` until acknowledged, refused or out of time; count the outcome."""
        started = anyio.current_time()
        body = b"".join(lines)
        attempt = 0
        while True:
            zipped = self.gzip is not False
            response: httpx.Response | TransportError
            with self._until_deadline() as posting:
                try:
                    response = await self._post(body, zipped)
                except httpx.TransportError as error:
                    response = TransportError.of(error)
            if posting.cancelled_caught:
                self._cut_off(lines)
                return
            problem: ClientError
            if isinstance(response, TransportError):
                delay, problem = 0.0, response
            else:
                if response.status_code in (200, 202):
                    try:
                        answer = msgspec.json.decode(response.content, type=Accepted)
                    except msgspec.DecodeError as error:  # a retry would meet the same
                        invalid = ServerError.invalid_answer(response, "POST /v1/events", error)
                        self._fail(lines, invalid)
                        return
                    self._settle(len(lines), acknowledged=len(lines), dup=answer.duplicates)
                    if zipped:
                        self.gzip = True  # this server takes gzip bodies
                    return
                problem = ServerError.of(response)
                if zipped and self.gzip is not True and response.status_code in (400, 415):
                    self.gzip = False  # this server does not take gzip bodies
                    continue
                if response.status_code not in _RETRY_STATUS:
                    await self._refused(lines, problem)
                    return
                delay = _retry_after(response)
            self._last_error = problem
            attempt += 1
            backoff = min(30.0, 0.1 * 2 ** min(attempt, 10))  # 2**1024 overflows a float
            pause = max(delay, random.uniform(0, backoff))
            resume = anyio.current_time() + pause
            if resume > started + self.retry_timeout:
                self._fail(lines, problem)
                return
            if resume >= self._deadline:  # closing: give up now rather than at the deadline
                self._cut_off(lines)
                return
            with self._until_deadline() as pausing:
                await anyio.sleep(pause)
            if pausing.cancelled_caught:
                self._cut_off(lines)
                return
            self.counters.retried += 1

    @contextlib.contextmanager
    def _until_deadline(self) -> Iterator[anyio.CancelScope]:
        """A scope that closing's deadline cancels, also when set after it began."""
        with anyio.CancelScope(deadline=self._deadline) as scope:
            self._cutoffs.add(scope)
            try:
                yield scope
            finally:
                self._cutoffs.discard(scope)

    async def _post(self, body: bytes, zipped: bool) -> httpx.Response:
        headers = {"Content-Type": "application/x-ndjson"}
        if zipped:
            body = await anyio.to_thread.run_sync(functools.partial(gzip.compress, body, 1))
            headers["Content-Encoding"] = "gzip"
        params = {} if self.wait else {"wait": "false"}
        return await self._http.post("/v1/events", content=body, headers=headers, params=params)

    async def _refused(self, lines: list[bytes], error: ServerError) -> None:
        if error.status == 413 and len(lines) > 1:
            half = len(lines) // 2
            await self._deliver(lines[:half])
            await self._deliver(lines[half:])
            return
        details = [p for p in error.details if isinstance(p, dict)]
        indexes = {p.get("index") for p in details}
        if error.code == "invalid_events" and indexes and indexes <= set(range(len(lines))):
            bad = sorted(i for i in indexes if isinstance(i, int))
            problems = [{**p, "index": bad.index(p["index"])} for p in details]
            self._fail([lines[i] for i in bad], error, problems)
            good = [line for i, line in enumerate(lines) if i not in indexes]
            if good:
                await self._deliver(good)
            return
        self._fail(lines, error)

    def _cut_off(self, lines: list[bytes]) -> None:
        """Give ``lines`` up: closing's deadline came before their answer."""
        if not lines:
            return
        self._undelivered += lines
        self._fail(lines, Undelivered(lines, self.close_timeout, self._last_error))

    def _fail(
        self,
        lines: list[bytes],
        error: ClientError,
        problems: list[dict[str, Any]] | None = None,
    ) -> None:
        self._settle(len(lines), failed=len(lines))
        if self.on_error is not None:
            self.on_error(Rejected(error, lines, error.details if problems is None else problems))

    def _settle(self, count: int, acknowledged: int = 0, dup: int = 0, failed: int = 0) -> None:
        with self._buffer.lock:
            self.counters.buffered -= count
            self.counters.acknowledged += acknowledged
            self.counters.duplicates += dup
            self.counters.failed += failed

    # -- queries --------------------------------------------------------------

    async def aggregates(
        self,
        key: str | list[str] | tuple[str, ...],
        *,
        start: str | float | None = None,
        end: str | float | None = None,
        granularity: str | None = None,
        tz: str | None = None,
        fill: str | None = None,
        group_by: str | None = None,
        stats: str | list[str] | tuple[str, ...] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Aggregates:
        """``GET /v1/aggregates``; ``start`` and ``end`` are the ``from`` and ``to``.
        The answer is typed all the way down (see :mod:`trioagg.client.answers`).

        ``key``: one key, or a list or tuple of keys. ``stats``: a comma list
        (``"count,sum"``), or a list or tuple of names. ``group_by``: one tag name.
        Other types raise TypeError before any request."""
        if not isinstance(group_by, str | None):
            raise TypeError(f"group_by takes one tag name, a str, not {type(group_by).__name__}")
        params: _Params = [("key", k) for k in _names("key", key, comma=False)]
        params += _params(
            {"from": start, "to": end, "granularity": granularity, "tz": tz, "fill": fill},
            {"group_by": group_by, "stats": ",".join(_names("stats", stats, comma=True)) or None},
        )
        params += [(f"tag.{name}", value) for name, value in (tags or {}).items()]
        return typed(await self._get("/v1/aggregates", params, answers.Aggregates))

    async def keys(self, prefix: str | None = None, *, page: int = 1000) -> list[KeyInfo]:
        """Every key (``GET /v1/keys``, pages followed), optionally under ``prefix``."""
        found: list[KeyInfo] = []
        after: str | None = None
        while True:
            params = _params({"prefix": prefix, "after": after, "limit": page})
            answer = await self._get("/v1/keys", params, Keys)
            found += answer.keys
            if answer.next is None:
                return found
            after = answer.next

    async def top(
        self,
        *,
        start: str | float | None = None,
        end: str | float | None = None,
        stat: str | None = None,
        prefix: str | None = None,
        limit: int | None = None,
    ) -> Top:
        """``GET /v1/top``: keys ranked by count or sum over a range."""
        params = _params({"from": start, "to": end, "stat": stat, "prefix": prefix, "limit": limit})
        return await self._get("/v1/top", params, Top)

    async def _get(self, path: str, params: _Params, kind: type[_T]) -> _T:
        """The answer to ``GET path``, decoded; raises only :class:`ClientError` kinds."""
        try:
            response = await self._http.get(path, params=params)
        except httpx.TransportError as error:
            raise TransportError.of(error) from error
        if response.status_code != 200:
            raise ServerError.of(response)
        try:
            return msgspec.json.decode(response.content, type=kind)
        except msgspec.DecodeError as error:
            raise ServerError.invalid_answer(response, f"GET {path}", error) from error


def _names(
    parameter: str, value: str | list[str] | tuple[str, ...] | None, *, comma: bool
) -> list[str]:
    """The names a list-valued parameter was given: a list or tuple of str, or a str,
    which is a comma list when ``comma`` (``"count, sum"``) and else one name.

    Only these types: a str is a sequence too, and the names' order can matter."""
    if value is None:
        return []
    if isinstance(value, str):
        return [name.strip() for name in value.split(",")] if comma else [value]
    if isinstance(value, list | tuple) and all(isinstance(name, str) for name in value):
        return list(value)
    kind = type(value).__name__
    if isinstance(value, list | tuple):
        kind += " holding " + ", ".join(sorted({type(v).__name__ for v in value} - {"str"}))
    raise TypeError(f"{parameter} takes a str or a list or tuple of str, not a {kind}")


def _params(*groups: Mapping[str, object]) -> _Params:
    return [
        (name, str(value)) for group in groups for name, value in group.items() if value is not None
    ]


def _retry_after(response: httpx.Response) -> float:
    text = response.headers.get("Retry-After", "")
    try:
        return min(max(float(text), 0.0), 60.0)
    except ValueError:
        return 0.0


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of :class:`AsyncClient`, which :class:`Client` passes on:
    named and typed once more so that a type checker checks a ``Client``'s callers
    (a test holds the two to the same names and types; the defaults and what each
    means are :class:`AsyncClient`'s)."""

    api_key: str | None
    batch_events: int
    batch_bytes: int
    max_delay: float
    buffer: int
    policy: Policy
    wait: bool
    gzip: bool | None
    concurrency: int
    retry_timeout: float
    close_timeout: float
    timeout: float
    on_error: Callable[[Rejected], None] | None


def _blocking(
    method: Callable[Concatenate[AsyncClient, _P], Awaitable[_T]],
) -> Callable[Concatenate[Client, _P], _T]:
    """:class:`Client`'s twin of an :class:`AsyncClient` query: the same parameters,
    types and docstring, run on the client's thread (what ``help()`` and a type
    checker see is the async method's signature, less its coroutine)."""

    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._call(functools.partial(method, self._async, *args, **kwargs))

    functools.update_wrapper(call, method)
    call.__qualname__ = f"Client.{method.__name__}"
    return call


class Client:
    """The synchronous client: an :class:`AsyncClient` on trio in a background thread.

    Every method may be called from any thread. ``send()`` returns at once (or, with
    ``policy="block"`` and a full buffer, when there is room); ``close()``, leaving
    the ``with`` block, the interpreter's exit and, with ``flush_on_sigterm`` where
    the program lets it, SIGTERM flush what is buffered (see
    :mod:`trioagg.client.exits`). Takes the keyword arguments of :class:`AsyncClient`
    (:class:`ClientOptions`); its queries are :class:`AsyncClient`'s, blocking.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        flush_on_sigterm: bool = True,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._async = AsyncClient(url, **options)
        self.counters = self._async.counters
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._stop_loop: Callable[[], None] = lambda: None
        self._thread = threading.Thread(target=self._run, name="trioagg-client", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure
        exits.watch(self, sigterm=flush_on_sigterm)

    def _run(self) -> None:
        # trio is imported where a Client uses it: importing trioagg.client, or running
        # an AsyncClient under asyncio, does not load it.
        import trio

        async def main() -> None:
            stop = trio.Event()
            self._stop_loop = stop.set
            async with self._async:
                self._token = trio.lowlevel.current_trio_token()
                self._started.set()
                await stop.wait()

        try:
            trio.run(main)
        except BaseException as error:  # reported by close()
            self._failure = error
        finally:
            self._started.set()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        with _noted_on(exc[1]):
            self.close()

    def send(
        self,
        key: str,
        value: float = 1,
        ts: float | datetime.datetime | str | None = None,
        tags: Mapping[str, str] | None = None,
        distinct_id: str | None = None,
        id: str | None = None,
    ) -> None:
        """Buffer one event (see :meth:`AsyncClient.send`)."""
        self.send_encoded(self._async.event(key, value, ts, tags, distinct_id, id))

    def send_encoded(self, line: bytes) -> None:
        """Buffer one event already encoded as a JSON object and a newline (with its id)."""
        if self._stop.is_set():
            exits.await_the_end()  # closed by SIGTERM: the process is ending
            raise RuntimeError("the client is closed")
        wake = self._async.put_nowait(line, wait=True)
        if wake and self._token is not None:
            self._token.run_sync_soon(self._async.wake)

    def flush(self) -> None:
        """Send everything buffered and wait for the answers."""
        self._call(self._async.flush)

    def close(self) -> None:
        """Flush, wait for the answers, and stop the background thread, in all for at
        most ``close_timeout`` seconds (idempotent). Raises :class:`Undelivered` with
        the events it gave up (see :meth:`AsyncClient.aclose`)."""
        if self._stop.is_set():
            return
        self.close_soon()
        failure = self.wait_closed()
        exits.forget(self)
        if failure is not None:
            raise failure

    def close_soon(self) -> None:
        """Start closing and return at once (for :mod:`trioagg.client.exits`)."""
        if self._stop.is_set():
            return
        self._stop.set()
        import trio

        if self._token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop_loop)

    def wait_closed(self) -> BaseException | None:
        """Wait for the background thread to end; the error it met, if any."""
        self._thread.join()
        return self._failure

    aggregates = _blocking(AsyncClient.aggregates)
    keys = _blocking(AsyncClient.keys)
    top = _blocking(AsyncClient.top)

    def _call(self, function: Callable[[], Awaitable[_T]]) -> _T:
        if self._token is None or self._stop.is_set():
            raise RuntimeError("the client is closed")
        import trio

        return trio.from_thread.run(function, trio_token=self._token)
