"""The hot path (:mod:`trioagg.http.hotpath`): which requests it answers and which it hands
to Quart (in process, at the ASGI level, as hypercorn tests its protocol layer), and over
real HTTP that its answers are the Quart views' answers, request for request."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
import trio

from trioagg.core.errors import InvalidQuery, Overloaded, StoreOutage
from trioagg.http.gate import failure_answer
from trioagg.http.hotpath import HotPath
from trioagg.service.metrics import Metrics

from .conftest import Server, StartServer, assert_envelope, stored_counts
from .test_auth import bearer, make_key

ORIGIN = "https://grafana.example.com"
#: The hot path reads no store of its own: its tests run on one.
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class Recorder:
    """An ASGI app in Quart's place that notes what reached it."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"quart", "more_body": False})


def http_scope(
    method: str, path: str, query: bytes = b"", headers: Iterable[tuple[str, str]] = ()
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in [("host", "localhost"), *headers]],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


async def call(
    hot: HotPath, scope: dict[str, Any], messages: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """What ``hot`` sends for ``scope``, given the request ``messages``."""
    pending = list(messages) or [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await hot(scope, receive, send)  # type: ignore[arg-type]  # plain dicts, as sent
    return sent


def answer_of(sent: list[dict[str, Any]]) -> tuple[int, dict[bytes, bytes], bytes]:
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert bodies[-1]["more_body"] is False
    return start["status"], dict(start["headers"]), b"".join(m["body"] for m in bodies)


def a_day_query() -> bytes:
    """The last day of ``hot`` (events without ``ts`` are stamped now: no test here reads
    the clock)."""
    return b"key=hot&granularity=hour"


@SQLITE
async def test_the_two_hot_endpoints_are_answered_without_quart(server: Server) -> None:
    quart = Recorder()
    hot = HotPath(server.app, quart)
    event = json.dumps({"key": "hot", "value": 2}).encode()
    posted = await call(
        hot,
        http_scope("POST", "/v1/events", headers=[("content-type", "application/json")]),
        [
            {"type": "http.request", "body": event[:5], "more_body": True},
            {"type": "http.request", "body": event[5:], "more_body": False},
        ],
    )
    status, headers, body = answer_of(posted)
    assert (status, json.loads(body)) == (200, {"accepted": 1, "duplicates": 0})
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body)).encode()
    status, _, body = answer_of(await call(hot, http_scope("GET", "/v1/aggregates", a_day_query())))
    assert status == 200
    (result,) = json.loads(body)["results"]
    assert sum(bucket["count"] for bucket in result["buckets"]) == 1
    assert quart.scopes == []


@pytest.mark.parametrize(
    ("method", "path", "root_path"),
    [
        ("HEAD", "/v1/aggregates", ""),
        ("OPTIONS", "/v1/events", ""),
        ("GET", "/v1/events", ""),  # Quart's 405 with its Allow header
        ("POST", "/v1/aggregates", ""),
        ("GET", "/v1/aggregates/", ""),
        ("GET", "/v1/keys", ""),
        ("GET", "/v1/aggregates", "/behind/a/proxy"),
    ],
)
@SQLITE
async def test_every_other_request_goes_to_quart(
    server: Server, method: str, path: str, root_path: str
) -> None:
    quart = Recorder()
    scope = {**http_scope(method, path, a_day_query()), "root_path": root_path}
    status, _, body = answer_of(await call(HotPath(server.app, quart), scope))
    assert (status, body) == (299, b"quart")
    assert quart.scopes == [scope]


@SQLITE
async def test_with_cors_on_requests_with_an_origin_go_to_quart(
    start_server: StartServer,
) -> None:
    server = await start_server(cors_origin=ORIGIN)
    quart = Recorder()
    hot = HotPath(server.app, quart)
    plain = http_scope("GET", "/v1/aggregates", a_day_query())
    assert answer_of(await call(hot, plain))[0] == 200
    from_a_page = http_scope("GET", "/v1/aggregates", a_day_query(), [("origin", ORIGIN)])
    assert answer_of(await call(hot, from_a_page))[0] == 299
    assert quart.scopes == [from_a_page]
    _, headers, _ = answer_of(await call(hot, plain))
    assert headers[b"vary"] == b"Origin"  # as quart-cors says on every answer


