"""Aggregation math as properties: any split into batches, pre-aggregated and upserted
into a real SQLite file, then merged by a query, equals the naive aggregation."""

from __future__ import annotations

import datetime
import itertools
import math
import random
import sqlite3
import statistics
import tempfile
import zoneinfo
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from trioagg.core.errors import InvalidQuery
from trioagg.core.events import Point
from trioagg.core.rollup import Rollup, Slot, _first, pre_aggregate
from trioagg.core.stats import STATS
from trioagg.query.aggregates import Query, answer, parse_query
from trioagg.query.params import GRANULARITIES
from trioagg.store.base import flush_head, journal_batch
from trioagg.store.head import Head, copy_rollup
from trioagg.store.plan import SeriesCache, WritePolicy
from trioagg.store.sqlite import SQLiteBackend

# 2025-10-24T00:00:00Z: the range crosses the end of DST in Europe (Oct 26)
# and in America (Nov 2), and two month boundaries.
DAY0 = 1_761_264_000
WIDTHS = [60, 300, 900, 3600]
SPAN = 45 * 86400

values = st.one_of(
    st.integers(-1000, 1000).map(float),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e9 + 0.001, 1e9 + 0.002, 1e9 - 0.003]),
)
events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        # Some events at one same time: last breaks the tie by the larger value.
        st.one_of(st.integers(DAY0, DAY0 + SPAN - 1), st.sampled_from([DAY0 + 7])).map(float),
        values,
        st.sampled_from(["{}", '{"r":"eu"}', '{"r":"us"}']),
        st.none(),
        st.none(),
    ),
    min_size=1,
    max_size=60,
)


def store_in_batches(
    path: Path, points: list[Point], cuts: list[int], width: int, quantiles: bool = False
) -> SQLiteBackend:
    """Commit ``points`` cut into batches as the writer does: each journalled in a
    transaction of its own and folded into the head, the head flushed after every other
    batch (so rollups merge in the head and in the table's upsert alike)."""
    backend = SQLiteBackend(str(path))
    conn = backend.connect(write=True)
    backend.prepare(conn, width)
    policy = WritePolicy(width, 86400, lambda key: quantiles)
    bounds = sorted({0, len(points), *(c % (len(points) + 1) for c in cuts)})
    series_seen = SeriesCache()
    head = Head()
    for number, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        journal_batch(conn, backend, [points[lo:hi]], policy, "test/0", head)
        if number % 2:
            flush_head(conn, backend, head, "test/0", policy, series_seen)
    flush_head(conn, backend, head, "test/0", policy, series_seen)
    assert conn.execute("SELECT count(*) FROM journal").fetchone() == (0,)
    backend.close(conn)
    return backend


def answer_bucket(ts: int, granularity: str, tz: str, width: int, start: int) -> int:
    """Where one raw event belongs, worked out on its own (the oracle)."""
    if granularity in ("bucket", "hour"):
        step = width if granularity == "bucket" else 3600
        return ts // step * step
    if granularity == "all":
        return start
    zone = zoneinfo.ZoneInfo(tz)
    day = datetime.datetime.fromtimestamp(ts, zone).date()
    if granularity == "week":
        day -= datetime.timedelta(days=day.weekday())
    if granularity == "month":
        day = day.replace(day=1)
    return int(datetime.datetime.combine(day, datetime.time(), zone).timestamp())


Grouped = dict[tuple[str, str | None, int], list[tuple[float, float]]]


def naive(points: list[Point], query: Query, width: int, group: bool) -> Grouped:
    """{(key, tags-or-None, answer bucket start): [(ts, value)]} from the raw events."""
    grouped: Grouped = defaultdict(list)
    for key, ts, value, tags, _, _ in points:
        start = answer_bucket(int(ts), query.granularity, query.tz, width, query.start)
        grouped[(key, tags if group else None, start)].append((ts, value))
    return grouped


def close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, scale))


