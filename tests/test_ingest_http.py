"""The ingest contract over real HTTP: each class of error in its envelope, atomicity,
limits. The contract's validation table runs against the decoder itself
(tests/test_ingest_decode.py); here one request of each kind keeps the wiring honest."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from . import clock
from .conftest import Server, StartServer, assert_envelope, post, stored_counts
from .test_ingest_decode import VALID_EVENTS


async def test_the_valid_events_are_accepted_and_stored(server: Server) -> None:
    """Every event of the table of valid ones, in one request (stored whole or not at
    all), on each store: its longest keys, tags and ids fit the store's indexes too."""
    response = await post(server.client, VALID_EVENTS)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": len(VALID_EVENTS), "duplicates": 0}
    assert stored_counts(server.db) == Counter(event["key"] for event in VALID_EVENTS)


async def test_every_problem_of_every_event_is_listed(server: Server) -> None:
    """The validation table's wiring (the table runs against the decoder): a request
    with invalid events is a 422 in the envelope, naming each event and field."""
    response = await post(
        server.client,
        [
            {"key": "ok"},
            {"key": "", "value": "x", "extra": 1},
            {"key": "ok"},
            {"value": True, "ts": clock.now() + 86400},
        ],
    )
    assert response.status_code == 422
    assert_envelope(response.json(), "invalid_events")
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


async def test_malformed_json_is_400_saying_where(server: Server) -> None:
    """The wiring of the decoder's table of malformed bodies."""
    response = await server.client.post(
        "/v1/events", content=b'{"key": "a"', headers={"Content-Type": "application/json"}
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


async def test_other_content_types_are_415(server: Server) -> None:
    """The wiring of body_format's table (tests/test_http_edges.py)."""
    response = await server.client.post(
        "/v1/events", content=b'{"key": "a"}', headers={"Content-Type": "text/plain"}
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

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
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