@SQLITE
async def test_a_client_gone_before_its_body_arrived_is_not_answered_and_stores_nothing(
    server: Server,
) -> None:
    hot = HotPath(server.app, Recorder())
    scope = http_scope("POST", "/v1/events", headers=[("content-type", "application/json")])
    sent = await call(
        hot,
        scope,
        [
            {"type": "http.request", "body": b'[{"key": "gone"}', "more_body": True},
            {"type": "http.disconnect"},
        ],
    )
    assert sent == []
    assert server.app.service.writers.queued() == 0
    await server.app.service.writers.flushed()
    assert stored_counts(server.db) == {}


@SQLITE
async def test_what_a_hot_request_raises_is_answered_to_it_alone(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure inside the hot path (here, of the aggregates use case) is that request's
    500, logged; the next request is answered as ever."""

    class Failing:
        async def answer(self, *args: Any, **kwargs: Any) -> bytes:
            raise RuntimeError("a bug in the use case")

    hot = HotPath(server.app, Recorder())
    working = server.app.aggregates
    server.app.aggregates = Failing()  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.ERROR, "trioagg"):
            status, _, body = answer_of(
                await call(hot, http_scope("GET", "/v1/aggregates", a_day_query()))
            )
    finally:
        server.app.aggregates = working
    assert status == 500
    assert_envelope(json.loads(body), "internal_error")
    assert "unexpected error answering GET /v1/aggregates" in caplog.text
    assert "a bug in the use case" in caplog.text
    status, _, _ = answer_of(await call(hot, http_scope("GET", "/v1/aggregates", a_day_query())))
    assert status == 200


def test_failures_are_answered_in_the_envelope_and_counted() -> None:
    metrics = Metrics()
    status, headers, body = failure_answer(metrics, Overloaded("full", 3), "POST", "/v1/events")
    assert (status, headers) == (503, {"Retry-After": "3"})
    assert_envelope(json.loads(body), "overloaded")
    status, _, body = failure_answer(metrics, InvalidQuery("no"), "GET", "/v1/aggregates")
    assert status == 422
    try:
        raise StoreOutage("locked") from OSError("the driver's words")
    except StoreOutage as outage:
        status, _, body = failure_answer(metrics, outage, "GET", "/v1/aggregates")
    assert status == 503
    assert "locked" in json.loads(body)["error"]["message"]
    assert "driver" not in body.decode()


# -- over HTTP: the hot path answers as the Quart views do ---------------------------

#: Headers that differ between the two paths by design (CORS's) or by the clock.
_OWN_HEADERS = {"date", "access-control-allow-origin", "access-control-expose-headers"}


def same_answer(hot: httpx.Response, quart: httpx.Response, *, early: bool = False) -> None:
    """``early``: the error is in the body's first piece, which may be found before the
    server hands over the end of the body (the hot path always, Quart, which reads the
    body in a task of its own, at times): such an answer closes the connection, as every
    answer before the whole body does (:func:`~trioagg.http.edges.guard_connections`)."""
    assert hot.status_code == quart.status_code, (hot.text, quart.text)
    assert hot.content == quart.content
    assert quart.headers.get("access-control-allow-origin") == ORIGIN  # Quart answered it
    own = _OWN_HEADERS | ({"connection"} if early else set())
    kept = {k: v for k, v in hot.headers.items() if k not in own}
    assert kept == {k: v for k, v in quart.headers.items() if k not in own}


def events_body(count: int, key: str = "same") -> bytes:
    return json.dumps([{"key": key, "value": i} for i in range(count)]).encode()


JSON = {"Content-Type": "application/json"}
POSTS: list[tuple[str, dict[str, str], dict[str, str], bytes]] = [
    ("durable", {}, JSON, events_body(3)),
    ("not durable", {"wait": "false"}, JSON, events_body(2)),
    ("ndjson", {}, {"Content-Type": "application/x-ndjson"}, b'{"key": "same"}\n{"key": "same"}\n'),
    ("gzip", {}, {**JSON, "Content-Encoding": "gzip"}, gzip.compress(events_body(4))),
    ("corrupt gzip", {}, {**JSON, "Content-Encoding": "gzip"}, b"\x1f\x8b not gzip"),
    ("bad wait", {"wait": "maybe"}, JSON, events_body(1)),
    ("no content type", {}, {}, events_body(1)),
    ("brotli", {}, {**JSON, "Content-Encoding": "br"}, events_body(1)),
    ("malformed", {}, JSON, b'[{"key": '),
    ("invalid events", {}, JSON, b'[{"key": "ok"}, {"key": "bad key!"}, {"value": 1}]'),
    ("too large", {}, JSON, b"[" + b'{"key": "k"},' * 200 + b'{"key": "k"}]'),
    ("future", {}, JSON, json.dumps({"key": "k", "ts": "2999-01-01T00:00:00Z"}).encode()),
]


@pytest.mark.parametrize(("case", "params", "headers", "body"), POSTS, ids=[p[0] for p in POSTS])
@SQLITE
async def test_posts_are_answered_as_the_quart_view_answers_them(
    start_server: StartServer,
    case: str,
    params: dict[str, str],
    headers: dict[str, str],
    body: bytes,
) -> None:
    server = await start_server(cors_origin=ORIGIN, max_body="2KB")
    client = server.client
    hot = await client.post("/v1/events", params=params, headers=headers, content=body)
    quart = await client.post(
        "/v1/events", params=params, headers={**headers, "Origin": ORIGIN}, content=body
    )
    same_answer(hot, quart, early=case == "corrupt gzip")


@SQLITE
async def test_reads_are_answered_as_the_quart_view_answers_them(
    start_server: StartServer,
) -> None:
    server = await start_server(cors_origin=ORIGIN)
    client = server.client
    assert (await client.post("/v1/events", content=events_body(50), headers=JSON)).is_success
    day = {"key": "same", "granularity": "hour"}
    queries = [
        day,  # a miss, then a hit of the entry the first one made
        day,
        {**day, "stats": "count,p50", "granularity": "day"},
        {**day, "key": "same,other", "fill": "zero"},
        {**day, "granularity": "fortnight"},  # 422
        {**day, "bogus": "1"},  # 422
        {},  # 422
    ]
    for query in queries:
        hot = await client.get("/v1/aggregates", params=query)
        quart = await client.get("/v1/aggregates", params=query, headers={"Origin": ORIGIN})
        same_answer(hot, quart)


@SQLITE
async def test_refusals_are_answered_as_the_quart_view_answers_them(
    start_server: StartServer,
) -> None:
    server = await start_server(cors_origin=ORIGIN, auth="on")
    reader = await trio.to_thread.run_sync(make_key, server.db, "reader", "read")
    client = server.client
    cases: list[tuple[str, dict[str, str]]] = [
        ("GET", {}),  # no key
        ("GET", {"Authorization": "Basic abc"}),
        ("GET", bearer("tagg_not_a_key")),
        ("POST", bearer(reader)),  # a reader may not ingest
        ("GET", bearer(reader)),  # let in
    ]
    for method, headers in cases:
        hot = await client.request(
            method, "/v1/aggregates" if method == "GET" else "/v1/events", headers={**headers}
        )
        quart = await client.request(
            method,
            "/v1/aggregates" if method == "GET" else "/v1/events",
            headers={**headers, "Origin": ORIGIN},
        )
        same_answer(hot, quart)


@SQLITE
async def test_hot_requests_are_timed_and_their_refusals_counted(server: Server) -> None:
    client = server.client
    assert (await client.get("/v1/aggregates")).status_code == 422
    assert (await client.post("/v1/events", content=b"{", headers=JSON)).status_code == 400
    metrics = (await client.get("/metrics")).text
    assert 'trioagg_request_seconds_count{endpoint="/v1/aggregates",status="422"} 1.0' in metrics
    assert 'trioagg_request_seconds_count{endpoint="/v1/events",status="400"} 1.0' in metrics
    assert 'trioagg_requests_rejected_total{code="malformed_json"} 1.0' in metrics
