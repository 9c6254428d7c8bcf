"""The ingest contract over real HTTP: validation table, envelope, atomicity, limits."""

from __future__ import annotations

import json
from typing import Any

import pytest

from . import clock
from .conftest import Server, StartServer, post, stored_counts

NOW = clock.now()

# Every row of the contract's validation table: (event, field the problem names).
INVALID_EVENTS: list[tuple[dict[str, Any] | str, str | None]] = [
    ({}, "key"),
    ({"key": ""}, "key"),
    ({"key": "k" * 256}, "key"),
    ({"key": "é" * 128}, "key"),  # 128 characters, 256 bytes
    ({"key": "line\nbreak"}, "key"),
    ({"key": "nul\u0000"}, "key"),
    ({"key": "abc\n"}, "key"),  # "$" alone would match before the final newline
    ({"key": "c1\u0085"}, "key"),  # C1 controls U+0080-U+009F are control characters too
    ({"key": "c1\u009f"}, "key"),
    ({"key": 7}, "key"),
    ({"key": "k", "ts": "2026-11-24T10:15:02"}, "ts"),  # no offset: no guessing
    ({"key": "k", "ts": "yesterday"}, "ts"),
    ({"key": "k", "ts": True}, "ts"),
    ({"key": "k", "ts": NOW + 7200}, "ts"),  # beyond max_future (1 h)
    ({"key": "k", "value": True}, "value"),
    ({"key": "k", "value": "3"}, "value"),
    ('{"key": "k", "value": 1e999}', "value"),  # decodes to infinity
    ({"key": "k", "value": -1e308}, "value"),  # beyond MAX_ABS_VALUE (1e100)
    ({"key": "k", "value": 1.0000000000000001e101}, "value"),
    ('{"key": "k", "value": NaN}', None),  # not JSON at all: 400
    ({"key": "k", "value": None}, "value"),
    ({"key": "k", "tags": {"1st": "x"}}, "tags"),
    ({"key": "k", "tags": {"a" * 65: "x"}}, "tags"),
    ({"key": "k", "tags": {"ok\n": "x"}}, "tags"),
    ({"key": "k", "tags": {"t": ""}}, "tags"),
    ({"key": "k", "tags": {"t": "v" * 256}}, "tags"),
    ({"key": "k", "tags": {"t": "ü" * 128}}, "tags"),
    ({"key": "k", "tags": {"t": 5}}, "tags"),
    ({"key": "k", "tags": {f"t{i}": "v" for i in range(17)}}, "tags"),
    ({"key": "k", "tags": ["a"]}, "tags"),
    ({"key": "k", "distinct_id": ""}, "distinct_id"),
    ({"key": "k", "distinct_id": 5}, "distinct_id"),
    ({"key": "k", "id": ""}, "id"),
    ({"key": "k", "id": "i" * 129}, "id"),
    ({"key": "k", "vaule": 3}, "vaule"),  # unknown fields are typos, not defaults
]

VALID_EVENTS: list[dict[str, Any]] = [
    {"key": "k"},
    {"key": "k" * 255},
    {"key": "ключ"},
    {"key": "k", "ts": "2026-11-20T10:15:02Z"},
    {"key": "k", "ts": "2026-11-20T10:15:02.250+02:00"},
    {"key": "k", "ts": 1764000000},
    {"key": "k", "ts": 1764000000.75},
    {"key": "k", "value": -42.5},
    {"key": "k", "value": 0},
    {"key": "k", "value": 1e100},
    {"key": "k", "value": -1e100},
    {"key": "k\u00a0"},  # U+00A0 is a space, not a control character
    {"key": "k", "tags": {f"t{i}": "v" for i in range(16)}},
    {"key": "k", "tags": {"_a.b-c": "v" * 255}},
    {"key": "k", "distinct_id": "user-991", "id": "i" * 128},
]


