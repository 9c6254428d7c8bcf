"""StatsD and DogStatsD over UDP (``--statsd HOST:PORT``): parsing lines into events,
and the receiver that queues them with the writers like ``POST /v1/events`` does.

A datagram holds lines separated by newlines, each ``name:value|type`` with optional
sections after further ``|``: ``@rate`` (sample rate), ``#k:v,flag`` (DogStatsD tags)
and ``T<unix seconds>`` (DogStatsD's timestamp); ``c:<container id>`` and
``e:<external data>`` are read and ignored. Types become events of the key ``name``:

* ``c`` (counter): the value, ``1/rate`` times, so that count and sum both scale as
  StatsD scales a counter (``x:3|c|@0.1`` is 10 events of 3: count 10, sum 30). A
  rate whose inverse is not a whole number from 1 to :data:`MAX_SCALE` is refused:
  no whole number of events would be exact.
* ``g`` (gauge): one event of the gauge's value (query it with ``last``). ``+n`` and
  ``-n`` change the value the receiver keeps for that series (key and tags) and
  send the result; a series without one starts at 0, as StatsD does. At most
  :data:`GAUGE_SERIES` series are kept, the least recently used forgotten first.
* ``ms``, ``h``, ``d`` (timer, histogram, distribution): each value an event,
  ``1/rate`` times (as the Datadog agent weighs sampled distributions).
* ``s`` (set): one event of value 1 whose ``distinct_id`` is the member, so that
  ``distinct`` counts the members (HyperLogLog).

``name:1:2:3|h`` (several values in one line, DogStatsD 1.1) is read as three lines.
Tags follow the rules of an event's tags (:mod:`trioagg.ingest.decode`); a tag without a
value (``#canary``) becomes ``canary=true``. Times are the server's receive time
unless ``|T`` says otherwise, within ``max_age`` and ``max_future``.

Every line is accepted or refused on its own, a refused line never affecting the
others of its datagram, and each outcome is counted (``trioagg_statsd_*``, and in
``/v1/status``): datagrams received, lines parsed, lines refused by reason, events
dropped because the writers' queue was full (or the store could not take them).
Memory is bounded whatever arrives: a datagram is at most 64 KiB and makes at most
:data:`DATAGRAM_EVENTS` events, the receiver holds at most :data:`PENDING_EVENTS`
events not yet queued (more are dropped, counted), and the kernel's socket buffer
holds the rest, dropping what overflows it (``netstat -su``: receive buffer errors).
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import re
import socket
import time
from typing import Final

import msgspec
import trio

from ..core.errors import ConfigError, Overloaded, StoreUnavailable
from ..core.events import MAX_ABS_VALUE, MAX_TAGS, NO_TAGS, TAG_VALUE_BYTES, TAGS_BYTES, Point
from ..core.times import rfc3339
from ..service.metrics import Metrics
from .decode import Limits
from .writer import Writers

log = logging.getLogger("trioagg.statsd")

#: The largest inverse of a sample rate: a counter or sample at ``@0.001`` is 1,000 events.
MAX_SCALE: Final = 1000
#: The most events one datagram makes; lines past it are refused.
DATAGRAM_EVENTS: Final = 20_000
#: The most events parsed and not yet queued with the writers; past it, dropped.
PENDING_EVENTS: Final = 100_000
#: The most gauge series whose value the receiver keeps for ``+n``/``-n`` lines.
GAUGE_SERIES: Final = 100_000
#: The largest datagram read (UDP's own limit).
MAX_DATAGRAM: Final = 65_535
#: The socket's receive buffer asked for (the kernel caps it at net.core.rmem_max).
RECEIVE_BUFFER: Final = 8 * 1024 * 1024
#: At most one refused line is logged (with its reason) per this many seconds.
LOG_INTERVAL: Final = 10.0

TYPES: Final = frozenset({"c", "g", "ms", "h", "d", "s"})
_NUMBER = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_KEY_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
#: The reasons a line is refused, as ``trioagg_statsd_lines_refused{reason}`` counts them.
REASONS: Final = (
    "malformed",
    "name",
    "type",
    "value",
    "rate",
    "tags",
    "time",
    "unsupported",
    "too_many_events",
)


class Refused(Exception):
    """Why one line is refused: a reason of :data:`REASONS` and a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Gauges:
    """The value of each gauge series (key, canonical tags), for ``+n`` and ``-n``
    lines: at most ``limit`` series, the least recently used forgotten first."""

    def __init__(self, limit: int = GAUGE_SERIES) -> None:
        self.limit = limit
        self._values: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def set(self, series: tuple[str, str], value: float) -> float:
        values = self._values
        values[series] = value
        values.move_to_end(series)
        if len(values) > self.limit:
            values.popitem(last=False)
        return value

    def change(self, series: tuple[str, str], delta: float) -> float:
        """The series' value plus ``delta`` (from 0 for a series not kept), kept."""
        value = self._values.get(series, 0.0) + delta
        if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
            raise Refused("value", f"the gauge would reach {value!r}, beyond ±{MAX_ABS_VALUE:g}")
        return self.set(series, value)


