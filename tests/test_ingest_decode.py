"""Decoding: bodies that are not JSON are a MalformedBody (400), never a crash; values
beyond MAX_ABS_VALUE are invalid; large bodies are decoded off the event loop; a
tenant's stamped tag never makes a series of more than MAX_TAGS tags, nor of tags over
TAGS_BYTES."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import trio

from trioagg.errors import Forbidden, InvalidEvents, MalformedBody
from trioagg.ingest import (
    INLINE_DECODE_BYTES,
    MAX_ABS_VALUE,
    MAX_TAGS,
    TAGS_BYTES,
    Limits,
    decode_body,
    decode_events,
    tag_value_problem,
)

from .conftest import ascii_characters, tags_of_json_bytes

LIMITS = Limits(max_batch=10_000, max_future=3600, max_age=None)
NOW = 1_764_000_000.0
DEEP = 100_000  # far beyond the recursion limit, far below the default max_body


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
