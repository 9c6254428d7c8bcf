"""Big answers: encoded in pieces that make the same bytes as one encoding, sent whole,
and the queries holding rows bounded."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx
import msgspec
import trio

from trioagg.answers import PIECE_BYTES, Aggregates, PieceWriter, Series
from trioagg.times import rfc3339

from .conftest import Server, StartServer, metric, post, wait_until

#: 2026-01-01T00:00:00Z: a range in the past whose both ends are given (cacheable).
START = 1_767_225_600
#: Midnight UTC three days ago: events there are neither too old nor in the future.
DAY = (int(time.time()) // 86400 - 3) * 86400


class TooBig(Exception):
    pass


def _bucket(start: int, count: int) -> dict[str, Any]:
    return {"start": rfc3339(start), "count": count, "sum": count * 1.5, "p99": None}


def test_an_answer_in_pieces_is_the_answer_encoded_at_once() -> None:
    chance = random.Random(19)
    series = [
        Series(
            f"k{number}",
            {"region": "eu"} if number % 3 else {},
            [_bucket(START + 60 * i, i) for i in range(chance.choice([0, 1, 2, 999, 4000]))],
        )
        for number in range(30)
    ]
    document = Aggregates(rfc3339(START), rfc3339(START + 86400), "bucket", "UTC", series)
    whole = msgspec.json.encode(document)
    for limit, fits in ((len(whole), True), (len(whole) - 1, False)):
        writer = PieceWriter(limit, TooBig)
        try:
            writer.begin(Aggregates(document.start, document.end, "bucket", "UTC", []))
            for one in series:
                writer.series(Series(one.key, one.tags, []))
                at = 0
                while at < len(one.buckets):
                    size = chance.randrange(0, 1500)  # empty blocks too
                    writer.buckets(one.buckets[at : at + size])
                    at += size
            pieces = writer.end()
        except TooBig:
            assert not fits
            continue
        assert fits and pieces.joined() == whole and pieces.size == len(whole)
        assert len(pieces.chunks) > 1
        assert all(PIECE_BYTES <= len(chunk) < 2 * PIECE_BYTES for chunk in pieces.chunks[:-1])


def test_an_answer_without_series_is_the_empty_document() -> None:
    header = Aggregates(rfc3339(START), rfc3339(START + 3600), "hour", "UTC", [])
    writer = PieceWriter(1000, TooBig)
    writer.begin(header)
    assert writer.end().joined() == msgspec.json.encode(header)


def _zeros(keys: int, hours: int) -> dict[str, Any]:
    """Empty buckets, filled: a big answer that needs no data stored."""
    return {
        "key": [f"empty{i}" for i in range(keys)],
        "fill": "zero",
        "from": START,
        "to": START + hours * 3600,
    }


async def test_a_big_answer_is_sent_whole_and_a_middling_one_is_still_cached(
    server: Server,
) -> None:
    big = await server.client.get("/v1/aggregates", params=_zeros(100, 1000))
    assert big.status_code == 200
    assert int(big.headers["Content-Length"]) == len(big.content) > 4 * PIECE_BYTES
    results = big.json()["results"]
    assert [len(result["buckets"]) for result in results] == [1000] * 100
    last = {"start": rfc3339(START + 999 * 3600), "count": 0, "sum": 0, "min": 0, "max": 0}
    assert results[99]["buckets"][999] == {**last, "avg": 0}
    # In pieces, but within the read cache's largest entry (an eighth of 16 MiB): kept.
    middling = [await server.client.get("/v1/aggregates", params=_zeros(10, 1000))]
    middling.append(await server.client.get("/v1/aggregates", params=_zeros(10, 1000)))
    assert middling[0].content == middling[1].content
    assert PIECE_BYTES < len(middling[0].content) < 2 * 1024 * 1024
    assert await metric(server, "trioagg_read_cache_total", result="hit") == 1
    assert (await server.client.get("/v1/aggregates", params=_zeros(100, 1000))).is_success
    assert await metric(server, "trioagg_read_cache_total", result="hit") == 1  # never kept


async def test_at_most_readers_plus_two_queries_hold_rows(start_server: StartServer) -> None:
    """Queries waiting for a thread to build their answer held the rows they had read
    (up to 250,000 each, hundreds of MB with sketches): as many queries as came. Now the
    rest wait before reading."""
    server = await start_server(bucket="1m", readers="1")
    events = [{"key": "k", "ts": DAY + 60 * minute} for minute in range(2500)]
    assert (await post(server.client, events)).status_code == 200
    service = server.app.service
    threads = [object(), object()]  # every thread that builds big answers, taken
    for holder in threads:
        await service.answering.acquire_on_behalf_of(holder)
    span = {"key": "k", "granularity": "bucket", "from": DAY, "to": DAY + 2500 * 60}
    answers: list[httpx.Response] = []

    async def ask() -> None:
        answers.append(await server.client.get("/v1/aggregates", params=span))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
        building, holding = service.answering.statistics, service.querying.statistics
        await wait_until(lambda: building().tasks_waiting == 3 and holding().tasks_waiting == 2)
        assert holding().borrowed_tokens == 3  # --readers 1, and 2
        for holder in threads:
            service.answering.release_on_behalf_of(holder)
    assert [answer.status_code for answer in answers] == [200] * 5
    assert len({answer.content for answer in answers}) == 1