class Parsed:
    """What one datagram gave: its events, and its refused lines with why."""

    __slots__ = ("lines", "points", "refused")

    def __init__(self) -> None:
        self.points: list[Point] = []
        self.lines = 0
        #: (reason, message, the line as received) of each refused line.
        self.refused: list[tuple[str, str, bytes]] = []


class Parser:
    """Turns datagrams into events (see the module), keeping gauges' values."""

    def __init__(self, limits: Limits, gauges: Gauges | None = None) -> None:
        self.limits = limits
        self.gauges = gauges if gauges is not None else Gauges()
        #: Canonical tags JSON by the tags section as received: most lines repeat a few.
        self._tags: dict[bytes, str] = {}

    def parse(self, datagram: bytes, now: float) -> Parsed:
        """Every line of ``datagram`` (received at ``now``, Unix seconds)."""
        parsed = Parsed()
        for line in datagram.split(b"\n"):
            line = line.rstrip(b"\r")
            if not line.strip():
                continue
            parsed.lines += 1
            try:
                points = self.line(line, now)
                if len(parsed.points) + len(points) > DATAGRAM_EVENTS:
                    raise Refused(
                        "too_many_events",
                        f"the datagram makes more than {DATAGRAM_EVENTS} events "
                        "(counters and samples count 1/rate each)",
                    )
            except Refused as refusal:
                parsed.refused.append((refusal.reason, refusal.message, line))
                continue
            parsed.points.extend(points)
        return parsed

    def line(self, line: bytes, now: float) -> list[Point]:
        """The events of one line; :class:`Refused` says why there are none."""
        if line.startswith((b"_e{", b"_sc|")):
            raise Refused(
                "unsupported", "DogStatsD events and service checks are not metrics: not stored"
            )
        head, *sections = line.split(b"|")
        name, colon, values = head.partition(b":")
        if not colon or not sections:
            raise Refused("malformed", "a line is name:value|type[|@rate][|#tags][|Tseconds]")
        key = _key(name)
        kind = sections[0].decode("ascii", "replace")
        if kind not in TYPES:
            raise Refused("type", f"unknown type {kind!r}: c, g, ms, h, d or s")
        rate, tags, ts = 1.0, NO_TAGS, now
        for section in sections[1:]:
            if section.startswith(b"@"):
                rate = _rate(section[1:])
            elif section.startswith(b"#"):
                tags = self._tags_of(section[1:])
            elif section.startswith(b"T"):
                ts = self._time(section[1:], now)
            elif not section.startswith((b"c:", b"e:")):
                shown = section[:20].decode("utf-8", "replace")
                raise Refused("malformed", f"unknown section {shown!r} after the type")
        if kind == "s":
            member = values.decode("utf-8", "replace")
            if not 1 <= len(values) <= 255 or "\ufffd" in member:
                raise Refused("value", "a set's member is 1-255 bytes of UTF-8")
            return [(key, ts, 1.0, tags, member, None)]
        numbers = values.split(b":")
        if kind == "g":
            return [self._gauge(key, tags, ts, number) for number in numbers]
        times = _scale(rate)
        points: list[Point] = []
        for number in numbers:
            points.extend([(key, ts, _value(number), tags, None, None)] * times)
        return points

    def _gauge(self, key: str, tags: str, ts: float, number: bytes) -> Point:
        value = _value(number)
        series = (key, tags)
        if number[:1] in (b"+", b"-"):
            value = self.gauges.change(series, value)
        else:
            self.gauges.set(series, value)
        return (key, ts, value, tags, None, None)

    def _tags_of(self, section: bytes) -> str:
        known = self._tags.get(section)
        if known is not None:
            return known
        tags: dict[str, str] = {}
        for pair in section.split(b","):
            if not pair:
                continue
            try:
                text = pair.decode()
            except UnicodeDecodeError:
                raise Refused("tags", "tags are UTF-8") from None
            name, colon, value = text.partition(":")
            if not colon:
                value = "true"  # a tag without a value (#canary): canary=true
            if _TAG_NAME.fullmatch(name) is None:
                raise Refused(
                    "tags", f"tag name {name[:70]!r} is not [A-Za-z_][A-Za-z0-9_.-]{{0,63}}"
                )
            if name in tags:
                raise Refused("tags", f"tag {name!r} is given twice")
            if not value or len(value.encode()) > TAG_VALUE_BYTES or _KEY_FORBIDDEN.search(value):
                raise Refused(
                    "tags",
                    f"the value of tag {name!r} must be 1-{TAG_VALUE_BYTES} bytes, no control "
                    "characters",
                )
            tags[name] = value
        if len(tags) > MAX_TAGS:
            raise Refused("tags", f"at most {MAX_TAGS} tags (the line has {len(tags)})")
        canonical = msgspec.json.encode(tags, order="sorted") if tags else NO_TAGS.encode()
        if len(canonical) > TAGS_BYTES:
            raise Refused(
                "tags", f"the tags have {len(canonical)} bytes as JSON, over {TAGS_BYTES}"
            )
        if len(self._tags) >= GAUGE_SERIES:  # a cache, not a record: start afresh
            self._tags.clear()
        known = self._tags[section] = canonical.decode()
        return known

    def _time(self, text: bytes, now: float) -> float:
        if not text.isdigit() or len(text) > 12:
            raise Refused("time", "|T takes Unix seconds, a whole number")
        seconds = float(text)
        limits = self.limits
        if seconds > now + limits.max_future:
            raise Refused("time", f"{rfc3339(seconds)} is too far in the future (max_future)")
        if limits.max_age is not None and seconds < now - limits.max_age:
            raise Refused("time", f"{rfc3339(seconds)} is too old (max_age)")
        return seconds


