"""The read cache: its bounds and invalidation directly, and its exactness on real servers."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import SHARDED, StartServer, post
from tests.test_auth import bearer, make_key
from trioagg.core.rollup import Rollup
from trioagg.query.readcache import CachedAnswer, ReadCache, entry_cost, watch_store
from trioagg.store import Store
from trioagg.store.head import key_sizes
from trioagg.store.plan import Flushed, WritePolicy
from trioagg.store.sqlite import DatabaseFileGone, SQLiteBackend


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache(
    entries: int = 10, max_bytes: int = 1 << 20, ttl: float = 5.0
) -> tuple[ReadCache, Clock]:
    clock = Clock()
    return ReadCache(entries=entries, max_bytes=max_bytes, ttl=ttl, clock=clock), clock


HOUR = 3600


def _fill(
    cache: ReadCache, name: Any, keys: tuple[str, ...], body: bytes, hours: range = range(24)
) -> None:
    with cache.reading(keys, hours.start * HOUR, hours.stop * HOUR) as keep:
        keep(name, body, len(body))


def _touched(*keys: str, hours: range = range(24)) -> dict[str, tuple[int, int]]:
    """What a commit of events of ``keys`` in the first to the last of ``hours`` touched."""
    return {key: (hours[0] * HOUR, hours[-1] * HOUR) for key in keys}


def test_answers_are_kept_until_a_commit_touches_their_keys() -> None:
    cache, _ = _cache()
    _fill(cache, "q-a", ("a",), b"A")
    _fill(cache, "q-ab", ("a", "b"), b"AB")
    _fill(cache, "q-c", ("c",), b"C")
    assert (cache.get("q-a"), cache.get("q-ab"), cache.get("q-c")) == (b"A", b"AB", b"C")
    cache.committed(_touched("b", "x"), 0, 1)
    assert (cache.get("q-a"), cache.get("q-ab"), cache.get("q-c")) == (b"A", None, b"C")
    cache.committed(_touched("x", "a"), 0, 2)
    assert (cache.get("q-a"), cache.get("q-c")) == (None, b"C")
    assert len(cache) == 1 and cache.bytes == entry_cost(("c",), 1)


def test_a_commit_of_every_key_of_a_multi_key_answer_drops_it() -> None:
    """Dropping the answer through its first key emptied the index of its second one,
    which the commit then looked up: KeyError, and the writer died (issue 19)."""
    cache, _ = _cache()
    _fill(cache, "q-ab", ("a", "b"), b"AB")
    _fill(cache, "q-abc", ("a", "b", "c"), b"ABC")
    _fill(cache, "q-c", ("c",), b"C")
    cache.committed(_touched("a", "b"), 0, 1)
    assert (cache.get("q-ab"), cache.get("q-abc"), cache.get("q-c")) == (None, None, b"C")
    assert cache._by_key == {"c": {"q-c"}}
    assert cache.bytes == entry_cost(("c",), 1)


def test_an_invalidation_that_fails_leaves_the_cache_empty() -> None:
    """What cannot be invalidated for sure is dropped: a failure inside a commit's
    invalidation raises (the writer reports it) and serves nothing stale after it."""

    class Broken(Exception):
        pass

    cache, clock = _cache()
    _fill(cache, "q-a", ("a",), b"A")
    _fill(cache, "q-b", ("b",), b"B")

    def failing_clock() -> float:
        raise Broken

    cache.clock = failing_clock
    with pytest.raises(Broken):
        cache.committed(_touched("a"), 0, 1)
    cache.clock = clock
    assert (len(cache), cache.bytes, cache._by_key) == (0, 0, {})
    assert cache.get("q-b") is None


def test_a_read_that_raced_a_commit_of_its_keys_is_not_kept() -> None:
    cache, _ = _cache()
    with cache.reading(("a",), 0, HOUR) as keep_a, cache.reading(("b",), 0, HOUR) as keep_b:
        cache.committed(_touched("a", hours=range(5, 6)), 0, 1)  # while both reads were under way
        with cache.reading(("a",), 0, HOUR) as keep_later:  # began after that commit
            keep_later("q-a2", b"A2", 2)
        keep_a("q-a", b"A", 1)
        keep_b("q-b", b"B", 1)
    assert (cache.get("q-a"), cache.get("q-b"), cache.get("q-a2")) == (None, b"B", b"A2")


def _rollup(value: float) -> Rollup:
    return Rollup(0, 1, value, value * value, value, value)


def _answer(key: str, *hours: int, generation: int = 0) -> CachedAnswer:
    """A cached answer over ``key`` read when the head of writer 0 was at
    ``generation``, its table rows in ``hours``."""
    stored = [(key, hour * HOUR, "{}", _rollup(1)) for hour in hours]
    return CachedAnswer(stored, (generation,), (7,), b"answer")


def _flushed(**rows: dict[tuple[int, str], Rollup]) -> Flushed:
    """What a flush wrote: ``rows`` of each key."""
    return Flushed(rows, key_sizes(rows))


def _keep(cache: ReadCache, name: str, answer: CachedAnswer, keys: tuple[str, ...]) -> None:
    with cache.reading(keys, 0, 24 * HOUR) as keep:
        keep(name, answer, answer.size)


def test_an_answer_takes_in_a_flush_of_its_keys_instead_of_being_dropped() -> None:
    """What the flush wrote of the answer's keys joins its table rows (a reference per
    key, merged at its next use, within its range); the answer it kept is no longer
    its answer; the bytes it is counted for follow."""
    cache, _ = _cache()
    answer = _answer("a", 1, 2)
    _keep(cache, "q-a", answer, ("a",))
    flushed = _flushed(a={(2 * HOUR, "{}"): _rollup(5), (30 * HOUR, "{}"): _rollup(9)})
    cache.committed(_touched("a", hours=range(2, 31)), 0, 1, flushed)
    assert cache.get("q-a") is answer and cache.holds("q-a", answer)
    assert (answer.generations, answer.versions, answer.body) == ((1,), (), b"")
    rows = answer.stored_now(0, 24 * HOUR)
    assert [(bucket // HOUR, rollup.s1) for _, bucket, _, rollup in rows] == [
        (1, 1),
        (2, 1),
        (2, 5),
    ]
    assert cache.bytes == entry_cost(("a",), answer.size)
    assert answer.size == _answer("a", 1, 2).size - len(b"answer") + flushed.sizes["a"]


def test_an_answer_over_several_keys_takes_in_the_flush_of_each() -> None:
    cache, _ = _cache()
    answer = _answer("a", 1)
    _keep(cache, "q-ab", answer, ("a", "b"))
    flushed = _flushed(a={(HOUR, "{}"): _rollup(2)}, b={(HOUR, "{}"): _rollup(3)})
    cache.committed(_touched("a", "b"), 0, 1, flushed)
    assert cache.get("q-ab") is answer
    taken = sorted((key, rollup.s1) for key, _, _, rollup in answer.stored_now(0, 24 * HOUR))
    assert taken == [("a", 1), ("a", 2), ("b", 3)]


def test_a_flushed_row_of_another_tenant_is_not_taken() -> None:
    answer = CachedAnswer([], (0,), (), tenant="acme")
    answer.took_flush(
        0,
        1,
        "a",
        {
            (0, '{"tenant":"acme"}'): _rollup(1),
            (0, '{"tenant":"acme2"}'): _rollup(2),
            (0, '{"x":"1","tenant":"acme"}'): _rollup(3),
        },
        3 * 400,
    )
    assert sorted(rollup.s1 for *_, rollup in answer.stored_now(0, HOUR)) == [1, 3]


def test_an_answer_that_cannot_take_a_flush_in_is_dropped() -> None:
    """Kept: one read after the flush committed (its rows hold it already) and one the
    flush did not touch. Dropped: one that missed a flush before (its rows cannot be
    made whole), one whose value is not a CachedAnswer, and every one when the flush
    cannot say what it wrote (rows set aside, tiers)."""
    cache, _ = _cache()
    cache.committed(_touched("x"), 0, 1, _flushed(x={(HOUR, "{}"): _rollup(1)}))
    after = _answer("a", 1, generation=2)
    missed = _answer("a", 1, generation=0)
    elsewhere = _answer("b", 1, generation=1)
    _keep(cache, "q-after", after, ("a",))
    _keep(cache, "q-missed", missed, ("a",))
    _keep(cache, "q-b", elsewhere, ("b",))
    _fill(cache, "q-bytes", ("a",), b"A")
    cache.committed(_touched("a"), 0, 2, _flushed(a={(HOUR, "{}"): _rollup(1)}))
    assert cache.get("q-after") is after and after.flushed == [] and after.body == b"answer"
    assert cache.get("q-b") is elsewhere
    assert cache.get("q-missed") is None and cache.get("q-bytes") is None
    cache.committed(_touched("a", "b"), 0, 3, None)
    assert len(cache) == 0 and cache.bytes == 0


def test_a_generation_the_cache_was_not_told_of_empties_it() -> None:
    """Found by review: a flush whose COMMIT was uncertain and did commit, or a head
    rebuilt from its journal, moves the head's generation on without telling the cache.
    The next flush told (of other keys) must not make an answer read before the untold
    one current: it lacks the rows that one wrote, and the head no longer holds them."""
    cache, _ = _cache()
    stale = _answer("a", 1, generation=0)
    _keep(cache, "q-a", stale, ("a",))
    assert not cache.current(stale.generations, (1,))  # generation 1: never told
    cache.committed(_touched("b"), 0, 2, _flushed(b={(HOUR, "{}"): _rollup(1)}))
    assert cache.get("q-a") is None and len(cache) == 0


def test_taking_a_flush_in_never_makes_an_entry_bigger_than_an_eighth() -> None:
    """Found by review: an entry that took flushes in was kept past the eighth of the
    bytes one answer may hold, and pushed the other answers out."""
    cache, _ = _cache(entries=100, max_bytes=200_000)
    for i in range(5):
        _keep(cache, f"q-{i}", _answer(f"k{i}", 1), (f"k{i}",))
    _keep(cache, "q-a", _answer("a", 1), ("a",))
    rows = {(HOUR, f'{{"n":"{n}"}}'): _rollup(1) for n in range(100)}  # 40 KB as sized
    cache.committed(_touched("a"), 0, 1, _flushed(a=rows))
    assert cache.get("q-a") is None
    assert all(cache.get(f"q-{i}") is not None for i in range(5))
    assert cache.bytes == sum(entry_cost((f"k{i}",), _answer(f"k{i}", 1).size) for i in range(5))


@pytest.mark.parametrize(
    ("committed", "dropped"),
    [
        (range(0, 1), False),  # the hour before the answer's range
        (range(1, 2), True),  # its first hour
        (range(2, 3), True),  # inside
        (range(3, 4), True),  # its last hour
        (range(4, 5), False),  # the hour its range ends at: not in it
        (range(0, 5), True),  # a span around it
        (range(9, 30), False),  # later hours
    ],
)
def test_a_commit_drops_the_answers_whose_range_meets_its_buckets(
    committed: range, dropped: bool
) -> None:
    """An answer over hours [1, 4) of "a" against a commit of events of "a" from the first
    to the last of ``committed``: an answer over yesterday survives today's events."""
    cache, _ = _cache()
    _fill(cache, "q-a", ("a", "b"), b"A", hours=range(1, 4))
    cache.committed(_touched("a", hours=committed), 0, 1)
    assert (cache.get("q-a") is None) is dropped
    assert (len(cache), bool(cache._by_key)) == (0, False) if dropped else (1, True)


