"""Decoding: the contract's validation table, row by row, and the error each row is
answered with (tests/test_ingest_http.py sends one of each kind over HTTP); bodies that
are not JSON are a MalformedBody (400), never a crash; values beyond MAX_ABS_VALUE are
invalid; large bodies are decoded off the event loop; a tenant's stamped tag never makes
a series of more than MAX_TAGS tags, nor of tags over TAGS_BYTES."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio

from trioagg.core.errors import Forbidden, InvalidEvents, MalformedBody, RequestError
from trioagg.core.events import MAX_ABS_VALUE, MAX_TAGS, TAGS_BYTES
from trioagg.core.settings import Settings
from trioagg.ingest.decode import (
    INLINE_DECODE_BYTES,
    KnownNames,
    Limits,
    decode_body,
    decode_events,
    tag_value_problem,
)

from .conftest import ascii_characters, assert_envelope, tags_of_json_bytes

#: The limits of a server with the default settings.
LIMITS = Limits(Settings().max_batch, Settings().max_future, Settings().max_age)
#: The receive time: fixed, and after every ts of the tables of valid events.
NOW = 1_800_000_000.0
DEEP = 100_000  # far beyond the recursion limit, far below the default max_body

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


def refusal(body: bytes, *, ndjson: bool = False) -> RequestError:
    """The error decoding ``body`` raises, and so the answer the server gives it."""
    with pytest.raises(RequestError) as caught:
        decode_events(body, ndjson=ndjson, limits=LIMITS, now=NOW)
    return caught.value


@pytest.mark.parametrize(("event", "field"), INVALID_EVENTS)
def test_each_invalid_event_is_refused_naming_its_field(
    event: dict[str, Any] | str, field: str | None
) -> None:
    raw = event if isinstance(event, str) else json.dumps(event)
    error = refusal(f'[{{"key": "fine"}}, {raw}]'.encode())
    answer = json.loads(error.body())
    if field is None:
        assert isinstance(error, MalformedBody) and error.status == 400
        assert_envelope(answer, "malformed_json")
        return
    assert isinstance(error, InvalidEvents) and error.status == 422
    assert_envelope(answer, "invalid_events")
    assert {"index": 1, "field": field} in [
        {"index": d["index"], "field": d["field"]} for d in answer["error"]["details"]
    ]
    assert all(d["index"] == 1 for d in answer["error"]["details"])


@pytest.mark.parametrize("ndjson", [False, True])
def test_names_are_checked_against_their_patterns_even_once_others_are_known(
    ndjson: bool,
) -> None:
    # The fast path checks each distinct key and tag name once: names it knows are
    # taken, a new one that breaks its pattern still refuses its event, and only it.
    good = [{"key": "known.key", "tags": {"region": "eu"}}] * 3
    for bad, field in (({"key": "bad\u0085"}, "key"), ({"key": "k", "tags": {"9x": "v"}}, "tags")):
        for attempt in range(2):  # a refused name is not remembered
            events = [*good, bad, *good]
            body = (
                b"".join(json.dumps(e).encode() + b"\n" for e in events)
                if ndjson
                else json.dumps(events).encode()
            )
            error = refusal(body, ndjson=ndjson)
            assert isinstance(error, InvalidEvents), attempt
            details = json.loads(error.body())["error"]["details"]
            assert [(d["index"], d["field"]) for d in details] == [(3, field)]
    body = json.dumps(good).encode()
    assert len(decode_events(body, ndjson=False, limits=LIMITS, now=NOW)) == 3


def test_known_names_are_bounded_and_only_hold_names_that_match() -> None:
    known = KnownNames(limit=3)
    assert known.match("k1", {"a": "v", "b": "v"})
    assert not known.match("bad\n", {}) and not known.match("k2", {"1st": "v"})
    assert known.keys == {"k1", "k2"} and known.tag_names == {"a", "b"}
    assert known.match("k3", {"c": "v"}) and known.match("k4", {"d": "v"})
    assert known.keys == {"k4"} and known.tag_names == {"d"}  # full: forgotten, refilled
    assert not known.match("nul\u0000", {})
    assert known.match("k1", {"a": "v"}) and known.keys == {"k4", "k1"}


@pytest.mark.parametrize("event", VALID_EVENTS)
def test_each_valid_event_is_accepted(event: dict[str, Any]) -> None:
    [point] = decode_events(json.dumps(event).encode(), ndjson=False, limits=LIMITS, now=NOW)
    assert point[0] == event["key"]


@pytest.mark.parametrize("body", [b'{"key": "a"', b"[1, 2", b"nope", b'{"key": "a"} x'])
def test_malformed_json_is_400_saying_where(body: bytes) -> None:
    error = refusal(body)
    assert isinstance(error, MalformedBody) and error.status == 400
    assert_envelope(json.loads(error.body()), "malformed_json")
    assert "JSON" in error.message


@pytest.mark.parametrize("other", [{"key": "ok"}, {"key": "bad", "value": "3"}])
def test_a_ts_in_epoch_milliseconds_is_named_so(other: dict[str, Any]) -> None:
    # beside a valid event (the typed fast path finds it) or an ill-typed one (the untyped path)
    millis = int(NOW) * 1000
    error = refusal(json.dumps([{"key": "ms", "ts": millis}, other]).encode())
    assert isinstance(error, InvalidEvents) and error.status == 422
    (problem,) = [d for d in error.details if d["index"] == 0]
    assert problem["field"] == "ts"
    assert problem["message"].startswith(f"{millis} looks like epoch milliseconds")
    # an RFC 3339 time that far ahead is no such mistake
    error = refusal(b'{"key": "ms", "ts": "6000-01-01T00:00:00Z"}')
    assert "too far in the future" in error.details[0]["message"]


@pytest.mark.parametrize(
    ("body", "ndjson"),
    [
        (b"[" * DEEP + b"]" * DEEP, False),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, False),
        (b'{"key": "k", "tags": ' + b"[" * DEEP + b"]" * DEEP + b"}", False),
        (b'{"key": "k"}\n' + b"[" * DEEP + b"]" * DEEP, True),
    ],
)
def test_deep_nesting_is_malformed(body: bytes, ndjson: bool) -> None:
    with pytest.raises(MalformedBody, match="too deeply"):
        decode_events(body, ndjson=ndjson, limits=LIMITS, now=NOW)


@pytest.mark.parametrize(
    ("body", "ndjson"),
    [
        (b'{"key": "a\xff"}', False),
        (b'[{"key": "a"}, {"key": "\xe9t\xe9"}]', False),  # latin-1, not UTF-8
        (b'{"key": "a"}\n{"key": "\xc3"}\n', True),
    ],
)
def test_invalid_utf8_is_malformed(body: bytes, ndjson: bool) -> None:
    with pytest.raises(MalformedBody, match="UTF-8"):
        decode_events(body, ndjson=ndjson, limits=LIMITS, now=NOW)


@pytest.mark.parametrize("value", ["-1e308", "1e101", "-100000000000000000000" + "0" * 90])
def test_values_beyond_max_abs_value_name_the_limit(value: str) -> None:
    body = b'{"key": "k", "value": %s}' % value.encode()
    with pytest.raises(InvalidEvents) as caught:
        decode_events(body, ndjson=False, limits=LIMITS, now=NOW)
    (problem,) = caught.value.details
    assert problem["field"] == "value" and "1e100" in problem["message"]


def test_max_abs_value_itself_is_accepted() -> None:
    body = b'[{"key": "k", "value": 1e100}, {"key": "k", "value": -1e100}]'
    points = decode_events(body, ndjson=False, limits=LIMITS, now=NOW)
    assert [point[2] for point in points] == [MAX_ABS_VALUE, -MAX_ABS_VALUE]


async def test_large_bodies_are_decoded_off_the_event_loop() -> None:
    """While a large body is decoded (here: the slow path of an invalid one), other
    tasks keep running; decoded inline, they could not run until it was done."""
    body = json.dumps([{"key": "big", "value": "x"}] * 10_000).encode()
    assert len(body) > INLINE_DECODE_BYTES
    turns = 0
    done = False

    async def other_task() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        with pytest.raises(InvalidEvents):
            await decode_body(body, ndjson=False, limits=LIMITS, now=NOW)
        done = True
    assert turns > 0


@pytest.mark.parametrize(
    ("event_id", "ok"),
    [
        ("0190f4c5-8d2e-7b3a-9c1d-2e4f6a8b0c1d", True),  # a UUIDv7: 36 characters
        ("i" * 128, True),
        ("i" * 129, False),
        ("\U0001f600" * 32, True),  # 128 bytes in 32 characters
        ("\U0001f600" * 33, False),  # 132 bytes in 33 characters
        ("é" * 64, True),  # 128 bytes
        ("é" * 64 + "a", False),  # 129 bytes in 65 characters
    ],
)
def test_ids_are_limited_in_utf8_bytes_whatever_their_length_in_characters(
    event_id: str, ok: bool
) -> None:
    body = json.dumps({"key": "k", "id": event_id}).encode()
    if ok:
        [point] = decode_events(body, ndjson=False, limits=LIMITS, now=NOW)
        assert point[5] == event_id
        return
    with pytest.raises(InvalidEvents) as caught:
        decode_events(body, ndjson=False, limits=LIMITS, now=NOW)
    assert caught.value.details[0]["field"] == "id"
    assert "1-128 bytes" in caught.value.details[0]["message"]


def _tags(count: int, **more: str) -> dict[str, str]:
    return {**{f"t{n}": "v" for n in range(count)}, **more}


@pytest.mark.parametrize("large", [False, True])
async def test_a_tenants_events_carry_at_most_one_tag_less_of_their_own(large: bool) -> None:
    """The stamped tenant tag counts: no series ever has more than MAX_TAGS tags."""
    events = [
        {"key": "k", "tags": _tags(MAX_TAGS - 1)},  # stamped: MAX_TAGS tags
        {"key": "k", "tags": _tags(MAX_TAGS - 1, tenant="acme")},  # names its own tenant
        {"key": "k", "tags": _tags(MAX_TAGS)},
        {"key": "k"},
        {"key": "k", "tags": _tags(MAX_TAGS)},
    ]
    padding = [{"key": "k" * 200}] * (INLINE_DECODE_BYTES // 200 if large else 0)
    body = json.dumps([*events, *padding]).encode()
    assert (len(body) > INLINE_DECODE_BYTES) is large  # and so decoded in a worker thread
    without_tenant = await decode_body(body, ndjson=False, limits=LIMITS, now=NOW)
    assert max(len(json.loads(point[3])) for point in without_tenant) == MAX_TAGS
    with pytest.raises(InvalidEvents) as caught:
        await decode_body(body, ndjson=False, limits=LIMITS, now=NOW, tenant="acme")
    assert [(p["index"], p["field"]) for p in caught.value.details] == [(2, "tags"), (4, "tags")]
    message = caught.value.details[0]["message"]
    assert "at most 15 tags besides tenant" in message and "tenant=acme" in message
    assert "at most 16 tags (it has 16)" in message
    assert caught.value.event_count == len(events) + len(padding)

    fitting = json.dumps(events[:2]).encode()
    stamped = decode_events(fitting, ndjson=False, limits=LIMITS, now=NOW, tenant="acme")
    assert [len(json.loads(point[3])) for point in stamped] == [MAX_TAGS, MAX_TAGS]
    # Another tenant's name is still refused as such (403), whatever else is wrong.
    other = json.dumps([events[2], {"key": "k", "tags": {"tenant": "globex"}}]).encode()
    with pytest.raises(Forbidden):
        decode_events(other, ndjson=False, limits=LIMITS, now=NOW, tenant="acme")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("acme", None),
        ("x" * 255, None),
        ("\U0001f600" * 63 + "abc", None),  # 255 bytes
        ("", "length >= 1"),
        ("x" * 256, "length <= 255"),
        ("\u00e9" * 128, "it has 256 bytes, over 255"),
    ],
)
def test_tag_values_are_checked_by_one_function(value: str, problem: str | None) -> None:
    """What --tenant is checked with is what an event's tag values are checked with."""
    found = tag_value_problem(value)
    assert found is None if problem is None else found is not None and problem in found
    body = json.dumps({"key": "k", "tags": {"tenant": value}}).encode()
    if problem is None:
        decode_events(body, ndjson=False, limits=LIMITS, now=NOW)
    else:
        with pytest.raises(InvalidEvents):
            decode_events(body, ndjson=False, limits=LIMITS, now=NOW)