@settings(max_examples=60, deadline=None)
@given(
    points=events,
    cuts=st.lists(st.integers(0, 60), max_size=6),
    width=st.sampled_from(WIDTHS),
    granularity=st.sampled_from(list(GRANULARITIES)),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]),
    group=st.booleans(),
)
def test_batched_upserts_equal_naive_aggregation(
    points: list[Point], cuts: list[int], width: int, granularity: str, tz: str, group: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        backend = store_in_batches(Path(folder) / "t.db", points, cuts, width)
        args = MultiDict(
            [
                ("key", "a"),
                ("key", "b"),
                ("from", str(DAY0)),
                ("to", str(DAY0 + SPAN)),
                ("granularity", granularity),
                ("stats", ",".join(STATS)),
                ("tz", tz),
            ]
        )
        if group:
            args.add("group_by", "r")
        if tz == "Asia/Kolkata" and width == 3600 and granularity in ("day", "week", "month"):
            with pytest.raises(InvalidQuery) as refused:
                parse_query(args, bucket=width, now=DAY0)
            assert "--bucket 15m answers it exactly" in refused.value.details[0]["message"]
            return
        query = parse_query(args, bucket=width, now=DAY0)
        conn = backend.connect(write=False)
        rows = backend.fetch(conn, query.keys, query.start, query.end)
        backend.close(conn)
    document = msgspec.json.decode(answer(query, rows).joined())

    expected = naive(points, query, width, group)
    seen = set()
    for result in document["results"]:
        tags = None
        if group:
            value = result["tags"].get("r")
            tags = "{}" if value is None else f'{{"r":"{value}"}}'
        for bucket in result["buckets"]:
            start = int(datetime.datetime.fromisoformat(bucket["start"]).timestamp())
            timed = expected[(result["key"], tags, start)]
            want = [value for _, value in timed]
            seen.add((result["key"], tags, start))
            scale = max(abs(v) for v in want) * len(want)
            assert bucket["count"] == len(want)
            assert bucket["min"] == min(want)
            assert bucket["max"] == max(want)
            assert close(bucket["sum"], math.fsum(want), scale)
            assert close(bucket["avg"], math.fsum(want) / len(want), scale)
            assert close(bucket["stddev"], statistics.pstdev(want), scale)
            assert bucket["last"] == max(timed)[1]  # the latest; of a tie, the largest
    assert seen == set(expected)


def test_stddev_survives_large_values_with_small_spread() -> None:
    """Σx² would cancel to noise here; shifted moments keep every digit that matters."""
    raw = [1e9 + 0.001 * (i % 7) for i in range(10_000)]
    merged: Rollup | None = None
    for chunk in range(0, len(raw), 777):  # many partial rollups, merged
        rollups: dict[Slot, Rollup] = {}
        part_points = [("k", 0.0, v, "{}", None, None) for v in raw[chunk : chunk + 777]]
        pre_aggregate(part_points, 3600, rollups, lambda key: False)
        part = rollups[("k", 0, "{}")]
        if merged is None:
            merged = part
        else:
            merged.merge(part)
    assert merged is not None
    exact = statistics.pstdev(raw)
    assert merged.stddev == pytest.approx(exact, rel=1e-6)
    assert merged.mean == pytest.approx(statistics.fmean(raw), rel=1e-15)


def test_stddev_of_large_values_survives_the_sql_upsert(tmp_path: Path) -> None:
    raw = [1e9 + 0.001 * (i % 5) for i in range(5_000)]
    points: list[Point] = [("k", float(DAY0), v, "{}", None, None) for v in raw]
    backend = store_in_batches(tmp_path / "t.db", points, list(range(0, 5_000, 333)), 3600)
    conn = backend.connect(write=False)
    ((_, _, _, rollup),) = backend.fetch(conn, ["k"], DAY0, DAY0 + 3600)
    assert rollup.count == 5_000
    assert rollup.stddev == pytest.approx(statistics.pstdev(raw), rel=1e-6)


def test_single_value_has_zero_stddev() -> None:
    rollup = Rollup(5.0)
    assert (rollup.count, rollup.sum, rollup.stddev, rollup.mean) == (1, 5.0, 0.0, 5.0)


@settings(max_examples=100, deadline=None)
@given(
    timed=st.lists(
        st.tuples(st.sampled_from([0.0, 1.0, 2.0, 2.5]), st.integers(-3, 3).map(float)),
        min_size=1,
        max_size=12,
    ),
    order=st.randoms(use_true_random=False),
    cut=st.integers(0, 12),
)
def test_last_is_the_same_in_any_order_of_arrival_and_merge(
    timed: list[tuple[float, float]], order: random.Random, cut: int
) -> None:
    """Events shuffled and split into two rollups, merged either way round: last is the
    latest event's value, a tie going to the larger value."""
    shuffled = list(timed)
    order.shuffle(shuffled)
    parts = [shuffled[:cut], shuffled[cut:]]
    rollups = []
    for part in parts:
        if part:
            into: dict[Slot, Rollup] = {}
            pre_aggregate([("k", t, v, "{}", None, None) for t, v in part], 3600, into, bool)
            rollups.append(into[("k", 0, "{}")])
    first, *rest = rollups
    for other in rest:
        first.merge(other)
    assert (first.last_ts, first.last) == max(timed)
    if len(rollups) == 2:
        again = [Rollup(r.shift, r.count, last=r.last, last_ts=r.last_ts) for r in rollups[::-1]]
        again[0].merge(again[1])
        assert (again[0].last_ts, again[0].last) == max(timed)


def test_an_unknown_last_wins_in_its_bucket_and_loses_to_later_buckets() -> None:
    """A row stored before last existed (None, timed at its bucket's end) keeps last
    unknown against events of its own bucket, and yields to an event of a later one."""
    unknown = Rollup(1.0, last=None, last_ts=3600.0)
    same_bucket = Rollup(2.0, last=2.0, last_ts=3599.5)
    unknown.merge(same_bucket)
    assert unknown.last is None
    same_bucket.merge(Rollup(1.0, last=None, last_ts=3600.0))
    assert same_bucket.last is None
    at_next_edge = Rollup(5.0, last=5.0, last_ts=3600.0)
    at_next_edge.merge(Rollup(1.0, last=None, last_ts=3600.0))
    assert at_next_edge.last == 5.0
    earlier = Rollup(1.0, last=None, last_ts=3600.0)
    earlier.merge(Rollup(7.0, last=7.0, last_ts=4000.0))
    assert earlier.stat("last") == 7.0


def test_a_store_made_before_last_gets_its_columns_and_old_rows_answer_null(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    store_in_batches(path, [("k", float(DAY0), 4.0, "{}", None, None)], [], 3600)
    conn = sqlite3.connect(path)
    for table in ("rollups", "refused_rollups"):  # as trioagg made it before last
        conn.execute(f"ALTER TABLE {table} DROP COLUMN last_value")
        conn.execute(f"ALTER TABLE {table} DROP COLUMN last_ts")
    conn.close()
    later: list[Point] = [
        ("k", float(DAY0 + 10), 9.0, "{}", None, None),  # the old row's bucket
        ("k", float(DAY0 + 3600), 3.0, "{}", None, None),  # the next
    ]
    backend = store_in_batches(path, later, [1], 3600)  # prepare adds the columns
    conn = backend.connect(write=False)
    rows = backend.fetch(conn, ["k"], DAY0, DAY0 + 7200)
    backend.close(conn)
    assert sorted((b, r.count, r.last) for _, b, _, r in rows) == [
        (DAY0, 2, None),  # 9.0 may not be the latest: the old event's time is unknown
        (DAY0 + 3600, 1, 3.0),
    ]
    args = MultiDict({"key": "k", "from": str(DAY0), "to": str(DAY0 + 7200), "stats": "count,last"})
    for granularity, lasts in (("hour", [None, 3.0]), ("all", [3.0])):
        args["granularity"] = granularity
        copies = [(k, b, t, copy_rollup(r, sketches=False)) for k, b, t, r in rows]
        query = parse_query(args, bucket=3600, now=DAY0)
        document = msgspec.json.decode(answer(query, copies).joined())
        assert [b["last"] for b in document["results"][0]["buckets"]] == lasts


@pytest.mark.parametrize("value", [0.0, -2.5, 1e100])
def test_the_fast_first_rollup_is_the_rollup_of_one_event(value: float) -> None:
    # pre_aggregate makes a slot's rollup without __init__: every slot set, as __init__ sets it
    fast, slow = _first(value, 1234.5), Rollup(value, last=value, last_ts=1234.5)
    assert [getattr(fast, name) for name in Rollup.__slots__] == [
        getattr(slow, name) for name in Rollup.__slots__
    ]
    assert [type(getattr(fast, name)) for name in Rollup.__slots__] == [
        type(getattr(slow, name)) for name in Rollup.__slots__
    ]