def test_a_commit_drops_the_expired_answers_of_its_keys_whatever_their_range() -> None:
    """Answers over past ranges outlive the commits of their keys: expired ones go at the
    next commit, so the answers a commit walks stay those of one ttl."""
    cache, clock = _cache(ttl=2.0)
    _fill(cache, "old", ("a",), b"A", hours=range(0, 1))
    clock.now = 1.0
    _fill(cache, "young", ("a",), b"A", hours=range(0, 1))
    clock.now = 2.5
    cache.committed(_touched("a", hours=range(10, 11)), 0, 1)
    assert (len(cache), cache.get("young")) == (1, b"A")


def test_answers_expire_after_the_ttl() -> None:
    cache, clock = _cache(ttl=2.0)
    _fill(cache, "q", ("a",), b"A")
    clock.now = 1.9
    assert cache.get("q") == b"A"
    clock.now = 2.0
    assert cache.get("q") is None and len(cache) == 0 and cache.bytes == 0


def test_an_answer_past_the_ttl_is_served_while_the_store_took_no_commit() -> None:
    """Served past the ttl only if it was read after the last change seen and the store
    was last seen unchanged less than a ttl ago: stale by at most the ttl either way."""
    cache, clock = _cache(ttl=2.0)
    _fill(cache, "before", ("a",), b"A")  # read before the first look: never vouched for
    clock.now = 0.5
    cache.store_checked(0.5, changed=True)  # the first look cannot tell
    clock.now = 1.0
    _fill(cache, "q", ("a",), b"Q")
    clock.now = 1.5
    cache.store_checked(1.5, changed=False)
    clock.now = 3.4  # 2.4 s old, looked at 1.9 s ago
    assert (cache.get("q"), cache.get("before")) == (b"Q", None)
    clock.now = 3.5  # no look for a ttl: the store may have changed since
    assert cache.get("q") is None