def _key(name: bytes) -> str:
    try:
        key = name.decode()
    except UnicodeDecodeError:
        raise Refused("name", "the metric name is not UTF-8") from None
    if not 1 <= len(name) <= 255 or _KEY_FORBIDDEN.search(key):
        raise Refused("name", "the metric name is 1-255 bytes of UTF-8, no control characters")
    return key


def _value(text: bytes) -> float:
    if _NUMBER.fullmatch(text) is None:
        shown = text[:30].decode("utf-8", "replace")
        raise Refused("value", f"{shown!r} is not a number")
    value = float(text)
    if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
        raise Refused("value", f"{value!r} is beyond ±{MAX_ABS_VALUE:g}")
    return value


def _rate(text: bytes) -> float:
    if _NUMBER.fullmatch(text) is None or not 0 < float(text) <= 1:
        shown = text[:30].decode("utf-8", "replace")
        raise Refused("rate", f"sample rate {shown!r} is not a number in (0, 1]")
    return float(text)


def _scale(rate: float) -> int:
    """How many events one sampled value stands for: ``1/rate``, a whole number."""
    times = round(1 / rate)
    if not 1 <= times <= MAX_SCALE or not math.isclose(times * rate, 1.0, rel_tol=1e-9):
        raise Refused(
            "rate",
            f"sample rate {rate:g}: counts scale by whole numbers only, so the rate must be "
            f"1/n for n from 1 to {MAX_SCALE} (0.5, 0.1, 0.01...)",
        )
    return times