def assert_envelope(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(("event", "field"), INVALID_EVENTS)
async def test_each_invalid_event_is_rejected_naming_its_field(
    server: Server, event: dict[str, Any] | str, field: str | None
) -> None:
    raw = event if isinstance(event, str) else json.dumps(event)
    response = await server.client.post(
        "/v1/events",
        content=f'[{{"key": "fine"}}, {raw}]',
        headers={"Content-Type": "application/json"},
    )
    if field is None:
        assert response.status_code == 400, response.text
        assert_envelope(response.json(), "malformed_json")
        return
    assert response.status_code == 422, response.text
    body = response.json()
    assert_envelope(body, "invalid_events")
    assert {"index": 1, "field": field} in [
        {"index": d["index"], "field": d["field"]} for d in body["error"]["details"]
    ]
    assert all(d["index"] == 1 for d in body["error"]["details"])


@pytest.mark.parametrize("event", VALID_EVENTS)
async def test_each_valid_event_is_accepted(server: Server, event: dict[str, Any]) -> None:
    response = await post(server.client, event)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0}


async def test_every_problem_of_every_event_is_listed(server: Server) -> None:
    response = await post(
        server.client,
        [
            {"key": "ok"},
            {"key": "", "value": "x", "extra": 1},
            {"key": "ok"},
            {"value": True, "ts": NOW + 86400},
        ],
    )
    assert response.status_code == 422
    problems = {(d["index"], d["field"]) for d in response.json()["error"]["details"]}
    assert problems == {(1, "key"), (1, "value"), (1, "extra"), (3, "key"), (3, "value"), (3, "ts")}
    assert "2 of 4 event(s) are invalid" in response.json()["error"]["message"]


async def test_a_rejected_request_stores_nothing(server: Server) -> None:
    good = [{"key": "atomic", "value": v} for v in range(50)]
    response = await post(server.client, [*good, {"key": "atomic", "value": "nope"}])
    assert response.status_code == 422
    await post(server.client, {"key": "witness"})  # commits after anything queued before
    assert "atomic" not in stored_counts(server.db)


async def test_array_and_single_object_store_every_event(server: Server) -> None:
    assert (await post(server.client, [{"key": "a", "value": i} for i in range(10)])).json() == {
        "accepted": 10,
        "duplicates": 0,
    }
    assert (await post(server.client, [])).json() == {"accepted": 0, "duplicates": 0}
    assert stored_counts(server.db) == {"a": 10}