def test_a_change_seen_ends_the_answers_read_before_it() -> None:
    cache, clock = _cache(ttl=2.0)
    cache.store_checked(0.0, changed=True)
    clock.now = 0.5
    _fill(cache, "q", ("a",), b"Q")
    clock.now = 1.0
    cache.store_checked(1.0, changed=True)  # a commit between the two looks
    clock.now = 1.5
    _fill(cache, "later", ("a",), b"L")
    clock.now = 2.0
    cache.store_checked(2.0, changed=False)
    clock.now = 2.4
    assert cache.get("q") == b"Q"  # younger than the ttl: served, as always
    clock.now = 3.6
    assert (cache.get("q"), cache.get("later")) == (None, b"L")


def test_a_read_begun_at_the_reading_a_change_was_seen_at_is_not_vouched_for() -> None:
    """A clock that did not move between the two (a coarse one, or trio's MockClock while
    threads run) cannot tell whether the read took its snapshot before the commit that
    look saw: that read's answer may miss it, so it ages out at the ttl."""
    cache, clock = _cache(ttl=2.0)
    cache.store_checked(0.0, changed=True)
    clock.now = 1.0
    with cache.reading(("a",), 0, 24 * HOUR) as keep:
        # The read's snapshot is taken here; then another process commits, and the
        # look that sees it ends: all at the reading 1.0.
        cache.store_checked(1.0, changed=True)
        keep("q", b"Q", 1)
    clock.now = 1.5
    cache.store_checked(1.5, changed=False)
    clock.now = 3.2  # 2.2 s after that commit, looked at 1.7 s ago
    assert cache.get("q") is None


