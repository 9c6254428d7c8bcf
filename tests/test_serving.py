"""A connection's failure is that connection's: the server that hypercorn's own
``serve`` would let die goes on serving (trioagg.server.serving)."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trioagg.server.serving import REPORT_INTERVAL, Connections, OneSender
from trioagg.service.metrics import Metrics

from .conftest import Server, metric, post, stored_counts

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

EARLY_ANSWERED = (
    b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n["
)


def _send_and_close(port: int, request: bytes, *, reset: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if reset:  # close with RST instead of FIN
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        sock.sendall(request)


@SQLITE
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_clients_closing_after_an_early_answer_cannot_stop_the_server(
    server: Server, reset: bool
) -> None:
    """Issue 19: a few such connections ended `trioagg serve` (hypercorn's
    _send_error_response raced its own send_eof: BusyResourceError out of the
    connection's task, through the nursery of the listeners)."""
    port = int(server.url.rsplit(":", 1)[1])
    requests = [
        EARLY_ANSWERED,  # 404, body pending
        EARLY_ANSWERED.replace(b"/nope", b"/v1/events?wait=maybe"),  # 400
        EARLY_ANSWERED.replace(b"POST /nope", b"PUT /v1/events"),  # 405
        EARLY_ANSWERED.replace(b"application/json", b"text/plain").replace(
            b"/nope", b"/v1/events"
        ),  # 415
    ]
    for round_ in range(25):
        for request in requests:
            await trio.to_thread.run_sync(
                functools.partial(_send_and_close, port, request, reset=reset)
            )
        if round_ % 5 == 0:
            await trio.sleep(0.01)  # let the server's side of the race run
    assert (await post(server.client, {"key": "after"})).status_code == 200
    assert (await server.client.get("/healthz")).status_code == 200
    assert await metric(server, "trioagg_contained_failures_total", where="connection") == 0


class _Wrapped(trio.abc.HalfCloseableStream):
    """A real socket stream, for tests to change one of its methods."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.stream = trio.SocketStream(sock)
        self.socket = sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _HeldEof(_Wrapped):
    """A socket whose send_eof is held under way until ``release`` is set, the window in
    which trio's own would refuse a concurrent send_all with BusyResourceError."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        super().__init__(sock)
        self.entered, self.release = trio.Event(), trio.Event()

    async def send_eof(self) -> None:
        self.entered.set()
        await self.release.wait()
        await self.stream.send_eof()


async def test_send_all_waits_for_an_end_of_file_under_way() -> None:
    """Through OneSender a send during send_eof waits for it and then meets the closed
    half (ClosedResourceError, which hypercorn handles), never BusyResourceError."""
    left, right = trio.socket.socketpair()
    inner = _HeldEof(left)
    stream = OneSender(inner)
    peer = trio.SocketStream(right)
    outcomes: list[str] = []

    async def send() -> None:
        try:
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            outcomes.append("sent")
        except trio.ClosedResourceError:  # "can't send data after sending EOF"
            outcomes.append("closed")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_eof)
            await inner.entered.wait()
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == []  # waiting, not refused
            inner.release.set()
        assert outcomes == ["closed"]
        assert await peer.receive_some() == b""  # the end of file arrived
    await stream.aclose()
    await peer.aclose()


async def test_send_eof_during_a_send_is_refused_as_trio_would() -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = OneSender(trio.SocketStream(left))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"x" * 1_000_000)  # blocks: nobody reads
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await stream.send_eof()
            nursery.cancel_scope.cancel()
    await stream.aclose()
    right.close()


