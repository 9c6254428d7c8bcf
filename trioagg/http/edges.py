"""The HTTP edge of trioagg: what a request body must be before it is read, the one
place it is read, and how connections end.

* :func:`body_format` checks the headers before a byte of the body is read:
  ``Content-Type`` JSON or NDJSON in UTF-8, required so that no web page can
  post events with a "simple" (no-CORS) request; ``Content-Encoding`` identity,
  gzip or deflate.
* :func:`read_body` reads a body within ``max_body`` (on the wire and inflated)
  and ``body_timeout``, inflating gzip and deflate as it arrives, and tells its
  caller each piece it keeps before keeping it (to hold in-flight bytes).
* :func:`guard_connections` wraps the ASGI app so that connections end when HTTP
  says they do (see its docstring for the Quart-Trio behaviour it works around).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope
from werkzeug.datastructures import Headers
from werkzeug.http import parse_options_header

from ..core.errors import (
    MalformedBody,
    PayloadTooLarge,
    RequestTimedOut,
    UnsupportedMediaType,
    error_body,
)

JSON_TYPES: Final = frozenset({"application/json"})
NDJSON_TYPES: Final = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonlines"}
)
_CHARSETS: Final = frozenset({"utf-8", "utf8"})
#: zlib's window bits per accepted Content-Encoding (None: not compressed).
_WBITS: Final[dict[str, int | None]] = {
    "identity": None,
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class BodyFormat:
    """What a request says its body is: NDJSON or JSON, and how it is compressed."""

    ndjson: bool
    encoding: str


def body_format(headers: Headers) -> BodyFormat:
    """The format of a body from its headers, or :class:`UnsupportedMediaType` (415)."""
    content_type = headers.get("Content-Type", "")
    mimetype, params = parse_options_header(content_type)
    mimetype = mimetype.lower()
    if mimetype not in JSON_TYPES and mimetype not in NDJSON_TYPES:
        given = f"Content-Type {content_type!r}" if content_type else "a body without Content-Type"
        raise UnsupportedMediaType(
            f"{given} is not accepted: send Content-Type: application/json (an event or an "
            "array of events) or application/x-ndjson (one event per line)"
        )
    charset = params.get("charset", "utf-8").lower()
    if charset not in _CHARSETS:
        raise UnsupportedMediaType(
            f"charset {charset!r} is not accepted: send the body as UTF-8 "
            "(charset=utf-8, or no charset)"
        )
    return BodyFormat(ndjson=mimetype in NDJSON_TYPES, encoding=content_encoding(headers))


def content_encoding(headers: Headers) -> str:
    """The body's ``Content-Encoding``, one :func:`read_body` inflates, or
    :class:`UnsupportedMediaType` (415)."""
    encoding = ", ".join(headers.getlist("Content-Encoding")).strip().lower() or "identity"
    if encoding not in _WBITS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed, "
            "or compressed with gzip or deflate"
        )
    return encoding


def too_large_message(max_body: int) -> str:
    return f"the request body is larger than {max_body} bytes (max_body)"


async def read_body(
    content_length: int | None,
    chunks: AsyncIterable[bytes],
    encoding: str,
    *,
    max_body: int,
    timeout: float,
    keep: Callable[[int], None],
) -> bytes:
    """The whole body of ``chunks`` (which the request's ``Content-Length`` says is
    ``content_length`` bytes, None when it says nothing), inflated:
    :class:`PayloadTooLarge` when more than ``max_body``
    bytes arrive or inflate, :class:`RequestTimedOut` when it takes longer than
    ``timeout``, :class:`MalformedBody` when compressed data is corrupt.

    ``keep(size)`` is called before each piece of ``size`` bytes is added to the body
    (as it arrives, or as it is inflated), and may raise to refuse it: memory is
    accounted for as the client sends, never reserved ahead for what it might send."""
    if content_length is not None and content_length > max_body:
        raise PayloadTooLarge(too_large_message(max_body))
    wbits = _WBITS[encoding]
    inflater = None if wbits is None else zlib.decompressobj(wbits)
    received = 0
    body = bytearray()
    with trio.move_on_after(timeout) as deadline:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_body:
                raise PayloadTooLarge(too_large_message(max_body))
            if inflater is None:
                keep(len(chunk))
                body += chunk
                continue
            try:
                # At most one byte more than the room left: a zip bomb costs no more.
                inflated = inflater.decompress(chunk, max_body - len(body) + 1)
            except zlib.error as error:
                raise _corrupt(encoding, error) from None
            if len(body) + len(inflated) > max_body:
                raise PayloadTooLarge(too_large_message(max_body) + " once decompressed")
            keep(len(inflated))
            body += inflated
    if deadline.cancelled_caught:
        raise RequestTimedOut(
            f"the request body took longer than {timeout:g} s to arrive (body_timeout)"
        )
    if inflater is not None and (not inflater.eof or inflater.unused_data):
        raise _corrupt(encoding, "truncated, or followed by other data")
    return bytes(body)


def _corrupt(encoding: str, error: object) -> MalformedBody:
    return MalformedBody(f"the body is not valid {encoding} data: {error}")


def _declares_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            return True
        if name.lower() == b"content-length" and value.strip() != b"0":
            return True
    return False


def _unusable_host(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the Host header is one Werkzeug cannot route on: it encodes the name with
    IDNA while making the request's context, before any error handler could answer
    (``a..b``: an empty label), and the app would fail with a 500 and a traceback."""
    for name, value in headers:
        if name.lower() == b"host":
            try:
                value.decode("latin-1").lower().encode("idna")
            except UnicodeError:
                return True
    return False