class _StampFailing(SQLiteBackend):
    """A real SQLite store whose look for changes fails while ``failing``."""

    failing = False

    def change_stamp(self, conn: Any) -> Any:
        if self.failing:
            raise sqlite3.OperationalError("disk I/O error")
        return super().change_stamp(conn)


async def test_a_look_at_a_store_whose_file_was_replaced_fails(tmp_path: Path) -> None:
    """The look's connection would go on reading the old file, which no one writes any
    more: it would vouch for stale answers for ever. It fails instead, as a read does."""
    path = tmp_path / "s.db"
    store = await Store.open(
        SQLiteBackend(str(path)),
        policy=WritePolicy(HOUR, 86400.0, lambda key: False),
        readers=1,
        busy_timeout=5,
    )
    try:
        assert await store.change_stamp() is not None
        other = tmp_path / "other.db"
        sqlite3.connect(other).close()
        os.replace(other, path)
        with pytest.raises(DatabaseFileGone):
            await store.change_stamp()
    finally:
        await store.aclose()


async def test_a_look_at_the_store_that_fails_vouches_for_nothing(tmp_path: Path) -> None:
    backend = _StampFailing(str(tmp_path / "s.db"))
    store = await Store.open(
        backend, policy=WritePolicy(HOUR, 86400.0, lambda key: False), readers=1, busy_timeout=5
    )
    cache, clock = _cache(ttl=0.2)  # looked at every 0.05 s
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_store, store, cache)
            await trio.sleep(0.2)  # the first look cannot tell; the next see no change
            clock.now = 1.0
            _fill(cache, "q", ("a",), b"Q")
            clock.now = 1.25
            await trio.sleep(0.2)
            clock.now = 1.3  # past the ttl, looked at 0.05 s ago
            assert cache.get("q") == b"Q"
            backend.failing = True
            await trio.sleep(0.2)
            assert cache.get("q") is None  # a failed look is taken for a change
            backend.failing = False
            clock.now = 1.35
            await trio.sleep(0.2)  # the first look after a failed one cannot tell either
            clock.now = 1.4  # read after it
            _fill(cache, "q", ("a",), b"Q2")
            clock.now = 1.6
            await trio.sleep(0.2)  # the watcher went on: looks again, no change since
            assert cache.get("q") == b"Q2"
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


