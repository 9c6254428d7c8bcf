"""Aggregation math as properties: any split into batches, pre-aggregated and upserted
into a real SQLite file, then merged by a query, equals the naive aggregation."""

from __future__ import annotations

import datetime
import itertools
import math
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

from trioagg.errors import InvalidQuery
from trioagg.ingest import Point
from trioagg.params import GRANULARITIES
from trioagg.query import Query, answer, parse_query
from trioagg.rollup import STATS, Rollup, Slot, pre_aggregate
from trioagg.store.base import flush_head, journal_batch
from trioagg.store.head import Head
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
        st.integers(DAY0, DAY0 + SPAN - 1).map(float),
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


Grouped = dict[tuple[str, str | None, int], list[float]]


def naive(points: list[Point], query: Query, width: int, group: bool) -> Grouped:
    """{(key, tags-or-None, answer bucket start): [values]} from the raw events."""
    grouped: Grouped = defaultdict(list)
    for key, ts, value, tags, _, _ in points:
        start = answer_bucket(int(ts), query.granularity, query.tz, width, query.start)
        grouped[(key, tags if group else None, start)].append(value)
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
            want = expected[(result["key"], tags, start)]
            seen.add((result["key"], tags, start))
            scale = max(abs(v) for v in want) * len(want)
            assert bucket["count"] == len(want)
            assert bucket["min"] == min(want)
            assert bucket["max"] == max(want)
            assert close(bucket["sum"], math.fsum(want), scale)
            assert close(bucket["avg"], math.fsum(want) / len(want), scale)
            assert close(bucket["stddev"], statistics.pstdev(want), scale)
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
