"""The two endpoints every load is made of, served straight from ASGI:
``POST /v1/events`` and ``GET /v1/aggregates``.

Quart's machinery around a view (its request and app contexts, the hooks, the tasks
it starts for each request, a response object) costs about 0.3 ms of the event loop
per request on this project's machine: a raw ASGI app on hypercorn's trio worker
answered a fixed 2.6 KB answer at 1.6 x the rate of a Quart-Trio view (wrk, 8
connections, one worker), and a cached read's own work is a small part of that.

:class:`HotPath` sits in front of the Quart app and answers those two endpoints'
requests itself, with what the Quart views use: the :class:`~trioagg.http.gate.Gate`,
the views below over the service's use cases, the edges' body reading, the request
timer and :func:`~trioagg.http.gate.failure_answer`. Every other request goes to Quart
unchanged: other paths and methods (HEAD and OPTIONS included), requests under a root
path, requests before the service started and, while CORS is on, requests that carry
``Origin`` (quart-cors answers those). The Quart views of the two endpoints call the
same :func:`events_view` and :func:`aggregates_view`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from werkzeug.datastructures import Headers
from werkzeug.sansio.request import Request

from ..core.answers import Pieces
from ..core.errors import RequestError
from ..keys.admin import ApiKey
from ..query.params import parse_wait
from ..service.cases import accept_events
from ..service.memory import give_back
from ..service.metrics import bound_children
from .edges import ASGIApp, body_format, read_body
from .gate import failure_answer

if TYPE_CHECKING:
    from .app import TrioaggApp

#: (method, path) of the requests :class:`HotPath` answers itself.
HOT: Final = frozenset({("POST", "/v1/events"), ("GET", "/v1/aggregates")})
_JSON: Final = (b"content-type", b"application/json")


async def events_view(
    app: TrioaggApp,
    headers: Headers,
    args: Mapping[str, str],
    content_length: int | None,
    body: AsyncIterator[bytes],
    key: ApiKey | None,
) -> tuple[int, bytes]:
    """``POST /v1/events``: the status and JSON of the answer to a request with these
    headers, query arguments and body, let in with ``key``."""
    settings = app.settings
    body_form = body_format(headers)
    durable = wait_param(args.get("wait"))
    stored = await accept_events(
        app.service,
        functools.partial(
            read_body,
            content_length,
            body,
            body_form.encoding,
            max_body=settings.max_body,
            timeout=settings.body_timeout,
        ),
        ndjson=body_form.ndjson,
        durable=durable,
        tenant=None if key is None else key.tenant,
    )
    if durable:
        answer = {"accepted": stored.events, "duplicates": stored.duplicates}
        return 200, msgspec.json.encode(answer)
    return 202, msgspec.json.encode({"accepted": stored.events})


async def aggregates_view(
    app: TrioaggApp, query_string: bytes, args: Mapping[str, Any], key: ApiKey | None
) -> bytes | Pieces:
    """``GET /v1/aggregates``: the JSON of the answer, whole or in pieces."""
    return await app.aggregates.answer(
        app.service,
        query_string,
        args,
        tenant=None if key is None else key.tenant,
        budget=app.budget,
    )


def wait_param(text: str | None) -> bool:
    if text is None:
        return True
    try:
        return parse_wait(text)
    except ValueError as error:
        raise RequestError(f"wait {error}") from None


async def sent(pieces: Pieces) -> AsyncGenerator[bytes, None]:
    """The pieces of an answer one after the other, each let go once sent, so that a big
    answer is neither held whole while it is sent nor copied into one string; once all
    are sent, the memory they took is given back."""
    chunks = pieces.chunks
    chunks.reverse()
    while chunks:
        yield chunks.pop()
    await trio.to_thread.run_sync(give_back, False)


def request_headers(scope: HTTPScope) -> Headers:
    """A request's headers as Quart makes them (``quart.asgi``), so that both paths read
    the same values: names title-cased, Latin-1, and an empty Host for HTTP/1.0."""
    headers = Headers()
    headers["Remote-Addr"] = (scope.get("client") or ["<local>"])[0]
    for name, value in scope["headers"]:
        headers.add(name.decode("latin1").title(), value.decode("latin1"))
    if scope["http_version"] < "1.1":
        headers.setdefault("Host", "")
    return headers


class Disconnected(Exception):
    """The client went away before its request's body arrived whole."""


class _Body:
    """A request's body as it arrives, in the pieces the server hands over."""

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self._done = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            if message["type"] != "http.request":
                continue
            self._done = not message.get("more_body", False)
            if chunk := message.get("body", b""):
                return bytes(chunk)
        raise StopAsyncIteration


class HotPath:
    """The ASGI app in front of Quart (see the module)."""

    def __init__(self, app: TrioaggApp, quart: ASGIApp) -> None:
        self._app = app
        self._quart = quart
        self._cors = bool(app.settings.cors_origin)
        # quart-cors says Vary: Origin on every answer, with Origin or without: so that
        # no shared cache serves an answer without CORS headers to a page.
        self._vary: list[tuple[bytes, bytes]] = [(b"vary", b"Origin")] if self._cors else []
        self._timer = bound_children(app.metrics.request_seconds)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._quart(scope, receive, send)
            return
        if (
            (scope["method"], scope["path"]) not in HOT
            or scope.get("root_path")
            or not self._app.serving
        ):
            await self._quart(scope, receive, send)
            return
        headers = request_headers(scope)
        if self._cors and "Origin" in headers:
            await self._quart(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            status, extra, body = await self._answer(scope, headers, receive)
        except Disconnected:
            return  # no one to answer: the server closes the connection
        except Exception as error:
            status, extra, body = failure_answer(
                self._app.metrics, error, scope["method"], scope["path"]
            )
        self._timer(scope["path"], status).observe(time.perf_counter() - started)
        size = len(body) if isinstance(body, bytes) else body.size
        start_headers = [
            *((k.lower().encode("latin1"), v.encode("latin1")) for k, v in extra.items()),
            _JSON,
            (b"content-length", str(size).encode()),
            *self._vary,
        ]
        await send({"type": "http.response.start", "status": status, "headers": start_headers})
        if isinstance(body, bytes):
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        # Closed at once when a send fails (a client that reads nothing is cut off after
        # --send-timeout), not left to the garbage collector half done.
        async with contextlib.aclosing(sent(body)) as pieces:
            async for chunk in pieces:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _answer(
        self, scope: HTTPScope, headers: Headers, receive: ASGIReceiveCallable
    ) -> tuple[int, dict[str, str], bytes | Pieces]:
        app = self._app
        request = Request(
            scope["method"],
            scope["scheme"],
            scope.get("server"),
            "",
            scope["path"],
            scope["query_string"],
            headers,
            None if scope["client"] is None else scope["client"][0],
        )
        key = await app.gate.check(
            app.service,
            scope["path"],
            scope["method"],
            headers.get("Host"),
            headers.get("Authorization"),
            scope.get("server"),
        )
        if scope["method"] == "GET":
            return 200, {}, await aggregates_view(app, scope["query_string"], request.args, key)
        status, body = await events_view(
            app, headers, request.args, request.content_length, _Body(receive), key
        )
        return status, {}, body