def test_entries_and_bytes_are_bounded_least_recently_used_first() -> None:
    cache, _ = _cache(entries=3)
    for name in "abcd":
        _fill(cache, name, (name,), name.encode())
        cache.get("a")  # a stays recently used
    assert [cache.get(name) for name in "abcd"] == [b"a", None, b"c", b"d"]
    body = b"x" * 1000
    per_entry = entry_cost(("00",), len(body))
    sized, _ = _cache(entries=100, max_bytes=8 * per_entry)
    for number in range(12):
        _fill(sized, number, (f"{number:02d}",), body)
    assert len(sized) == 8 and sized.bytes == 8 * per_entry
    assert sized.get(3) is None and sized.get(4) == body
    # an answer larger than an eighth of the bytes is never kept
    _fill(sized, "big", ("big",), b"y" * per_entry)
    assert sized.get("big") is None
    # invalidation leaves no trace in the index
    sized.committed(_touched(*(f"{n:02d}" for n in range(12))), 0, 1)
    assert len(sized) == 0 and sized.bytes == 0 and not sized._by_key


def test_the_byte_bound_covers_what_the_keys_of_the_entries_hold() -> None:
    """Small answers to queries of 100 long key names: what the cache counts is at least
    what it holds in memory, and the byte bound keeps it small."""
    cache, _ = _cache(entries=4096, max_bytes=2 << 20)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(200):
            names = tuple(f"{number:04d}.{index:03d}." + "k" * 140 for index in range(100))
            _fill(cache, ("q", number, names), names, b"{}")
        del names
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.bytes <= 2 << 20 and len(cache) < 200
    assert held <= cache.bytes * 1.1, (held, cache.bytes)


def test_a_disabled_cache_keeps_nothing() -> None:
    for cache, _ in (_cache(entries=0), _cache(max_bytes=0), _cache(ttl=0)):
        _fill(cache, "q", ("a",), b"A")
        assert not cache.enabled and cache.get("q") is None


#: A cache ttl no test outlasts on a loaded machine: the tests that count hits and misses
#: are about what flushes do to an answer, not about its age.
NO_EXPIRY = "1h"
DAY = {"from": "2026-11-24T00:00:00Z", "to": "2026-11-25T00:00:00Z", "granularity": "day"}


@pytest.mark.parametrize("flush_window", ["0", "10m"])
async def test_a_read_after_a_200_sees_that_write(
    start_server: StartServer, flush_window: str
) -> None:
    """Flushed at once (the cached answer takes each flush in) or still in the head (whose
    rollups the cached rows are merged with anew): the same counts, and only the first
    read is read from the store."""
    server = await start_server(flush_window=flush_window, read_cache_ttl=NO_EXPIRY)
    counts = []
    for value in (1, 2, 3):
        event = {"key": "rc", "ts": "2026-11-24T10:00:00Z", "value": value, "tags": {"t": "x"}}
        assert (await post(server.client, event)).status_code == 200
        if flush_window == "0":  # flushed right after the batch: wait for it
            await server.app.service.writers.flushed()
        for _ in range(2):  # the second read is answered from the cache
            answer = (await server.client.get("/v1/aggregates", params={"key": "rc", **DAY})).json()
            (series,) = answer["results"]
            counts.append(series["buckets"][0]["count"])
    assert counts == [1, 1, 2, 2, 3, 3]
    metrics = server.app.metrics.registry
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "hit"}) == 5
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "miss"}) == 1


async def test_a_write_after_a_multi_key_read_of_its_keys_is_stored(
    start_server: StartServer,
) -> None:
    """The sequence that killed the writer and the process (issue 19)."""
    server = await start_server()
    events = [{"key": key, "ts": "2026-11-24T10:00:00Z"} for key in ("a", "b")]
    assert (await post(server.client, events)).status_code == 200
    params: list[tuple[str, Any]] = [("key", "a"), ("key", "b"), *DAY.items()]
    assert (await server.client.get("/v1/aggregates", params=params)).status_code == 200
    assert (await post(server.client, events)).status_code == 200
    answer = (await server.client.get("/v1/aggregates", params=params)).json()
    assert [series["buckets"][0]["count"] for series in answer["results"]] == [2, 2]
    assert (await server.client.get("/healthz")).status_code == 200