async def test_ndjson(server: Server) -> None:
    body = b'{"key": "nd", "value": 1}\n\n{"key": "nd", "value": 2}\r\n{"key": "nd"}'
    response = await server.client.post(
        "/v1/events", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.json() == {"accepted": 3, "duplicates": 0}
    assert stored_counts(server.db) == {"nd": 3}


async def test_ndjson_invalid_event_is_indexed_by_event(server: Server) -> None:
    body = b'{"key": "nd"}\n{"key": "nd", "value": "x"}\n'
    response = await server.client.post(
        "/v1/events", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["index"] == 1


async def test_ndjson_malformed_line_is_named(server: Server) -> None:
    body = b'{"key": "nd"}\n{"key": "nd",\n'
    response = await server.client.post(
        "/v1/events", content=body, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 400
    assert_envelope(response.json(), "malformed_json")
    assert "line 2" in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [b'{"key": "a"', b"[1, 2", b"nope", b'{"key": "a"} x'])
async def test_malformed_json_is_400_saying_where(server: Server, body: bytes) -> None:
    response = await server.client.post(
        "/v1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert_envelope(response.json(), "malformed_json")
    assert "JSON" in response.json()["error"]["message"]


async def test_empty_body_is_400(server: Server) -> None:
    response = await server.client.post(
        "/v1/events", content=b"", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert_envelope(response.json(), "malformed_json")


async def test_a_body_that_is_not_an_event_is_422(server: Server) -> None:
    response = await post(server.client, "just a string")
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] is None


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_other_content_types_are_415(server: Server, content_type: str) -> None:
    response = await server.client.post(
        "/v1/events", content=b'{"key": "a"}', headers={"Content-Type": content_type}
    )
    assert response.status_code == 415
    assert_envelope(response.json(), "unsupported_media_type")


async def test_json_with_charset_is_accepted(server: Server) -> None:
    response = await server.client.post(
        "/v1/events",
        content=b'{"key": "a"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


async def test_body_over_max_body_is_413(start_server: StartServer) -> None:
    server = await start_server(max_body="1KiB")
    big = [{"key": "big", "value": i} for i in range(100)]
    response = await post(server.client, big)
    assert response.status_code == 413
    assert_envelope(response.json(), "payload_too_large")

    async def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(10):
            yield b" " * 200
        yield b'{"key": "big"}'

    response = await server.client.post(
        "/v1/events", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert_envelope(response.json(), "payload_too_large")
    assert "big" not in stored_counts(server.db)


async def test_more_events_than_max_batch_is_413(start_server: StartServer) -> None:
    server = await start_server(max_batch="5")
    response = await post(server.client, [{"key": "many"}] * 6)
    assert response.status_code == 413
    assert "at most 5" in response.json()["error"]["message"]
    assert (await post(server.client, [{"key": "many"}] * 5)).status_code == 200


async def test_max_age_rejects_old_events(start_server: StartServer) -> None:
    server = await start_server(max_age="1d", max_future="5m")
    assert (await post(server.client, {"key": "old", "ts": clock.now() - 3600})).status_code == 200
    response = await post(server.client, {"key": "old", "ts": clock.now() - 2 * 86400})
    assert response.status_code == 422
    assert "too old" in response.json()["error"]["details"][0]["message"]
    response = await post(server.client, {"key": "old", "ts": clock.now() + 600})
    assert "too far in the future" in response.json()["error"]["details"][0]["message"]


@pytest.mark.parametrize("other", [{"key": "ok"}, {"key": "bad", "value": "3"}])
async def test_a_ts_in_epoch_milliseconds_is_named_so(
    server: Server, other: dict[str, Any]
) -> None:
    # beside a valid event (the typed fast path finds it) or an ill-typed one (the untyped path)
    millis = int(NOW) * 1000
    response = await post(server.client, [{"key": "ms", "ts": millis}, other])
    assert response.status_code == 422
    (problem,) = [d for d in response.json()["error"]["details"] if d["index"] == 0]
    assert problem["field"] == "ts"
    assert problem["message"].startswith(f"{millis} looks like epoch milliseconds")
    # an RFC 3339 time that far ahead is no such mistake
    response = await post(server.client, {"key": "ms", "ts": "6000-01-01T00:00:00Z"})
    assert "too far in the future" in response.json()["error"]["details"][0]["message"]


async def test_late_events_update_their_bucket(server: Server) -> None:
    hour = clock.whole_hours_ago(5)
    await post(server.client, {"key": "late", "ts": hour + 10, "value": 1})
    await post(server.client, {"key": "late", "ts": hour + 20, "value": 3})
    response = await server.client.get(
        "/v1/aggregates", params={"key": "late", "from": hour, "to": hour + 3600}
    )
    assert response.json()["results"][0]["buckets"] == [
        {
            "start": response.json()["from"],
            "count": 2,
            "sum": 4.0,
            "min": 1.0,
            "max": 3.0,
            "avg": 2.0,
        }
    ]


async def test_wait_false_answers_202_and_stores(server: Server) -> None:
    response = await post(server.client, [{"key": "ff"}] * 3, wait="false")
    assert response.status_code == 202
    assert response.json() == {"accepted": 3}
    await post(server.client, {"key": "witness"})  # durable: commits after the queued one
    assert stored_counts(server.db)["ff"] == 3


async def test_bad_wait_value_is_an_error(server: Server) -> None:
    response = await post(server.client, {"key": "a"}, wait="maybe")
    assert response.status_code == 400
    assert_envelope(response.json(), "bad_request")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("DELETE", "/v1/events", 405, "method_not_allowed"),
        ("GET", "/v1/aggregates", 422, "invalid_query"),
        ("POST", "/v1/events", 400, "malformed_json"),
    ],
)
async def test_every_error_uses_the_envelope(
    server: Server, method: str, path: str, status: int, code: str
) -> None:
    response = await server.client.request(
        method, path, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert_envelope(response.json(), code)