async def _refuse_bad_host(send: ASGISendCallable) -> None:
    body = error_body("bad_request", "the Host header is not a valid host name")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def guard_connections(
    app: ASGIApp,
    *,
    closing: Callable[[], bool] = lambda: False,
    send_timeout: float = math.inf,
) -> ASGIApp:
    """Wrap an ASGI app so that HTTP connections end on time.

    Quart-Trio cancels the request's tasks as soon as the server reports the
    request done, which it does from inside the app's last ``send``: hypercorn's
    next steps there (closing the socket for ``Connection: close``, arming the
    keep-alive timer) are cancelled with it, and the connection stays open
    forever. The wrapper shields each ``send`` so that those steps complete.

    A response that starts before the request body has all arrived (an early
    415, 413 or 405) carries ``Connection: close``: the unread rest of the body
    would otherwise be taken for the next request on the connection. So does
    every response once ``closing()`` is true (the server is shutting down and
    closes each connection after its answer): a client then sends its next
    request on a new connection instead of on one about to close.

    A request whose Host header cannot be a host name is answered 400 here, in the
    error envelope, without the app (which would fail on it with a 500 and a logged
    traceback per request).

    A ``send`` that takes longer than ``send_timeout`` (a client that takes none of
    an answer: over HTTP/2 it need only grant no flow-control window, and no socket
    send is ever pending) ends the request: the app is cancelled, which hypercorn
    answers by closing the stream (HTTP/2) or the connection (HTTP/1.1), and what
    the answer held is let go. Without it such a request, shielded, would outlive
    even a graceful shutdown.
    """

    async def guarded(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if _unusable_host(scope["headers"]):
            with trio.CancelScope(shield=True):
                await _refuse_bad_host(send)
            return
        body_pending = _declares_body(scope["headers"])

        async def watched_receive() -> ASGIReceiveEvent:
            nonlocal body_pending
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_pending = False
            return message

        async def shielded_send(message: Any) -> None:
            await trio.lowlevel.checkpoint_if_cancelled()  # no more sends once timed out
            if message["type"] == "http.response.start" and (body_pending or closing()):
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            with trio.CancelScope(shield=True), trio.move_on_after(send_timeout) as sending:
                await send(message)
            if sending.cancelled_caught:
                request.cancel()  # at the app's next checkpoint

        with trio.CancelScope() as request:
            await app(scope, watched_receive, shielded_send)

    return guarded