async def test_a_flush_of_todays_events_keeps_the_answer_over_yesterday(
    start_server: StartServer,
) -> None:
    server = await start_server(flush_window="10m", read_cache_ttl=NO_EXPIRY)
    today = {"from": "2026-11-25T00:00:00Z", "to": "2026-11-26T00:00:00Z", "granularity": "day"}

    async def count(day: dict[str, str]) -> int:
        answer = await server.client.get("/v1/aggregates", params={"key": "days", **day})
        return sum(bucket["count"] for bucket in answer.json()["results"][0]["buckets"])

    assert (await post(server.client, {"key": "days", "ts": "2026-11-24T10:00:00Z"})).is_success
    await server.app.service.writers.flushed()
    assert [await count(DAY), await count(DAY), await count(today)] == [1, 1, 0]
    assert (await post(server.client, {"key": "days", "ts": "2026-11-25T01:00:00Z"})).is_success
    await server.app.service.writers.flushed()
    assert [await count(DAY), await count(today)] == [1, 1]
    metrics = server.app.metrics.registry
    # yesterday's answer served from the cache before and after the flush, untouched;
    # today's took the flush in
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "hit"}) == 3
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "miss"}) == 2


@pytest.mark.parametrize("flush_window", ["30ms", "10m"])
async def test_reads_under_concurrent_writes_never_miss_an_acknowledged_write(
    start_server: StartServer, flush_window: str
) -> None:
    """Writers and readers of one key at once, with flushes among them or none: every
    read that starts after a 200 counts at least the events acknowledged by then, and
    never more than were sent (a flush read twice, from the table and the head, would),
    cached or not."""
    server = await start_server(flush_window=flush_window)
    acknowledged = sent = 0
    problems: list[str] = []

    async def write() -> None:
        nonlocal acknowledged, sent
        for _ in range(40):
            event = {"key": "hot", "ts": "2026-11-24T10:00:00Z"}
            sent += 2
            assert (await post(server.client, [event, event])).status_code == 200
            acknowledged += 2
            await trio.sleep(0.01 * (acknowledged % 3))

    async def read() -> None:
        for _ in range(60):
            floor = acknowledged
            response = await server.client.get("/v1/aggregates", params={"key": "hot", **DAY})
            buckets = response.json()["results"][0]["buckets"]
            count = buckets[0]["count"] if buckets else 0
            if not floor <= count <= sent:
                problems.append(f"read {count} after {floor} were acknowledged, {sent} sent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        for _ in range(3):
            nursery.start_soon(read)
    assert problems == []
    final = await server.client.get("/v1/aggregates", params={"key": "hot", **DAY})
    assert final.json()["results"][0]["buckets"][0]["count"] == 80


@pytest.mark.parametrize("db_url", ["sqlite", SHARDED], indirect=True)
async def test_reads_of_several_keys_under_flushes_never_miss_an_acknowledged_write(
    start_server: StartServer,
) -> None:
    """As above, with answers over two keys whose hours two writers own (with two
    shards), flushed every few batches: the answers that take flushes in count each
    acknowledged event once, whatever each key's flushes and reads interleave."""
    server = await start_server(flush_window="20ms")
    keys = ("m1", "m2")
    acknowledged = dict.fromkeys(keys, 0)
    sent = dict.fromkeys(keys, 0)
    problems: list[str] = []

    async def write() -> None:
        for round_ in range(30):
            key = keys[round_ % 2]
            events = [{"key": key, "ts": f"2026-11-24T{hour:02d}:10:00Z"} for hour in (3, 4)]
            sent[key] += 2
            assert (await post(server.client, events)).status_code == 200
            acknowledged[key] += 2
            await trio.sleep(0.005 * (round_ % 4))

    async def read() -> None:
        params: list[tuple[str, Any]] = [("key", "m1"), ("key", "m2"), *DAY.items()]
        for _ in range(40):
            floor = dict(acknowledged)
            response = await server.client.get("/v1/aggregates", params=params)
            for series in response.json()["results"]:
                key, buckets = series["key"], series["buckets"]
                count = buckets[0]["count"] if buckets else 0
                if not floor[key] <= count <= sent[key]:
                    problems.append(f"{key}: {count} after {floor[key]} acknowledged")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        for _ in range(3):
            nursery.start_soon(read)
    assert problems == []
    params: list[tuple[str, Any]] = [("key", "m1"), ("key", "m2"), *DAY.items()]
    final = (await server.client.get("/v1/aggregates", params=params)).json()["results"]
    assert [series["buckets"][0]["count"] for series in final] == [30, 30]


@pytest.mark.parametrize("db_url", ["sqlite", SHARDED, "postgres"], indirect=True)
async def test_hot_reads_stay_hits_and_exact_while_batches_are_flushed(
    start_server: StartServer,
) -> None:
    """Every batch flushed at once, over hours that two writers own (with two shards):
    each read after a 200 counts exactly what was acknowledged, and after the first
    read every one is a hit (the answer takes each flush in)."""
    server = await start_server(flush_window="0", read_cache_ttl=NO_EXPIRY)
    hours = [f"2026-11-24T{hour:02d}:30:00Z" for hour in (3, 4, 10)]
    expected_sum = 0
    for round_ in range(1, 7):
        events = [{"key": "hot", "ts": ts, "value": round_} for ts in hours]
        assert (await post(server.client, events)).status_code == 200
        await server.app.service.writers.flushed()
        expected_sum += round_ * len(hours)
        for _ in range(2):
            answer = await server.client.get(
                "/v1/aggregates", params={"key": "hot", "stats": "count,sum,max", **DAY}
            )
            (bucket,) = answer.json()["results"][0]["buckets"]
            assert (bucket["count"], bucket["sum"], bucket["max"]) == (
                round_ * len(hours),
                expected_sum,
                round_,
            )
    metrics = server.app.metrics.registry
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "miss"}) == 1
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "hit"}) == 11


