"""Aggregation math as properties: any split into batches, pre-aggregated and upserted
into a real SQLite file, then merged by a query, equals the naive aggregation."""

from __future__ import annotations

import datetime
import itertools
import math
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from trioagg.query import GRANULARITIES, answer, parse_query
from trioagg.rollup import STATS, Rollup, Slot, pre_aggregate
from trioagg.store.sqlite import SQLiteBackend

DAY0 = 1_763_942_400  # 2025-11-24T00:00:00Z, a Monday
WIDTHS = [60, 300, 900, 3600]

values = st.one_of(
    st.integers(-1000, 1000).map(float),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e9 + 0.001, 1e9 + 0.002, 1e9 - 0.003]),
)
events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.integers(DAY0, DAY0 + 3 * 86400 - 1).map(float),
        values,
        st.sampled_from(["{}", '{"r":"eu"}', '{"r":"us"}']),
    ),
    min_size=1,
    max_size=60,
)


def store_in_batches(path: Path, points: list, cuts: list[int], width: int) -> SQLiteBackend:
    backend = SQLiteBackend(str(path))
    conn = backend.connect(write=True)
    backend.prepare(conn, width)
    bounds = sorted({0, len(points), *(c % (len(points) + 1) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        rollups: dict[Slot, Rollup] = {}
        pre_aggregate(points[lo:hi], width, rollups)
        backend.upsert(conn, rollups)
    backend.close(conn)
    return backend


def naive(points: list, start: int, step: int, group: bool) -> dict:
    """{(key, tags-or-None, answer bucket start): [values]} from the raw events."""
    grouped: dict = defaultdict(list)
    for key, ts, value, tags in points:
        bucket_start = start + (int(ts) - start) // step * step
        grouped[(key, tags if group else None, bucket_start)].append(value)
    return grouped


def close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, scale))


@settings(max_examples=60, deadline=None)
@given(
    points=events,
    cuts=st.lists(st.integers(0, 60), max_size=6),
    width=st.sampled_from(WIDTHS),
    granularity=st.sampled_from(list(GRANULARITIES)),
    group=st.booleans(),
)
def test_batched_upserts_equal_naive_aggregation(
    points: list, cuts: list[int], width: int, granularity: str, group: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        backend = store_in_batches(Path(folder) / "t.db", points, cuts, width)
        args = MultiDict(
            [
                ("key", "a"),
                ("key", "b"),
                ("from", str(DAY0)),
                ("to", str(DAY0 + 3 * 86400)),
                ("granularity", granularity),
                ("stats", ",".join(STATS)),
            ]
        )
        if group:
            args.add("group_by", "r")
        query = parse_query(args, bucket=width, now=DAY0)
        conn = backend.connect(write=False)
        rows = backend.fetch(conn, query.keys, query.start, query.end)
        backend.close(conn)
    document = answer(query, rows)

    expected = naive(points, query.start, query.step, group)
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
        pre_aggregate([("k", 0.0, v, "{}") for v in raw[chunk : chunk + 777]], 3600, rollups)
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
    points = [("k", float(DAY0), v, "{}") for v in raw]
    backend = store_in_batches(tmp_path / "t.db", points, list(range(0, 5_000, 333)), 3600)
    conn = backend.connect(write=False)
    ((_, _, _, rollup),) = backend.fetch(conn, ["k"], DAY0, DAY0 + 3600)
    assert rollup.count == 5_000
    assert rollup.stddev == pytest.approx(statistics.pstdev(raw), rel=1e-6)


def test_single_value_has_zero_stddev() -> None:
    rollup = Rollup(5.0)
    assert (rollup.count, rollup.sum, rollup.stddev, rollup.mean) == (1, 5.0, 0.0, 5.0)