def open_socket(address: tuple[str, int]) -> socket.socket:
    """A UDP socket bound to ``address``, or :class:`ConfigError` saying why not."""
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name: resolved by bind
    sock = socket.socket(family, socket.SOCK_DGRAM)
    # A large receive buffer absorbs bursts while the event loop is busy elsewhere (the
    # kernel caps it at net.core.rmem_max; Linux's default buffer holds ~100 datagrams).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise ConfigError(
            f"cannot receive StatsD on udp {host}:{port}: {reason} (--statsd)"
        ) from None
    return sock


def bound_address(sock: socket.socket) -> str:
    """``host:port`` the socket receives on (the port it got, when 0 was asked)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Receiver:
    """Reads datagrams from a bound UDP socket, parses them and queues their events with
    the writers (``wait=false``: UDP has no answer to wait for), until cancelled."""

    def __init__(
        self, sock: socket.socket, writers: Writers, metrics: Metrics, limits: Limits
    ) -> None:
        self.socket = trio.socket.from_stdlib_socket(sock)
        self.address = bound_address(sock)
        self.writers = writers
        self.metrics = metrics
        self.parser = Parser(limits)
        self.max_batch = limits.max_batch
        self._pending: list[Point] = []
        self._arrived = trio.Event()
        self._logged_at = -math.inf
        self._unlogged = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive until cancelled (the service stopping); events parsed and not queued
        by then are counted as dropped (``shutdown``), and the socket is closed."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._queue)
                task_status.started()
                await self._receive()
        finally:
            self.socket.close()
            if self._pending:
                self.metrics.statsd_dropped.labels("shutdown").inc(len(self._pending))

    async def _receive(self) -> None:
        metrics = self.metrics
        while True:
            datagram = await self.socket.recv(MAX_DATAGRAM)
            metrics.statsd_datagrams.inc()
            parsed = self.parser.parse(datagram, time.time())
            metrics.statsd_parsed.inc(parsed.lines - len(parsed.refused))
            if parsed.refused:
                for reason, _, _ in parsed.refused:
                    metrics.statsd_refused.labels(reason).inc()
                self._log_refusal(parsed.refused[0], len(parsed.refused))
            if not parsed.points:
                continue
            room = PENDING_EVENTS - len(self._pending)
            if room < len(parsed.points):
                metrics.statsd_dropped.labels("queue_full").inc(len(parsed.points) - max(room, 0))
                del parsed.points[max(room, 0) :]
            self._pending.extend(parsed.points)
            self._arrived.set()

    async def _queue(self) -> None:
        """Queue what was parsed with the writers, ``max_batch`` events at a time."""
        while True:
            await self._arrived.wait()
            self._arrived = trio.Event()
            while self._pending:
                points = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._submit(points)

    async def _submit(self, points: list[Point]) -> None:
        writers = self.writers
        try:
            async with writers.admission() as admission:
                await admission.queue(points, durable=False)
        except Overloaded:  # the queue stayed full (or the service is stopping)
            self.metrics.statsd_dropped.labels("queue_full").inc(len(points))
            return
        except StoreUnavailable:
            self.metrics.statsd_dropped.labels("store_unavailable").inc(len(points))
            return
        self.metrics.events_accepted.inc(len(points))

    def _log_refusal(self, refused: tuple[str, str, bytes], count: int) -> None:
        """Log a refused line, at most once per :data:`LOG_INTERVAL`; the others counted."""
        self._unlogged += count
        now = time.monotonic()
        if now - self._logged_at < LOG_INTERVAL:
            return
        reason, message, line = refused
        log.warning(
            "StatsD: %d line(s) refused since the last report, e.g. %r: %s (%s)",
            self._unlogged,
            line[:200].decode("utf-8", "replace"),
            message,
            reason,
        )
        self._logged_at, self._unlogged = now, 0