@pytest.mark.parametrize("db_url", ["sqlite", SHARDED], indirect=True)
async def test_an_idle_store_s_answers_outlive_the_ttl_until_another_process_commits(
    start_server: StartServer,
) -> None:
    """Past the ttl, an answer is served while the store has taken no commit since it
    was read; another process's commit (here another server on the same store, with
    connections of its own) is seen within the ttl, as without the cache."""
    ttl = 0.8
    server = await start_server(read_cache_ttl=f"{ttl}s", flush_window="0")
    other = await start_server(flush_window="0")
    event = {"key": "idle", "ts": "2026-11-24T10:00:00Z"}

    async def count() -> int:
        answer = await server.client.get("/v1/aggregates", params={"key": "idle", **DAY})
        return int(answer.json()["results"][0]["buckets"][0]["count"])

    assert (await post(server.client, event)).status_code == 200
    await server.app.service.writers.flushed()
    await trio.sleep(ttl / 2)  # the store is looked at every ttl / 4: the flush is seen
    counts = []
    for _ in range(3):
        counts.append(await count())
        await trio.sleep(ttl * 1.1)
    metrics = server.app.metrics.registry
    assert counts == [1, 1, 1]
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "miss"}) == 1
    assert (await post(other.client, event)).status_code == 200
    await other.app.service.writers.flushed()
    await trio.sleep(ttl)
    assert await count() == 2


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_on_postgresql_answers_expire_at_the_ttl_and_no_connection_looks(
    start_server: StartServer,
) -> None:
    server = await start_server(read_cache_ttl="300ms")
    store = server.app.service.store
    assert await store.change_stamp() is None
    assert store._stamp_link.conn is None  # no connection held for looks that tell nothing
    assert (await post(server.client, {"key": "pg", "ts": "2026-11-24T10:00:00Z"})).is_success
    await server.app.service.writers.flushed()
    for _ in range(2):
        await server.client.get("/v1/aggregates", params={"key": "pg", **DAY})
        await trio.sleep(0.35)
    metrics = server.app.metrics.registry
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "miss"}) == 2


