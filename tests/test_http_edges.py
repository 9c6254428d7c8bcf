"""The HTTP edge: what a body must be (the table against body_format itself, one of it
over HTTP), and over real HTTP how it is read and how connections end (keep-alive
timeout, ``Connection: close``, early answers)."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import sys
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
from werkzeug.datastructures import Headers

from trioagg.core.errors import Overloaded, UnsupportedMediaType
from trioagg.http.edges import body_format
from trioagg.ingest.writer import InflightBytes

from .conftest import Server, StartServer, assert_envelope, stored_counts, wait_until

EVENT = b'{"key": "edge"}'


async def post_raw(server: Server, body: bytes, **headers: str) -> httpx.Response:
    return await server.client.post("/v1/events", content=body, headers=headers)


async def open_raw(url: str) -> trio.SocketStream:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await trio.open_tcp_stream(parts.hostname, parts.port)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    async with stream:
        while chunk := await stream.receive_some():
            received += chunk
    return received


# -- what a body must be -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},  # what a no-cors fetch or a form can send: no Content-Type at all...
        {"Content-Type": "text/plain"},  # ...or a "simple" one
        {"Content-Type": ";;;==="},
        {"Content-Type": "application/json; charset=latin-1"},
        {"Content-Type": "application/json", "Content-Encoding": "br"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip, gzip"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/xml"},
    ],
)
def test_bodies_not_declared_as_utf8_json_are_415(headers: dict[str, str]) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        body_format(Headers(headers))
    assert caught.value.status == 415
    assert_envelope(json.loads(caught.value.body()), "unsupported_media_type")
    assert "send" in caught.value.message


async def test_a_body_not_declared_as_json_is_415_and_not_stored(server: Server) -> None:
    """The wiring of the table above: what a no-cors fetch or a form can send."""
    response = await post_raw(server, EVENT)
    assert response.status_code == 415, response.text
    assert_envelope(response.json(), "unsupported_media_type")
    assert "send" in response.json()["error"]["message"]
    assert "edge" not in stored_counts(server.db)


async def test_latin1_body_is_415_saying_send_utf8(server: Server) -> None:
    response = await post_raw(
        server,
        '{"key": "café"}'.encode("latin-1"),
        **{"Content-Type": "text/json; charset=latin-1"},
    )
    assert response.status_code == 415
    response = await post_raw(
        server,
        '{"key": "café"}'.encode("latin-1"),
        **{"Content-Type": "application/json; charset=ISO-8859-1"},
    )
    assert response.status_code == 415
    assert "UTF-8" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"key": "a\xff"}',  # invalid UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested beyond the recursion limit, under max_body
    ],
)
async def test_bodies_that_break_the_decoder_are_400(server: Server, body: bytes) -> None:
    response = await post_raw(server, body, **{"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert_envelope(response.json(), "malformed_json")


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_compressed_bodies_are_accepted(server: Server, encoding: str, compress: Any) -> None:
    body = json.dumps([{"key": "zipped", "value": i} for i in range(2000)]).encode()
    response = await post_raw(
        server,
        compress(body),
        **{"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2000, "duplicates": 0}


@pytest.mark.parametrize(
    "body",
    [
        b"\x1f\x8b\x08\x00garbage" * 10,
        gzip.compress(EVENT, mtime=0)[:-6],  # truncated
        gzip.compress(EVENT, mtime=0) + b"trailing",
        EVENT,  # not compressed at all
    ],
)
async def test_corrupt_gzip_is_400(server: Server, body: bytes) -> None:
    response = await post_raw(
        server, body, **{"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert response.status_code == 400, response.text
    assert_envelope(response.json(), "malformed_json")
    assert "gzip" in response.json()["error"]["message"]


async def test_a_body_that_inflates_beyond_max_body_is_413(start_server: StartServer) -> None:
    server = await start_server(max_body="64KiB")
    bomb = gzip.compress(b"[" + b" " * 10_000_000 + b"]")
    assert len(bomb) < 64 * 1024
    response = await post_raw(
        server, bomb, **{"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert response.status_code == 413
    assert_envelope(response.json(), "payload_too_large")
    assert "decompressed" in response.json()["error"]["message"]


async def test_405_says_which_methods_are_allowed(server: Server) -> None:
    response = await server.client.request("TRACE", "/healthz")
    assert response.status_code == 405
    assert_envelope(response.json(), "method_not_allowed")
    assert "GET" in response.headers["allow"]
    response = await server.client.delete("/v1/events")
    assert "POST" in response.headers["allow"]


# -- how a body is read --------------------------------------------------------------


async def start_upload(url: str, declared: int, first: bytes = b"[") -> trio.SocketStream:
    """A POST that sends its head and ``first`` of a ``declared``-byte body, then stalls."""
    stream = await open_raw(url)
    await stream.send_all(
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (declared, first)
    )
    return stream


async def start_chunked(url: str, *, encoding: str = "identity") -> trio.SocketStream:
    """A POST with a chunked body (no Content-Length) that has sent nothing of it yet."""
    stream = await open_raw(url)
    await stream.send_all(
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % encoding.encode()
    )
    return stream


async def send_chunk(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))


def gzip_part(gzipper: Any, data: bytes, last: bool = False) -> bytes:
    """``data`` as the next part of ``gzipper``'s stream, flushed so that the server can
    inflate it at once; with ``last``, the end of the stream."""
    part: bytes = gzipper.compress(data)
    end: bytes = gzipper.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return part + end


def held(server: Server) -> int:
    """The bytes of requests the server holds in flight."""
    return server.app.service.writers.inflight.used


def test_a_hold_grows_only_by_what_fits_and_is_given_back_whole() -> None:
    budget = InflightBytes(100)
    with pytest.raises(trio.TooSlowError), budget.holding() as hold:
        hold.grow(60)
        with pytest.raises(Overloaded, match="max_inflight"):
            hold.grow(41)
        assert (hold.size, budget.used) == (60, 60)  # the refused bytes are not held
        hold.grow(40)
        assert budget.used == 100
        raise trio.TooSlowError  # however the hold ends
    assert budget.used == 0


async def test_a_stalled_body_is_408_after_body_timeout(start_server: StartServer) -> None:
    server = await start_server(body_timeout="1s")
    stream = await start_upload(server.url, 100)
    await wait_until(lambda: held(server) == 1)
    with trio.fail_after(10):  # Quart's own body timeout would be 60 s
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 408 ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert_envelope(json.loads(body), "request_timeout")
    assert held(server) == 0


async def test_slow_uploads_hold_no_admission_token(start_server: StartServer) -> None:
    server = await start_server(queue_size="4", body_timeout="60s")
    uploads = [await start_upload(server.url, 1000) for _ in range(8)]
    await trio.sleep(0.3)  # let the server take up every upload
    statuses: list[int] = []

    async def send_one() -> None:
        response = await server.client.post("/v1/events", json={"key": "normal"})
        statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(send_one)
    assert statuses == [200] * 20
    for stream in uploads:
        await stream.aclose()


async def test_bodies_in_flight_are_bounded_by_max_inflight(start_server: StartServer) -> None:
    server = await start_server(max_inflight="100KiB", max_body="40KiB", body_timeout="60s")
    uploads = [await start_upload(server.url, 40_000, b"[".ljust(39_000)) for _ in range(2)]
    await wait_until(lambda: held(server) == 78_000)  # what the two bodies sent so far
    big = b'{"key": "big"}'.ljust(30_000)
    response = await post_raw(server, big, **{"Content-Type": "application/json"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert_envelope(response.json(), "overloaded")
    assert "max_inflight" in response.json()["error"]["message"]
    small = await post_raw(server, EVENT, **{"Content-Type": "application/json"})
    assert small.status_code == 200
    for stream in uploads:
        await stream.aclose()
    await wait_until(lambda: held(server) == 0)  # the abandoned bodies give their bytes back
    response = await post_raw(server, big, **{"Content-Type": "application/json"})
    assert response.status_code == 200
    assert held(server) == 0


async def test_slow_uploads_hold_only_what_they_sent(start_server: StartServer) -> None:
    """Chunked and compressed bodies, whose size is not known before they arrive, once
    reserved max_body each: four that had sent one byte held 256 KiB of 300 KiB, and
    every chunked POST and every POST over 44 KiB got 503 while they lasted."""
    server = await start_server(max_inflight="300KiB", max_body="64KiB", body_timeout="60s")
    async with contextlib.AsyncExitStack() as uploads:
        for encoding in ("identity", "identity", "identity", "gzip"):
            before = held(server)
            stream = await uploads.enter_async_context(
                await start_chunked(server.url, encoding=encoding)
            )
            await send_chunk(
                stream,
                b"[" if encoding == "identity" else gzip_part(zlib.compressobj(wbits=31), b"["),
            )
            await wait_until(lambda: held(server) > before)  # noqa: B023 (awaited at once)

        async def chunks() -> AsyncIterator[bytes]:
            yield b'[{"key": "chunked"},'
            yield b'{"key": "chunked"}]'

        chunked = await server.client.post(
            "/v1/events", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 200, chunked.text
        big = b'{"key": "big"}'.ljust(60_000)
        large = await post_raw(server, big, **{"Content-Type": "application/json"})
        assert large.status_code == 200, large.text
        assert held(server) == 4  # a byte for each upload under way (the gzip one inflated)
    await wait_until(lambda: held(server) == 0)  # the clients closed mid-body
    assert stored_counts(server.db) == {"chunked": 2, "big": 1}


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_a_body_holds_its_bytes_as_they_arrive(
    start_server: StartServer, encoding: str
) -> None:
    server = await start_server(body_timeout="60s")
    gzipper = zlib.compressobj(wbits=31)
    pieces = [b'[{"key": "piece"}', b', {"key": "piece"}' * 100, b"]"]
    async with await start_chunked(server.url, encoding=encoding) as stream:
        for count, piece in enumerate(pieces):
            last = count == len(pieces) - 1
            await send_chunk(
                stream, piece if encoding == "identity" else gzip_part(gzipper, piece, last)
            )
            kept = sum(map(len, pieces[: count + 1]))  # inflated: what the body holds
            await wait_until(lambda: held(server) >= kept)  # noqa: B023 (awaited at once)
            assert held(server) == kept
        await stream.send_all(b"0\r\n\r\n")
        answer = await stream.receive_some()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert held(server) == 0
    assert stored_counts(server.db) == {"piece": 101}


# -- how connections end -------------------------------------------------------------


async def test_idle_keep_alive_connections_are_closed(start_server: StartServer) -> None:
    server = await start_server(keep_alive_timeout="1s")
    stream = await open_raw(server.url)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    with trio.fail_after(1 + 5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_connection_close_is_honoured(server: Server) -> None:
    stream = await open_raw(server.url)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    with trio.fail_after(3):  # the keep-alive timeout is 5 s
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_huge_request_head_is_431_from_hypercorn(server: Server) -> None:
    """Refused below the app: a bare 431, outside the envelope (see the README)."""
    stream = await open_raw(server.url)
    await stream.send_all(b"GET /healthz?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    with trio.fail_after(5):
        answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert answer.endswith(b"\r\n\r\n")  # no body


def test_early_answers_do_not_hang_the_next_request(server_process: Any) -> None:
    """An answer given before the body is read must not leave the connection stuck.

    The server runs in a process of its own: the race needs a client that sends
    while the server answers, which one trio loop running both never does."""
    server = server_process("--max-body", "64KiB").start()
    early: list[tuple[dict[str, str], dict[str, str], int]] = [
        ({"Content-Type": "text/plain"}, {}, 100),  # 415
        ({"Content-Type": "application/json"}, {"wait": "maybe"}, 10_000),  # 400
        ({"Content-Type": "text/plain"}, {}, 60_000),  # 415
        ({"Content-Type": "application/json"}, {}, 1_000_000),  # 413 by Content-Length
    ]
    with httpx.Client(base_url=server.url, timeout=2) as client:
        for i in range(200):
            headers, params, size = early[i % len(early)]
            response = client.post(
                "/v1/events", content=b"x" * size, headers=headers, params=params
            )
            assert response.status_code in (400, 413, 415)
            assert response.headers["connection"] == "close"
            assert client.get("/healthz").status_code == 200  # a hang fails in 2 s


def test_running_out_of_file_descriptors_is_not_for_good(server_process: Any) -> None:
    """Idle clients that took every descriptor are closed; then others get in again."""
    server = server_process("--keep-alive-timeout", "1s")
    server.start(
        ["prlimit", "--nofile=64:64", sys.executable, "-m", "trioagg", "serve", *server.args]
    )
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    idle = []
    for _ in range(80):  # more than the server has descriptors
        client = socket.create_connection((host, port), timeout=5)
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        idle.append(client)
    time.sleep(3)  # the keep-alive timeout passes
    deadline = time.monotonic() + 20
    while True:
        try:
            response = httpx.get(server.url + "/healthz", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server stayed locked out"
    assert response.status_code == 200
    for client in idle:
        client.close()


@pytest.mark.parametrize("host", [b"a..b", b"localhost..", b"." + b"x" * 70 + b".example"])
def test_a_host_that_is_no_host_name_is_400_without_a_traceback(
    server_process: Any, host: bytes
) -> None:
    """Found by attack: Werkzeug's IDNA encoding failed while Quart made the request's
    context: a 500 and ~60 logged lines per request, with or without a key."""
    server = server_process().start()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert server.stop() == 0
    assert "Traceback" not in server.output and "ERROR" not in server.output
