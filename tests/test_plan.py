"""The write planner on its own, without a database: which events count, the rollups
and rows a batch writes, the sketches merged with stored ones, and the series spans
it widens. The same plans run against real stores in test_rollup.py, test_writer*.py
and test_fidelity.py."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioagg.core.events import Point
from trioagg.core.rollup import (
    Distinct,
    Quantiles,
    decode_distinct,
    decode_quantiles,
    encode_distinct,
    encode_quantiles,
    new_distinct,
    new_quantiles,
)
from trioagg.store.base import fold_events
from trioagg.store.plan import (
    Plan,
    SeriesCache,
    WritePolicy,
    batch_ids,
    merged_rows,
    new_events,
    plan_rows,
    sketch_rows,
)

HOUR = 3600
POLICY = WritePolicy(HOUR, 86400.0, lambda key: False)


@dataclass
class Planned(Plan):
    """What a batch flushed on its own writes, and its duplicates per submission."""

    duplicates: list[int] = field(default_factory=list)


def plan_batch(
    batch: list[list[Point]],
    claimed: set[str] | None,
    policy: WritePolicy,
    seen: dict[tuple[str, str], tuple[int, int]],
) -> Planned:
    """The events of ``batch`` that count, folded and planned as a flush of them alone."""
    kept, duplicates = new_events(batch, claimed)
    plan = plan_rows(fold_events(kept, policy), seen)
    return Planned(plan.plain, plan.sketched, plan.spans, plan.touched, duplicates=duplicates)


def event(
    key: str = "k",
    ts: float = 0.0,
    value: float = 1.0,
    tags: str = "{}",
    distinct_id: str | None = None,
    event_id: str | None = None,
) -> Point:
    return (key, ts, value, tags, distinct_id, event_id)


def quantiles(blob: bytes | None) -> Quantiles:
    """The quantile sketch a row holds (it must hold one)."""
    sketch = decode_quantiles(blob)
    assert sketch is not None
    return sketch


def distinct(blob: bytes | None) -> Distinct:
    """The distinct-count sketch a row holds (it must hold one)."""
    sketch = decode_distinct(blob)
    assert sketch is not None
    return sketch


def test_the_ids_to_claim_are_the_batchs_distinct_ids() -> None:
    batch = [
        [event(event_id="a"), event(), event(event_id="b")],
        [event(event_id="a"), event(event_id="c")],
    ]
    assert sorted(batch_ids(batch)) == ["a", "b", "c"]
    assert batch_ids([[event(), event()]]) == []


def test_a_batch_without_ids_keeps_every_event() -> None:
    batch = [[event(value=1.0), event(value=2.0)], [event(value=3.0)]]
    plan = plan_batch(batch, None, POLICY, SeriesCache())
    assert plan.duplicates == [0, 0]
    assert [row[3] for row in plan.plain] == [3]


def test_an_id_counts_once_in_a_batch_and_never_when_claimed_before() -> None:
    batch = [
        # "a" twice in one submission, and again in the next: only the first counts.
        [event(value=1.0, event_id="a"), event(value=2.0, event_id="a"), event(value=4.0)],
        [event(value=8.0, event_id="a"), event(value=16.0, event_id="b")],
        # "old" was claimed by an earlier batch: the store did not claim it again.
        [event(value=32.0, event_id="old"), event(value=64.0, event_id="c")],
    ]
    claimed = {"a", "b", "c"}
    plan = plan_batch(batch, claimed, POLICY, SeriesCache())
    assert plan.duplicates == [1, 1, 1]
    ((_, _, _, count, shift, s1, _, low, high, *_),) = plan.plain
    assert (count, count * shift + s1, low, high) == (4, 1.0 + 4.0 + 16.0 + 64.0, 1.0, 64.0)
    assert claimed == {"a", "b", "c"}  # the caller's set is left as it was


def test_a_submission_of_nothing_but_duplicates_writes_nothing() -> None:
    plan = plan_batch([[event(event_id="a")], [event(event_id="a")]], {"a"}, POLICY, {})
    assert plan.duplicates == [0, 1]
    plan = plan_batch([[event(event_id="a")]], set(), POLICY, {})
    assert plan.duplicates == [1]
    assert (plan.plain, plan.sketched, plan.spans, plan.rows) == ([], {}, [], 0)


submissions = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.integers(0, 3 * HOUR - 1).map(float),
            st.integers(-1000, 1000).map(float),  # whole numbers: every sum is exact
            st.sampled_from(["{}", '{"r":"eu"}']),
            st.none(),
            st.one_of(st.none(), st.sampled_from(["i1", "i2", "i3", "i4"])),
        ),
        max_size=20,
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(batch=submissions, claimed=st.sets(st.sampled_from(["i1", "i2", "i3", "i4"])))
def test_rollups_are_exact_per_slot_over_the_events_that_count(
    batch: list[list[Point]], claimed: set[str]
) -> None:
    # The oracle: walk the events in order, an id counting at its first claimed sight.
    unclaimed = set(claimed)
    expected: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    latest: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    duplicates = []
    for points in batch:
        dropped = 0
        for key, ts, value, tags, _, event_id in points:
            if event_id is not None:
                if event_id not in unclaimed:
                    dropped += 1
                    continue
                unclaimed.remove(event_id)
            expected[(key, int(ts) // HOUR * HOUR, tags)].append(value)
            latest[(key, int(ts) // HOUR * HOUR, tags)].append((ts, value))
        duplicates.append(dropped)

    plan = plan_batch(batch, claimed, POLICY, SeriesCache())

    assert plan.duplicates == duplicates
    assert plan.sketched == {}
    assert plan.rows == len(plan.plain) == len(expected)
    for key, bucket, tags, count, shift, s1, s2, low, high, last, at, kll, hll in plan.plain:
        values = expected[(key, bucket, tags)]
        # last: the latest event's value, a tie going to the larger value
        assert (at, last) == max(latest[(key, bucket, tags)])
        assert count == len(values)
        assert count * shift + s1 == sum(values)
        assert (low, high) == (min(values), max(values))
        mean = sum(values) / len(values)
        variance = (s2 - s1 * s1 / count) / count
        assert math.isclose(variance, sum((v - mean) ** 2 for v in values) / count, abs_tol=1e-6)
        assert kll is None and hll is None


def test_rows_with_sketches_are_planned_apart_in_sorted_order() -> None:
    policy = WritePolicy(HOUR, 86400.0, lambda key: key.startswith("q"))
    batch = [
        [
            event("z", value=1.0),
            event("q2", value=2.0),
            event("q1", value=3.0),
            event("d", value=4.0, distinct_id="user"),
            event("d", ts=HOUR, value=5.0),  # another slot, with no distinct_id
        ]
    ]
    plan = plan_batch(batch, None, policy, SeriesCache())
    assert [row[:4] for row in plan.plain] == [("z", 0, "{}", 1), ("d", HOUR, "{}", 1)]
    assert list(plan.sketched) == [("d", 0, "{}"), ("q1", 0, "{}"), ("q2", 0, "{}")]
    assert plan.rows == 5
    rows = sketch_rows(plan.sketched)
    assert [row[:4] for row in rows] == [("d", 0, "{}", 1), ("q1", 0, "{}", 1), ("q2", 0, "{}", 1)]
    d_row, q1_row, _ = rows
    assert d_row[11] is None and distinct(d_row[12]).get_estimate() == 1
    assert quantiles(q1_row[11]).get_quantile(0.5) == 3.0 and q1_row[12] is None


def test_sketches_merge_with_the_stored_ones() -> None:
    policy = WritePolicy(HOUR, 86400.0, lambda key: key == "q")
    batch = [[event("q", value=v, distinct_id=f"u{v:g}") for v in (1.0, 2.0, 3.0)]]
    plan = plan_batch(batch, None, policy, SeriesCache())
    stored_quantiles, stored_distinct = new_quantiles(), new_distinct()
    for v in (4.0, 5.0):
        stored_quantiles.update(v)
    for user in ("u3", "u4"):
        stored_distinct.update(user)
    slot = ("q", 0, "{}")
    stored = {slot: (encode_quantiles(stored_quantiles), encode_distinct(stored_distinct))}

    ((key, bucket, tags, count, *_, kll, hll),) = merged_rows(plan.sketched, [slot], stored)
    # The head's rollup is left as it was: a flush that fails is tried again with it.
    kept = plan.sketched[slot].quantiles
    assert kept is not None and kept.n == 3

    # The row's moments are the batch's alone (the upsert adds the stored ones); its
    # sketches are the union, replacing the stored ones.
    assert (key, bucket, tags, count) == ("q", 0, "{}", 3)
    assert quantiles(kll).n == 5
    assert quantiles(kll).get_quantile(1.0) == 5.0
    assert distinct(hll).get_estimate() == pytest.approx(4, abs=0.01)


def test_a_stored_slot_without_sketches_keeps_the_batchs() -> None:
    batch = [[event("d", distinct_id="u1")]]
    plan = plan_batch(batch, None, POLICY, SeriesCache())
    slot = ("d", 0, "{}")
    ((*_, kll, hll),) = merged_rows(plan.sketched, [slot], {slot: (None, None)})
    assert kll is None and distinct(hll).get_estimate() == pytest.approx(1, abs=0.01)


def test_series_spans_cover_what_the_batch_adds_to_the_cache() -> None:
    batch = [
        [
            event("a", ts=5 * HOUR),
            event("a", ts=2 * HOUR),
            event("a", ts=9 * HOUR),
            event("a", ts=3 * HOUR, tags='{"r":"eu"}'),
            event("b", ts=4 * HOUR),
            event("c", ts=6 * HOUR),
        ]
    ]
    seen = SeriesCache()
    seen.remember(
        [
            ("a", "{}", 4 * HOUR, 6 * HOUR),  # widened at both ends
            ("b", "{}", 0, 8 * HOUR),  # already covers the batch
            ("c", "{}", 0, 5 * HOUR),  # widened at its end
        ]
    )
    before = dict(seen)
    plan = plan_batch(batch, None, POLICY, seen)
    assert sorted(plan.spans) == [
        ("a", '{"r":"eu"}', 3 * HOUR, 3 * HOUR),  # a series the cache does not know
        ("a", "{}", 2 * HOUR, 9 * HOUR),
        ("c", "{}", 0, 6 * HOUR),
    ]
    assert seen == before  # the runner remembers the spans once the commit succeeded
    seen.remember(plan.spans)
    assert plan_batch(batch, None, POLICY, seen).spans == []


def test_the_series_cache_forgets_the_oldest_series_past_its_limit() -> None:
    cache = SeriesCache(limit=3)
    cache.remember([("k", f"t{n}", 0, 3600) for n in range(5)])
    assert list(cache) == [("k", "t2"), ("k", "t3"), ("k", "t4")]
    cache.remember([("k", "t2", 0, 7200)])  # known series are updated, not added
    assert len(cache) == 3 and cache[("k", "t2")] == (0, 7200)


def test_a_forgotten_series_is_upserted_again() -> None:
    cache = SeriesCache(limit=1)
    batch = [[event("a"), event("b")]]
    cache.remember(plan_batch(batch, None, POLICY, cache).spans)
    assert plan_batch(batch, None, POLICY, cache).spans == [("a", "{}", 0, 0)]