async def test_waiting_for_the_flush_waits_for_one_whose_thread_emptied_the_head(
    start_server: StartServer,
) -> None:
    """A flush empties the head in its thread, right after its COMMIT; the cache is told
    once the thread is back on the event loop. Writers.flushed() called in between found
    the head empty and returned, and a read then raced the flush's telling (answered, not
    kept): the hit counts of the tests above came out one short now and then."""
    server = await start_server(flush_window="0", read_cache_ttl=NO_EXPIRY)
    service = server.app.service
    head = service.store.heads[0]
    emptied, release = threading.Event(), threading.Event()
    empty = head.flushed

    def flushed_then_held() -> None:
        empty()
        emptied.set()
        release.wait(10)

    head.flushed = flushed_then_held  # type: ignore[method-assign]
    assert (await post(server.client, {"key": "told", "ts": "2026-11-24T10:00:00Z"})).is_success
    assert await trio.to_thread.run_sync(emptied.wait, 10)
    head.flushed = empty  # type: ignore[method-assign]
    waited = trio.Event()

    async def wait_for_the_flush() -> None:
        await service.writers.flushed()
        waited.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_the_flush)
            await trio.testing.wait_all_tasks_blocked()
            assert not waited.is_set()  # the flush under way has not told the cache yet
            release.set()
    finally:
        release.set()
    assert service.read_cache._told[0] == head.generation


async def test_each_tenant_takes_in_only_its_own_flushed_rows(start_server: StartServer) -> None:
    server = await start_server(auth="on", flush_window="0", read_cache_ttl=NO_EXPIRY)
    secrets = {
        name: await trio.to_thread.run_sync(
            partial(make_key, server.db, name, "ingest", "read", tenant=name)
        )
        for name in ("acme", "globex")
    }
    sums: dict[str, list[float]] = {"acme": [], "globex": []}
    for _ in range(3):
        for name, value in (("acme", 1), ("globex", 10)):
            event = {"key": "shared", "ts": "2026-11-24T10:00:00Z", "value": value}
            headers = bearer(secrets[name])
            response = await server.client.post("/v1/events", json=event, headers=headers)
            assert response.status_code == 200, response.text
        await server.app.service.writers.flushed()
        for name in sums:
            response = await server.client.get(
                "/v1/aggregates",
                params={"key": "shared", "stats": "sum", **DAY},
                headers=bearer(secrets[name]),
            )
            sums[name].append(response.json()["results"][0]["buckets"][0]["sum"])
    assert sums == {"acme": [1, 2, 3], "globex": [10, 20, 30]}
    metrics = server.app.metrics.registry
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "hit"}) == 4


@pytest.mark.parametrize("ttl", ["0"])
async def test_no_cache_with_a_zero_ttl(start_server: StartServer, ttl: str) -> None:
    server = await start_server(read_cache_ttl=ttl)
    for _ in range(2):
        await server.client.get("/v1/aggregates", params={"key": "none", **DAY})
    metrics = server.app.metrics.registry
    assert metrics.get_sample_value("trioagg_read_cache_total", {"result": "hit"}) is None


async def test_tenants_asking_the_same_query_string_each_read_their_own(
    start_server: StartServer,
) -> None:
    """A query string is parsed once per tenant: the tenant's tag is part of what was
    parsed, so another tenant's (or an admin's) same string must not reuse it."""
    server = await start_server(auth="on")
    secrets = {
        name: await trio.to_thread.run_sync(
            partial(make_key, server.db, name, "ingest", "read", tenant=name)
        )
        for name in ("acme", "globex")
    }
    secrets["admin"] = await trio.to_thread.run_sync(make_key, server.db, "admin", "admin")
    for name, value in (("acme", 1), ("globex", 10)):
        event = {"key": "shared", "ts": "2026-11-24T10:00:00Z", "value": value}
        response = await server.client.post("/v1/events", json=event, headers=bearer(secrets[name]))
        assert response.status_code == 200, response.text
    sums = []
    for _ in range(2):  # the second round is parsed from memory and answered from the cache
        for name in ("acme", "globex", "admin"):
            response = await server.client.get(
                "/v1/aggregates",
                params={"key": "shared", "stats": "sum", **DAY},
                headers=bearer(secrets[name]),
            )
            assert response.status_code == 200, response.text
            (series,) = response.json()["results"]
            sums.append((name, series["tags"], series["buckets"][0]["sum"]))
    expected = [
        ("acme", {"tenant": "acme"}, 1.0),
        ("globex", {"tenant": "globex"}, 10.0),
        ("admin", {}, 11.0),
    ]
    assert sums == expected * 2