class _FailingStream(_Wrapped):
    """A real socket whose reads fail with an error no layer expects."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise RuntimeError("an unexpected failure in one connection")


async def test_what_escapes_a_connection_is_logged_counted_and_closes_it_alone(
    caplog: Any,
) -> None:
    from hypercorn.config import Config
    from hypercorn.trio.worker_context import WorkerContext

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never reached
        raise AssertionError

    metrics = Metrics()
    clock = trio.testing.MockClock()
    handler = Connections(app, Config(), WorkerContext(None), {}, metrics, clock=clock.current_time)
    caplog.set_level(logging.ERROR, logger="trioagg.serving")
    peers = []
    for _ in range(3):
        left, right = trio.socket.socketpair()
        peers.append(trio.SocketStream(right))
        await handler(_FailingStream(left))  # returns: contained
    clock.jump(REPORT_INTERVAL)
    left, right = trio.socket.socketpair()
    peers.append(trio.SocketStream(right))
    await handler(_FailingStream(left))

    sample = metrics.registry.get_sample_value
    assert sample("trioagg_contained_failures_total", {"where": "connection"}) == 4
    reports = [record for record in caplog.records if record.name == "trioagg.serving"]
    # one traceback per REPORT_INTERVAL; the next report counts those left out
    assert [record.exc_info is not None for record in reports] == [True, True]
    assert "2 more since the last report" in reports[1].getMessage()
    for peer in peers:  # each failed connection was closed
        assert await peer.receive_some() == b""
        await peer.aclose()


KEEP_ALIVE_REQUEST = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"


async def _read_answers(peer: trio.SocketStream) -> bytes:
    """What the server sent until it closed the connection (with a reset when it left
    a request unread)."""
    received = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await peer.receive_some():
            received += chunk
    return received


async def test_a_request_that_meets_the_shutdown_is_answered_or_never_run() -> None:
    """A request that arrives on an idle keep-alive connection just as the server stops
    (both wake in one scheduling batch, in either order): hypercorn's keep-alive task
    closed the connection even after the reader had handed the request to the app, so
    the app ran it (a POST could be stored) and no answer could be sent. Now the
    request either never reaches the app or is answered, then the connection closes."""
    from hypercorn.config import Config
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.utils import wrap_app

    config = Config()
    runs = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        if scope["type"] != "http":
            return
        runs += 1
        while (await receive()).get("more_body"):
            pass
        await trio.sleep(0.001)  # as a commit does
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    outcomes = set()
    for _ in range(60):
        context = WorkerContext(None)
        handler = Connections(wrap_app(app, 1 << 20, "asgi"), config, context, {}, Metrics())
        ours, theirs = socket.socketpair()
        peer = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
                await peer.send_all(KEEP_ALIVE_REQUEST)
                first = b""
                while not first.endswith(b"ok"):
                    first += await peer.receive_some()
                await trio.testing.wait_all_tasks_blocked()
                runs = 0
                theirs.send(KEEP_ALIVE_REQUEST)  # no checkpoint between this and the stop
                await context.terminated.set()
                answered = b" 200 " in await _read_answers(peer)
        await peer.aclose()
        assert answered == (runs == 1)
        outcomes.add(answered)
    assert outcomes == {True, False}, "both orders of the wake-ups were met"


H2_REQUEST = [(":method", "GET"), (":path", "/x"), (":authority", "x"), (":scheme", "http")]


async def _h2_answer(peer: trio.SocketStream, client: Any, stream_id: int) -> bytes:
    """The body that came on ``stream_id`` before the connection closed."""
    import h2.events

    body = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await peer.receive_some():
            for event in client.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data
                if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    return body
            await peer.send_all(client.data_to_send())
    return body


async def test_an_http2_request_handed_to_the_app_as_the_server_stops_is_answered() -> None:
    """HTTP/2 (prior knowledge, as a client may speak it on the plain port): hypercorn
    marks a new stream busy only after its app has started, so a shutdown in between
    woke the keep-alive task, which closed the connection under the running request
    (about every other time). Now it waits for the stream; its answer's body is sent.
    (hypercorn's GOAWAY at shutdown may still go before the stream's END_STREAM.)"""
    import h2.config
    import h2.connection
    from hypercorn.config import Config
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.utils import wrap_app

    config = Config()
    context, stop_as_it_starts, runs = WorkerContext(None), False, 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        if scope["type"] != "http":
            return
        runs += 1
        if stop_as_it_starts:
            await context.terminated.set()  # the shutdown, as the request is handed over
        await trio.sleep(0.001)  # as a commit does
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    for _ in range(40):
        context, stop_as_it_starts = WorkerContext(None), False
        handler = Connections(wrap_app(app, 1 << 20, "asgi"), config, context, {}, Metrics())
        ours, theirs = socket.socketpair()
        peer = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, H2_REQUEST, end_stream=True)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
                await peer.send_all(client.data_to_send())
                assert await _h2_answer(peer, client, 1) == b"ok"
                await trio.testing.wait_all_tasks_blocked()
                runs, stop_as_it_starts = 0, True
                client.send_headers(3, H2_REQUEST, end_stream=True)
                await peer.send_all(client.data_to_send())
                answer = await _h2_answer(peer, client, 3)
                await _read_answers(peer)  # until the server closes the connection
        await peer.aclose()
        assert (runs, answer) == (1, b"ok")


def test_sigterm_under_keep_alive_load_answers_what_is_under_way_and_exits_at_once(
    server_process: Any,
) -> None:
    """Issue 19: with busy keep-alive clients, SIGTERM waited the whole drain timeout
    (hypercorn left a connection's reader waiting for ever once the connection closed)
    and cut 5-8 requests without an answer. Now answers under way carry Connection:
    close, idle connections close at once and the process exits once drained. A
    request sent on an idle connection as it closes can still meet the close (as with
    any HTTP/1.1 server; nothing of it was stored, so a retry is safe): at most one
    per connection."""
    server = server_process("--drain-timeout", "60s").start()
    clients, stop = 8, threading.Event()
    outcomes: list[str] = []
    stored_by_answers = 0

    def send() -> None:
        nonlocal stored_by_answers
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/events", json=[{"key": "load"}] * 10)
                except httpx.ConnectError:
                    outcomes.append("refused")
                    return
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                    outcomes.append("cut")
                    return
                outcomes.append(str(response.status_code))
                if response.status_code == 200:
                    stored_by_answers += 10

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: outcomes.count("200") >= 50)
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, server.output
    stopped_after = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    assert stopped_after < 30, "it waited for connections instead of closing them"
    assert set(outcomes) <= {"200", "cut", "refused"}
    assert outcomes.count("cut") <= clients
    assert stored_counts(server.db) == {"load": stored_by_answers}


def _wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def test_a_client_that_takes_no_data_for_the_send_timeout_is_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    closed: list[bool] = []
    stream = OneSender(trio.SocketStream(left), send_timeout=30, closed=lambda: closed.append(True))
    started = trio.current_time()
    with pytest.raises(trio.BrokenResourceError, match="no data for 30s"):
        await stream.send_all(b"x" * 1_000_000)  # the peer never reads
    assert trio.current_time() - started == pytest.approx(30)
    assert closed == [True]
    right.close()


async def test_a_slow_reader_that_keeps_taking_data_is_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline is on progress, not on the whole answer: a reader taking 64 KiB
    every 20 s of a 30 s send_timeout gets all of it."""
    left, right = trio.socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream = OneSender(trio.SocketStream(left), send_timeout=30)
    peer = trio.SocketStream(right)
    answer = bytes(range(256)) * 2048  # 512 KiB
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(answer):
            await trio.sleep(20)
            while True:
                with trio.move_on_after(0.001):
                    received.extend(await peer.receive_some(65536))
                    continue
                break

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        await stream.send_all(answer)
    assert bytes(received) == answer
    await stream.aclose()
    await peer.aclose()


@pytest.mark.slow
@SQLITE
async def test_a_large_answer_nobody_reads_does_not_hold_its_connection(
    start_server: Any,
) -> None:
    """Before, hypercorn's shielded send waited for ever: each such client held its
    answer's memory (up to 32 MB) and its connection."""
    server = await start_server(send_timeout="1s")
    keys = [f"big{n:03d}" for n in range(100)]
    events = [{"key": key, "ts": "2026-01-01T00:00:00Z"} for key in keys]
    assert (await post(server.client, events)).status_code == 200
    query = "&".join(f"key={key}" for key in keys)
    query += "&from=2026-01-01T00:00:00Z&to=2026-02-11T00:00:00Z&granularity=hour&fill=zero"
    query += "&stats=count,sum,min,max,avg,stddev"
    full = await server.client.get(f"/v1/aggregates?{query}")
    # more than the kernel's buffers on both sides can hold (4 MB and 8 KiB at most)
    assert full.status_code == 200 and len(full.content) > 8_000_000
    port = int(server.url.rsplit(":", 1)[1])
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        f"GET /v1/aggregates?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    )
    await trio.sleep(3)  # the server gives up after 1 s without progress
    received = 0
    with trio.fail_after(10):
        while True:
            try:
                chunk = await stream.receive_some(1 << 20)
            except trio.BrokenResourceError:  # reset: the server closed with unread data
                break
            if not chunk:
                break
            received += len(chunk)
    assert received < len(full.content) - 4_000_000, received
    await stream.aclose()
    assert (await server.client.get("/healthz")).status_code == 200


@pytest.mark.slow
@SQLITE
async def test_an_http2_stream_granted_no_window_ends_after_the_send_timeout(
    start_server: Any,
) -> None:
    """Found by attack: over HTTP/2 (h2c here, prior knowledge) a client that grants no
    flow-control window leaves no socket send pending, so the socket's deadline never
    starts: 20 such streams held 180 MB after the client had gone, and a SIGTERM never
    finished. Now a request whose answer makes no progress for --send-timeout is
    cancelled (what its answer held is let go); hypercorn closes its stream, without a
    reset, and the connection, idle then, closes after --keep-alive-timeout."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    server = await start_server(send_timeout="1s", keep_alive_timeout="1s")
    keys = [f"big{n:03d}" for n in range(100)]
    events = [{"key": key, "ts": "2026-01-01T00:00:00Z"} for key in keys]
    assert (await post(server.client, events)).status_code == 200
    query = "&".join(f"key={key}" for key in keys)
    query += "&from=2026-01-01T00:00:00Z&to=2026-02-11T00:00:00Z&granularity=hour&fill=zero"
    port = int(server.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    connection.initiate_connection()
    streams = []
    for _ in range(3):
        stream_id = connection.get_next_available_stream_id()
        streams.append(stream_id)
        headers = [(":method", "GET"), (":path", f"/v1/aggregates?{query}")]
        headers += [(":scheme", "http"), (":authority", "localhost")]
        connection.send_headers(stream_id, headers, end_stream=True)
    await stream.send_all(connection.data_to_send())
    answered: set[int] = set()
    with trio.fail_after(15):  # before: held for as long as the client liked
        while data := await stream.receive_some():
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answered.add(event.stream_id)
                assert not isinstance(event, h2.events.StreamEnded), "a whole answer?"
            await stream.send_all(connection.data_to_send())
    assert answered == set(streams)  # each began its answer, none got more than its head
    await stream.aclose()
    assert (await server.client.get("/healthz")).status_code == 200
