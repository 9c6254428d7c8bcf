"""Big answers: encoded in pieces that make the same bytes as one encoding and sent
whole; at most so many queries holding rows; the memory given back once they are
answered (a real server process, its RSS)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil
import pytest
import trio

from trioagg.core.answers import PIECE_BYTES, Aggregates, PieceWriter, Series
from trioagg.core.times import rfc3339
from trioagg.service import memory

from . import clock
from .conftest import Server, StartServer, metric, post, wait_until

#: 2026-01-01T00:00:00Z: a range in the past whose both ends are given (cacheable).
START = 1_767_225_600
#: Midnight UTC three days ago: events there are neither too old nor in the future.
DAY = clock.whole_days_ago(3)


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


@pytest.mark.slow
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
    span: dict[str, Any] = {"key": "k", "granularity": "bucket", "from": DAY, "to": DAY + 2500 * 60}
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


#: Sixteen stats, percentiles included (the server keeps quantiles for every key).
SIXTEEN = "count,sum,min,max,avg,stddev,distinct,p1,p5,p10,p25,p50,p75,p90,p99,p99.9"


def _big_query(kind: str) -> dict[str, Any]:
    """``answers``: 100 keys x 1,000 empty buckets, filled: 100,000 buckets, ~16 MB of
    JSON, nothing read. ``rows``: 10,000 rows with quantile sketches (~20 MB of them in
    memory), answered as 10,000 buckets (~2 MB)."""
    keys = 100 if kind == "answers" else 10
    return {
        "key": [f"{kind}{i}" for i in range(keys)],
        "granularity": "bucket",
        "fill": "zero" if kind == "answers" else "none",
        "stats": SIXTEEN,
        "from": DAY,
        "to": DAY + 1000 * 60,
    }


def _peak_rss(process: psutil.Process) -> int:
    """The highest RSS of ``process`` since :func:`_reset_peak_rss` (Linux's VmHWM)."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None, status
    return int(found[1]) * 1024


def _reset_peak_rss(process: psutil.Process) -> None:
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")


@pytest.mark.skipif(
    not (memory.AVAILABLE and Path("/proc/self/clear_refs").exists()),
    reason="memory is given back only with glibc's malloc_trim; peak RSS read from Linux",
)
@pytest.mark.parametrize("kind", ["answers", "rows"])
async def test_memory_is_given_back_after_big_answers(server_process: Any, kind: str) -> None:
    """A server answers 4 big queries one by one: afterwards its RSS is less than half-way
    from idle to the peak it reached. It stayed 70-90% of the way for answers (each held
    as ~50 MB of objects, then as one string, in heaps that kept what was freed), and at
    the peak for rows with sketches (C++ objects in the read threads' heaps, and garbage
    cycles other tasks made meanwhile, each keeping an arena of CPython's). Now ~10% and
    ~37% (CPython's arenas that a few live objects keep)."""
    flags = ("--bucket", "1m", "--quantiles", "*")
    if kind == "rows":  # stored by a server of its own: its memory is not measured
        seeder = server_process(*flags).start()
        events = [
            {"key": f"rows{i}", "ts": DAY + 60 * minute, "value": minute % 97}
            for i in range(10)
            for minute in range(1000)
        ]
        assert httpx.post(f"{seeder.url}/v1/events", json=events, timeout=60).status_code == 200
        assert seeder.stop() == 0
    server = server_process(*flags).start()
    process = psutil.Process(server.proc.pid)
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        warm = await client.get("/v1/aggregates", params={"key": "k", "from": 0, "to": 3600})
        assert warm.status_code == 200
        idle = process.memory_info().rss
        _reset_peak_rss(process)
        for _ in range(4):
            response = await client.get("/v1/aggregates", params=_big_query(kind))
            assert response.status_code == 200, response.text[:500]
    peak, after = _peak_rss(process), process.memory_info().rss
    assert after - idle < (peak - idle) / 2, (
        f"{(after - idle) >> 20} MB above idle, of {(peak - idle) >> 20} MB at the peak"
    )
