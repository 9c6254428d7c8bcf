"""A connection's failure is that connection's: the server that hypercorn's own
``serve`` would let die goes on serving (trioagg.serving)."""

from __future__ import annotations

import functools
import logging
import socket
from typing import Any

import pytest
import trio
import trio.testing

from trioagg.metrics import Metrics
from trioagg.serving import REPORT_INTERVAL, Connections, OneSender

from .conftest import Server, metric, post

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
