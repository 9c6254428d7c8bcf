"""The clients of the hostile soak (tests/test_soak.py): one async function per
behaviour, honest or hostile, each a trio task bounded in time, and the ledger of what
they sent and were told.

Every body that may be stored is a :class:`Body` of the :class:`Ledger`: its events
carry ids, so it may be sent again until it is acknowledged (200, or 202: accepted is
never lost) and must then count exactly once. Hostile requests that must store nothing
(refused, cut short, malformed) carry events of ``doomed.*`` keys only, whose presence
in the store fails the soak. Honest clients speak through httpx; hostile ones write
raw bytes on trio sockets, and read answers with h11 where they expect HTTP back.

A seeded :func:`plan` says which behaviour each client runs next and with what random
numbers, so a seed replays the same mix (the interleaving is the scheduler's).
"""

from __future__ import annotations

import gzip
import json
import random
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

import h11
import httpx
import trio

#: Keys the honest clients write; reads also ask for one that never gets events.
KEYS = tuple(f"soak.k{number}" for number in range(6))
NO_DATA_KEY = "soak.empty"
REGIONS = ("eu", "us", "ap", None)
#: Events are spread over two days (every writer of a sharded store gets some).
SPAN_SECONDS = 2 * 86400
#: Every behaviour ends within this (the hostile ones, on their own, well before).
BEHAVIOUR_SECONDS = 10.0
#: Most bytes a hostile client keeps of what the server sends it.
READ_LIMIT = 65536
#: Answers to a write that store none of it and ask for it again: busy, or too slow.
AGAIN: Final = (408, 503)


@dataclass
class Body:
    """Events with ids, sent until acknowledged."""

    number: int
    events: list[dict[str, Any]]
    attempts: int = 0
    acknowledged: bool = False  # answered 200 or 202
    stored: bool = False  # answered 200: every event is in the store


class Ledger:
    """Every body that may be stored, and what the store must hold once they all are."""

    def __init__(self, start: int) -> None:
        #: The first second of the span the events' timestamps fall in.
        self.start = start
        self.bodies: list[Body] = []
        self.sent: Counter[str] = Counter()  # events per key, acknowledged or not

    def new(self, rng: random.Random) -> Body:
        number = len(self.bodies)
        keys = rng.sample(KEYS, rng.randint(1, 3))
        events = []
        for index in range(rng.randint(1, 40)):
            event: dict[str, Any] = {
                "key": rng.choice(keys),
                "id": f"b{number}-{index}",
                "ts": self.start + rng.randrange(SPAN_SECONDS),
                # Integers (and halves) sum exactly, in any order.
                "value": rng.randint(-1000, 1000) / rng.choice((1, 2)),
            }
            region = rng.choice(REGIONS)
            if region is not None:
                event["tags"] = {"region": region}
            if rng.random() < 0.2:
                event["distinct_id"] = f"user{rng.randrange(50)}"
            events.append(event)
            self.sent[event["key"]] += 1
        body = Body(number, events)
        self.bodies.append(body)
        return body

    def sending(self, body: Body) -> None:
        """``body`` is about to be sent: from now on, it may be stored, or a part of it."""
        body.attempts += 1

    def answered(self, body: Body, status: int, answer: bytes) -> str | None:
        """Note the answer to a sending of ``body``; what was wrong with it, if anything."""
        body.acknowledged |= status in (200, 202)
        if status != 200:
            return None
        duplicates = json.loads(answer)["duplicates"]
        was_stored, body.stored = body.stored, True
        size = len(body.events)
        # A first sending stores all of it, a sending after a 200 none of it; after an
        # unknown fate, any part of it may be stored already.
        if body.attempts == 1 and duplicates != 0:
            return f"body {body.number}, sent once, was answered {duplicates} duplicates"
        if was_stored and duplicates != size:
            return f"body {body.number}, stored before, counted again: {duplicates} of {size}"
        if not 0 <= duplicates <= size:
            return f"body {body.number} of {size} events was answered {duplicates} duplicates"
        return None

    def pending(self) -> list[Body]:
        return [body for body in self.bodies if not body.acknowledged]

    def stored(self) -> list[Body]:
        return [body for body in self.bodies if body.stored]

    def expected(self) -> dict[tuple[str, str | None], tuple[int, float]]:
        """(count, sum) per key and region (None: no region tag), every body counted."""
        totals: dict[tuple[str, str | None], tuple[int, float]] = {}
        for body in self.bodies:
            for event in body.events:
                series = (event["key"], event.get("tags", {}).get("region"))
                count, total = totals.get(series, (0, 0.0))
                totals[series] = (count + 1, total + event["value"])
        return totals