def two_byte_characters(size: int) -> str:
    return "\u00e9" * (size // 2) + "y" * (size % 2)


@pytest.mark.parametrize("make", [ascii_characters, two_byte_characters])
@pytest.mark.parametrize(("size", "ok"), [(TAGS_BYTES, True), (TAGS_BYTES + 1, False)])
def test_tags_are_limited_in_bytes_together(
    make: Callable[[int], str], size: int, ok: bool
) -> None:
    tags = tags_of_json_bytes(size, make)
    assert len(json.dumps(tags, separators=(",", ":"), ensure_ascii=False).encode()) == size
    body = json.dumps({"key": "k", "tags": tags}).encode()
    if ok:
        [point] = decode_events(body, ndjson=False, limits=LIMITS, now=NOW)
        assert len(point[3].encode()) == size
        return
    # Alone (the fast path), and beside an event with a wrong type (the slow path).
    for events in ([{"key": "k", "tags": tags}], [{"key": "k", "tags": tags}, {"key": 5}]):
        with pytest.raises(InvalidEvents) as caught:
            decode_events(json.dumps(events).encode(), ndjson=False, limits=LIMITS, now=NOW)
        problem = caught.value.details[0]
        assert (problem["index"], problem["field"]) == (0, "tags")
        assert f"they have {size} bytes as JSON, over {TAGS_BYTES}" in problem["message"]


def test_a_tenants_stamped_tag_counts_in_the_tags_bytes() -> None:
    tenant = "acme"
    stamp = len(f',"tenant":"{tenant}"')
    fits = tags_of_json_bytes(TAGS_BYTES - stamp)
    over = tags_of_json_bytes(TAGS_BYTES - stamp + 1)
    body = json.dumps([{"key": "k", "tags": fits}, {"key": "k", "tags": over}]).encode()
    assert len(decode_events(body, ndjson=False, limits=LIMITS, now=NOW)) == 2
    with pytest.raises(InvalidEvents) as caught:
        decode_events(body, ndjson=False, limits=LIMITS, now=NOW, tenant=tenant)
    assert [(p["index"], p["field"]) for p in caught.value.details] == [(1, "tags")]
    assert "with tenant=acme stamped" in caught.value.details[0]["message"]
    assert f"{TAGS_BYTES + 1} bytes as JSON" in caught.value.details[0]["message"]