@dataclass
class Soak:
    """What the clients of one soak share: the server's address, a pooled httpx client,
    the ledger, and what they saw."""

    host: str
    port: int
    client: httpx.AsyncClient
    ledger: Ledger
    #: Floods of idle sockets at once (each holds up to 60 of the server's descriptors).
    floods: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(2))
    #: (behaviour, status or what happened) -> times.
    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Answers an honest client must never get, or a hostile one an error of the server.
    surprises: list[str] = field(default_factory=list)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def note(self, behaviour: str, outcome: object) -> None:
        self.seen[behaviour, str(outcome)] += 1

    def surprise(self, text: str) -> None:
        if len(self.surprises) < 100:
            self.surprises.append(text)


def encode(
    events: list[dict[str, Any]], *, ndjson: bool, gzipped: bool
) -> tuple[bytes, dict[str, str]]:
    """A body of ``events`` as JSON or NDJSON, maybe gzipped, and the headers saying so."""
    if ndjson:
        data = b"".join(json.dumps(event).encode() + b"\n" for event in events)
    else:
        data = json.dumps(events).encode()
    headers = {"Content-Type": "application/x-ndjson" if ndjson else "application/json"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
        data = gzip.compress(data, mtime=0)
    return data, headers


def doomed(rng: random.Random) -> bytes:
    """A complete JSON array of events that no refused or unfinished request may store."""
    events = [{"key": f"doomed.{rng.randrange(4)}", "id": f"d{rng.getrandbits(64)}"}]
    return json.dumps(events * rng.randint(1, 20)).encode()


# -- honest clients --------------------------------------------------------------------


async def post_body(soak: Soak, body: Body, rng: random.Random, *, durable: bool) -> int:
    """Send ``body`` once through httpx; its status, or 0 when no answer came."""
    data, headers = encode(body.events, ndjson=rng.random() < 0.4, gzipped=rng.random() < 0.2)
    params = {} if durable else {"wait": "false"}
    soak.ledger.sending(body)
    try:
        response = await soak.client.post(
            "/v1/events", content=data, headers=headers, params=params
        )
    except httpx.TransportError as error:
        soak.note("write", type(error).__name__)
        return 0
    problem = soak.ledger.answered(body, response.status_code, response.content)
    if problem:
        soak.surprise(problem)
    if response.status_code not in (200, 202, *AGAIN):
        soak.surprise(f"a write answered {response.status_code}: {response.text[:300]}")
    soak.note("write", response.status_code)
    return response.status_code


async def write(soak: Soak, rng: random.Random) -> None:
    """A batch of events with ids, durable or ``wait=false``, sent again a few times when
    asked to (then left for the end of the soak to send again)."""
    body = soak.ledger.new(rng)
    durable = rng.random() < 0.7
    for _ in range(3):
        if await post_body(soak, body, rng, durable=durable) not in AGAIN:
            return
        await trio.sleep(rng.uniform(0.2, 1.0))


async def rewrite(soak: Soak, rng: random.Random) -> None:
    """A body already stored, sent again (a client that lost the answer): it must count
    once."""
    done = soak.ledger.stored()
    if done:
        await post_body(soak, rng.choice(done), rng, durable=True)


async def read(soak: Soak, rng: random.Random) -> None:
    """``/v1/aggregates`` of several keys, maybe grouped or filtered by region: never more
    events than were ever sent."""
    ledger = soak.ledger
    keys = rng.sample([*KEYS, NO_DATA_KEY], rng.randint(1, 4))
    params: list[tuple[str, str]] = [("key", key) for key in keys]
    params += [("from", str(ledger.start)), ("to", str(ledger.start + SPAN_SECONDS))]
    granularity = rng.choice(("all", "hour", "day", "bucket"))
    params.append(("granularity", granularity))
    if granularity == "day" and rng.random() < 0.5:
        params.append(("tz", "Europe/Berlin"))
    choice = rng.random()
    if choice < 0.4:
        params.append(("group_by", "region"))
    elif choice < 0.6:
        params.append(("tag.region", rng.choice(("eu", "us", "ap"))))
    if rng.random() < 0.3:
        params.append(("stats", "count,sum,stddev,distinct"))
    if rng.random() < 0.3:
        params.append(("fill", rng.choice(("zero", "null"))))
    try:
        response = await soak.client.get("/v1/aggregates", params=tuple(params))
    except httpx.TransportError as error:
        soak.note("read", type(error).__name__)
        return
    soak.note("read", response.status_code)
    if response.status_code != 200:
        soak.surprise(f"a read answered {response.status_code}: {response.text[:300]}")
        return
    counted: Counter[str] = Counter()
    for result in response.json()["results"]:
        counted[result["key"]] += sum(bucket["count"] for bucket in result["buckets"])
    for key, count in counted.items():
        if count > ledger.sent[key]:
            soak.surprise(f"a read counted {count} events of {key}, {ledger.sent[key]} sent")


async def glance(soak: Soak, rng: random.Random) -> None:
    """One of the other pages an honest client or a probe asks for."""
    path, params = rng.choice(
        [
            ("/healthz", {}),
            ("/readyz", {}),
            ("/v1/status", {}),
            ("/metrics", {}),
            ("/v1/keys", {"prefix": "soak."}),
            ("/v1/top", {"from": str(soak.ledger.start), "stat": rng.choice(("count", "sum"))}),
            ("/", {}),
        ]
    )
    try:
        response = await soak.client.get(path, params=params)
    except httpx.TransportError as error:
        soak.note("glance", type(error).__name__)
        return
    soak.note("glance", response.status_code)
    if response.status_code != 200 and (path, response.status_code) != ("/readyz", 503):
        soak.surprise(f"GET {path} answered {response.status_code}: {response.text[:300]}")


# -- hostile clients -------------------------------------------------------------------

#: What a hostile client may meet when the server ends a connection its own way.
_CUT: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _connect(soak: Soak) -> trio.SocketStream:
    return await trio.open_tcp_stream(soak.host, soak.port)


async def _close(stream: trio.SocketStream, *, reset: bool) -> None:
    """Close with a FIN, or with a RST (SO_LINGER 0: the kernel drops what is unsent)."""
    if reset:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def _read_for(stream: trio.SocketStream, seconds: float) -> str:
    """The status of what the server sends until it closes or ``seconds`` pass."""
    received = b""
    with trio.move_on_after(seconds):
        while len(received) < READ_LIMIT and (chunk := await stream.receive_some(READ_LIMIT)):
            received += chunk
    if not received:
        return "none"
    line = received.split(b"\r\n", 1)[0].split(b" ")
    if line[0].startswith(b"HTTP/1.") and len(line) > 1:
        return line[1].decode(errors="replace")
    return f"garbled: {received[:60]!r}"


Act = Callable[[trio.SocketStream], Awaitable[str]]


async def _hostile(soak: Soak, name: str, rng: random.Random, act: Act) -> None:
    """Connect, ``act`` (which says how the server answered: its status codes), close
    with a FIN or a RST, and note the outcome. An answer that is not HTTP, and a 5xx
    other than 501 (a coding h11 does not know) and 503 (busy), are the server's
    faults: surprises."""
    reset = rng.random() < 0.5
    try:
        stream = await _connect(soak)
    except OSError as error:
        soak.note(name, f"connect: {error.strerror}")
        return
    try:
        outcome = await act(stream)
    except _CUT as error:
        outcome = type(error).__name__
    except h11.ProtocolError as error:
        outcome = f"garbled: {error}"
    finally:
        with trio.CancelScope(shield=True):
            await _close(stream, reset=reset)
    if outcome.startswith("garbled"):
        soak.surprise(f"{name} was answered what is not HTTP: {outcome}")
        outcome = "garbled"
    elif any(code[:1] == "5" and code not in ("501", "503") for code in outcome.split(",")):
        soak.surprise(f"{name} was answered {outcome}")
    soak.note(name, outcome)


def _head(soak: Soak, method: str, target: str, *lines: str) -> bytes:
    head = [f"{method} {target} HTTP/1.1", f"Host: {soak.authority}", *lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def _post(soak: Soak, body: Body, *, durable: bool = True, last: bool = False) -> bytes:
    """A whole POST of ``body`` as JSON; ``last`` asks the server to close after it."""
    data = json.dumps(body.events).encode()
    lines = ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    if last:
        lines.append("Connection: close")
    return _head(soak, "POST", "/v1/events" if durable else "/v1/events?wait=false", *lines) + data


async def _answers(
    soak: Soak, stream: trio.SocketStream, requests: list[tuple[str, str]]
) -> list[tuple[int, bytes]]:
    """The answers, in order, to ``requests`` (method, target) already sent on ``stream``,
    read with h11 until all have come, the server closes, or 5 s pass."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=READ_LIMIT)
    answers: list[tuple[int, bytes]] = []
    with trio.move_on_after(5):
        for method, target in requests:
            # h11 tracks our side too: tell it of the request, whose bytes went out raw.
            conn.send(h11.Request(method=method, target=target, headers=[("Host", soak.authority)]))
            conn.send(h11.EndOfMessage())
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(READ_LIMIT))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return answers
            answers.append((status, body))
            if conn.their_state is not h11.DONE:  # the server closes after this answer
                return answers
            conn.start_next_cycle()
    return answers


def _account(
    soak: Soak, name: str, posted: dict[int, Body], answers: list[tuple[int, bytes]]
) -> str:
    """Note the answers to a run of requests, the writes among them (by index) in the
    ledger (a write not answered stays pending). The outcome: every status in order."""
    for index, body in posted.items():
        if index >= len(answers):
            continue
        status, answer = answers[index]
        problem = soak.ledger.answered(body, status, answer)
        if problem:
            soak.surprise(problem)
        if status not in (200, 202, *AGAIN):
            soak.surprise(f"{name}: a write answered {status}: {answer[:300]!r}")
    return ",".join(str(status) for status, _ in answers) or "none"


async def early_answer(soak: Soak, rng: random.Random) -> None:
    """A request the server answers before reading its body (404, 405, 400, 413, 415),
    closed at once or after the answer, with a FIN or a RST, its body unsent or sent."""
    data = doomed(rng)
    method, target, kind, declared = rng.choice(
        [
            ("POST", "/nope", "application/json", 1000),
            ("PUT", "/v1/events", "application/json", len(data)),
            ("POST", "/v1/events?wait=maybe", "application/json", len(data)),
            ("POST", "/v1/events", "text/plain", len(data)),
            ("POST", "/v1/events", "application/json", 10_000_000),
        ]
    )
    head = _head(soak, method, target, f"Content-Type: {kind}", f"Content-Length: {declared}")
    sent = data if rng.random() < 0.3 else b"["
    wait = rng.random() < 0.5

    async def act(stream: trio.SocketStream) -> str:
        await stream.send_all(head + sent)
        return await _read_for(stream, rng.uniform(0, 2)) if wait else "gone"

    await _hostile(soak, "early_answer", rng, act)


async def slow_body(soak: Soak, rng: random.Random) -> None:
    """A body trickled in pieces, with a Content-Length or chunked: finished in time (a
    slow honest client), or never finished (then abandoned, or left to the 408)."""
    chunked = rng.random() < 0.5
    body = soak.ledger.new(rng) if rng.random() < 0.4 else None
    data = json.dumps(body.events).encode() if body else doomed(rng)
    length = len(data) + (0 if body else rng.randint(1, 100))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"
    head = _head(soak, "POST", "/v1/events", "Content-Type: application/json", framing)
    size = -(-len(data) // rng.randint(2, 8))
    parts = [data[start : start + size] for start in range(0, len(data), size)]
    if body is None:
        parts = parts[: rng.randint(0, len(parts) - 1)]
    abandon = body is None and rng.random() < 0.5

    async def act(stream: trio.SocketStream) -> str:
        if body is not None:
            soak.ledger.sending(body)
        await stream.send_all(head)
        for part in parts:
            await trio.sleep(rng.uniform(0.05, 0.25))
            await stream.send_all(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        if body is not None:
            if chunked:
                await stream.send_all(b"0\r\n\r\n")
            answers = await _answers(soak, stream, [("POST", "/v1/events")])
            return _account(soak, "slow_body", {0: body}, answers)
        return "gone" if abandon else await _read_for(stream, 4.0)  # the 408

    await _hostile(soak, "slow_body", rng, act)


async def garbage(soak: Soak, rng: random.Random) -> None:
    """Random bytes instead of a request, or after a good one, or in its request line."""
    noise = rng.randbytes(rng.randint(1, 4096))
    shape = rng.random()
    if shape < 0.3:
        noise = _head(soak, "GET", "/healthz") + noise
    elif shape < 0.5:
        noise = b"GET /\x00\xff HTTP/1.1\r\n" + noise

    async def act(stream: trio.SocketStream) -> str:
        await stream.send_all(noise)
        return await _read_for(stream, rng.uniform(0, 2))

    await _hostile(soak, "garbage", rng, act)


async def oversized_head(soak: Soak, rng: random.Random) -> None:
    """A request head of 17 to 100 KiB, in one write or in pieces: the 431 row."""
    head = _head(soak, "GET", "/healthz", "X-Filler: " + "a" * rng.randint(17_000, 100_000))
    size = -(-len(head) // rng.choice((1, 4, 16)))

    async def act(stream: trio.SocketStream) -> str:
        for start in range(0, len(head), size):
            await stream.send_all(head[start : start + size])
        return await _read_for(stream, 2.0)

    await _hostile(soak, "oversized_head", rng, act)


@cache
def client_hello() -> bytes:
    """The first flight of a real TLS handshake, as a client sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with suppress(ssl.SSLWantReadError):  # it waits for the server's hello
        tls.do_handshake()
    return outgoing.read()


async def tls_on_plain(soak: Soak, rng: random.Random) -> None:
    """A TLS ClientHello sent to the plain HTTP port."""

    async def act(stream: trio.SocketStream) -> str:
        await stream.send_all(client_hello())
        return await _read_for(stream, rng.uniform(0, 2))

    await _hostile(soak, "tls_on_plain", rng, act)


async def pipelined(soak: Soak, rng: random.Random) -> None:
    """Two to six requests (reads and writes) in one write, before any answer; the answers
    are read in order, and the writes answered 200 or 202 are acknowledged."""
    requests: list[tuple[str, str]] = []
    posted: dict[int, Body] = {}
    wire = b""
    count = rng.randint(2, 6)
    for index in range(count):
        last = index == count - 1 and rng.random() < 0.5
        kind = rng.random()
        if kind < 0.5:
            posted[index] = soak.ledger.new(rng)
            wire += _post(soak, posted[index], durable=rng.random() < 0.7, last=last)
            requests.append(("POST", "/v1/events"))
            continue
        target = "/healthz" if kind < 0.7 else f"/v1/aggregates?key={KEYS[0]}&key={KEYS[1]}"
        wire += _head(soak, "GET", target, *(["Connection: close"] if last else []))
        requests.append(("GET", target))

    async def act(stream: trio.SocketStream) -> str:
        for body in posted.values():
            soak.ledger.sending(body)
        await stream.send_all(wire)
        answers = await _answers(soak, stream, requests)
        for (method, target), (status, answer) in zip(requests, answers, strict=False):
            if method == "GET" and status != 200:
                soak.surprise(f"pipelined GET {target} answered {status}: {answer[:300]!r}")
        return _account(soak, "pipelined", posted, answers)

    await _hostile(soak, "pipelined", rng, act)


async def smuggled(soak: Soak, rng: random.Random) -> None:
    """Requests framed two ways at once, as smuggling through a proxy would be: a
    Content-Length with chunked (chunked wins, and what follows the last chunk is the
    next request), two Content-Lengths, a coding other than chunked, a space before the
    colon. The ambiguous ones store nothing; the chunked reading is honest."""
    variant = rng.choice(("length_and_chunked", "two_lengths", "other_coding", "space"))
    kind = "Content-Type: application/json"
    if variant == "length_and_chunked":
        outer, inner = soak.ledger.new(rng), soak.ledger.new(rng)
        chunk = json.dumps(outer.events).encode()
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
        hidden = _post(soak, inner, last=True)
        lying = f"Content-Length: {rng.choice((4, len(framed) + len(hidden)))}"
        wire = _head(soak, "POST", "/v1/events", kind, lying, "Transfer-Encoding: chunked")

        async def act(stream: trio.SocketStream) -> str:
            soak.ledger.sending(outer)
            soak.ledger.sending(inner)
            await stream.send_all(wire + framed + hidden)
            answers = await _answers(soak, stream, [("POST", "/v1/events")] * 2)
            return _account(soak, "smuggled", {0: outer, 1: inner}, answers)

        await _hostile(soak, "smuggled", rng, act)
        return
    data = doomed(rng)
    framing = {
        "two_lengths": [f"Content-Length: {len(data)}", f"Content-Length: {len(data) - 1}"],
        "other_coding": ["Transfer-Encoding: gzip, chunked"],
        "space": ["Transfer-Encoding : chunked", f"Content-Length: {len(data)}"],
    }[variant]
    wire = _head(soak, "POST", "/v1/events", kind, *framing) + data

    async def refused(stream: trio.SocketStream) -> str:
        await stream.send_all(wire)
        return await _read_for(stream, 2.0)

    await _hostile(soak, "smuggled", rng, refused)


async def idle_flood(soak: Soak, rng: random.Random) -> None:
    """Ten to sixty connections held idle: silent, after half a request line, or after a
    whole request (keep-alive); then all closed, with FINs or RSTs."""
    async with soak.floods:
        streams: list[trio.SocketStream] = []
        try:
            for _ in range(rng.randint(10, 60)):
                try:
                    stream = await _connect(soak)
                except OSError as error:
                    soak.note("idle_flood", f"connect: {error.strerror}")
                    break
                streams.append(stream)
                opening = rng.choice((b"", b"GET /hea", _head(soak, "GET", "/healthz")))
                with suppress(*_CUT):
                    await stream.send_all(opening)
            soak.note("idle_flood", f"held {len(streams)}")
            await trio.sleep(rng.uniform(0.5, 2.5))
        finally:
            with trio.CancelScope(shield=True):
                for stream in streams:
                    await _close(stream, reset=rng.random() < 0.5)


Behaviour = Callable[[Soak, random.Random], Awaitable[None]]

#: Each behaviour and how often it is picked.
BEHAVIOURS: dict[str, tuple[Behaviour, int]] = {
    "write": (write, 24),
    "rewrite": (rewrite, 3),
    "read": (read, 16),
    "glance": (glance, 6),
    "early_answer": (early_answer, 12),
    "slow_body": (slow_body, 7),
    "garbage": (garbage, 6),
    "oversized_head": (oversized_head, 4),
    "tls_on_plain": (tls_on_plain, 4),
    "pipelined": (pipelined, 8),
    "smuggled": (smuggled, 6),
    "idle_flood": (idle_flood, 2),
}


def plan(seed: str, client: int) -> Iterator[tuple[str, random.Random, float]]:
    """Client ``client``'s behaviours for ``seed``, endlessly: each one's name, the random
    numbers it draws from, and the pause after it."""
    rng = random.Random(f"{seed}/{client}")
    names = list(BEHAVIOURS)
    weights = [BEHAVIOURS[name][1] for name in names]
    while True:
        (name,) = rng.choices(names, weights)
        yield name, random.Random(rng.getrandbits(64)), rng.uniform(0.05, 0.5)
