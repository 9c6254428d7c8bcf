"""Query parameters and the query budget as pure functions: times, limits, tables, sums."""

from __future__ import annotations

import datetime
import zoneinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from trioagg.core.errors import InvalidQuery
from trioagg.core.times import LATEST, parse_time
from trioagg.query.aggregates import Query, parse_query
from trioagg.query.budget import Budget
from trioagg.query.params import AGGREGATES, KEYS, TOP, parse_args


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("1764000000.5", 1764000000.5),
        ("1.7e9", 1.7e9),
        ("2026-11-24T10:00:00Z", 1795514400.0),
        ("2026-11-24T11:00:00+01:00", 1795514400.0),
        ("9999-12-31T23:59:59Z", LATEST - 1),
        ("99999999999", 99999999999.0),
    ],
)
def test_times_in_range_are_read(text: str, seconds: float) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nan", "RFC 3339"),
        ("inf", "RFC 3339"),
        ("-inf", "RFC 3339"),
        ("-1", "out of range"),
        ("-1e20", "out of range"),
        ("1e300", "out of range"),
        ("1e999", "out of range"),
        ("1969-12-31T23:59:59Z", "out of range"),
        ("0001-01-01T00:00:00+01:00", "out of range"),
        ("1764000000000", "milliseconds"),
        ("100000000000", "milliseconds"),
        ("\u0661\u0662\u0663", "RFC 3339"),
        ("1_000", "RFC 3339"),
        (" 12", "RFC 3339"),
        ("", "RFC 3339"),
        ("2026-11-24T10:00:00", "RFC 3339"),
        ("1" * 65, "at most 64"),
    ],
)
def test_bad_times_say_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        parse_time(text)


def problems(table: object, **args: object) -> dict[str, str]:
    pairs = [(k, v) for k, vs in args.items() for v in (vs if isinstance(vs, list) else [vs])]
    _, found = parse_args(table, MultiDict(pairs))  # type: ignore[arg-type]
    return {item["parameter"]: item["message"] for item in found.items}


def test_limit_takes_ascii_digits_only() -> None:
    assert problems(KEYS, limit="1000") == {}
    for text in ["²", "\u0663", "1" * 5000, "0", "1001", "+5", " 5", "5.0", ""]:
        assert "whole number from 1 to 1000" in problems(KEYS, limit=text)["limit"]


def test_parameters_given_twice_or_unknown_are_problems() -> None:
    assert problems(TOP, limit=["1", "2"]) == {"limit": "must be given once"}
    assert problems(KEYS, colour="red") == {"colour": "unknown parameter"}
    assert problems(AGGREGATES, key=[f"k{i}" for i in range(101)])["key"].startswith(
        "must be given at most 100"
    )


def test_tag_filters_need_a_tag_name_and_a_value() -> None:
    values, found = parse_args(AGGREGATES, MultiDict([("key", "k"), ("tag.region", "eu")]))
    assert values["tag.NAME"] == {"region": "eu"} and not found.items
    assert problems(AGGREGATES, key="k", **{"tag.region": ""}) == {
        "tag.region": "must not be empty"
    }
    assert problems(AGGREGATES, key="k", **{"tag.": "x"}) == {"tag.": "unknown parameter"}
    many = {f"tag.t{i}": "v" for i in range(17)}
    assert "at most 16" in problems(AGGREGATES, key="k", **many)["tag.NAME"]


def test_time_zones_are_names_not_paths() -> None:
    for text in ["America", "x" * 5000, "../etc/passwd", "/etc/localtime", "Mars/Olympus", ""]:
        assert "not an IANA time zone" in problems(AGGREGATES, key="k", tz=text)["tz"]
    assert problems(AGGREGATES, key="k", tz="America/Argentina/Buenos_Aires") == {}


def local(zone: str, *parts: int) -> str:
    """Unix seconds of a local time in ``zone``, as query text."""
    year, month, day, hour, minute, second = (*parts, 0, 0, 0)[:6]
    moment = datetime.datetime(
        year, month, day, hour, minute, second, tzinfo=zoneinfo.ZoneInfo(zone)
    )
    return str(moment.timestamp())


def calendar_query(granularity: str, zone: str, start: str, end: str) -> Query:
    args = [("key", "k"), ("granularity", granularity), ("tz", zone)]
    return parse_query(
        MultiDict([*args, ("from", start), ("to", end)]), bucket=60, now=0, budget=Budget()
    )


@pytest.mark.parametrize(
    ("granularity", "zone", "start", "end", "buckets"),
    [
        # 4,790 days were refused as "about 5000 day buckets, more than the 5000"
        ("day", "UTC", (2000, 1, 1), (2013, 2, 11), 4790),
        ("day", "Europe/Berlin", (2000, 1, 1), (2013, 2, 11), 4790),
        ("day", "America/New_York", (2000, 1, 1), (2013, 9, 9), 5000),
        ("day", "Europe/Berlin", (2000, 1, 1, 12), (2013, 9, 9, 12), 5001),
        ("week", "UTC", (2000, 1, 3), (2095, 10, 31), 5000),  # Mondays
        ("week", "Europe/Berlin", (2000, 1, 3), (2095, 11, 7), 5001),
        ("week", "Europe/Berlin", (2000, 1, 5), (2095, 10, 31), 5000),  # from a Wednesday
        ("week", "Europe/Berlin", (2000, 1, 3), (2095, 10, 31, 0, 1), 5001),
        ("month", "UTC", (2000, 1, 1), (2416, 9, 1), 5000),
        ("month", "Australia/Lord_Howe", (2000, 1, 1), (2416, 10, 1), 5001),
        ("month", "UTC", (2000, 1, 1), (2416, 9, 1, 0, 0, 1), 5001),  # a second into the next
    ],
)
def test_calendar_buckets_are_counted_exactly(
    granularity: str,
    zone: str,
    start: tuple[int, ...],
    end: tuple[int, ...],
    buckets: int,
) -> None:
    """At most 5,000 day, week or month buckets, counted exactly: the bound was an
    estimate, 4.4% high, whose refusals said "about 5000 ..., more than the 5000"."""
    limit = 5000  # the default budget's
    if buckets <= limit:
        query = calendar_query(granularity, zone, local(zone, *start), local(zone, *end))
        assert query.buckets_per_series == buckets
        return
    with pytest.raises(InvalidQuery) as refused:
        calendar_query(granularity, zone, local(zone, *start), local(zone, *end))
    assert refused.value.details == [
        {
            "parameter": "granularity",
            "message": f"the range holds {buckets} {granularity} buckets, more than the "
            f"{limit} day, week or month buckets a query may have: shorten the range or "
            "choose a coarser granularity",
        }
    ]


ZONES = ["UTC", "Europe/Berlin", "America/Moncton", "Australia/Lord_Howe", "Pacific/Apia"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    granularity=st.sampled_from(["day", "week", "month"]),
    zone=st.sampled_from(ZONES),
    start=st.integers(0, 2_000_000_000),
    length=st.integers(1, 3 * 365 * 86400),
)
def test_calendar_edges_are_the_fewest_covering_the_range(
    granularity: str, zone: str, start: int, length: int
) -> None:
    """The first bucket holds ``from``, the last one holds the moment before ``to``,
    and every edge is a local midnight: no bucket too many or too few."""
    query = calendar_query(granularity, zone, str(start), str(start + length))
    edges = query.boundaries
    assert edges[0] <= start < edges[1] and edges[-2] < start + length <= edges[-1]
    assert query.buckets_per_series == len(edges) - 1
    for edge in edges:
        moment = datetime.datetime.fromtimestamp(edge, zoneinfo.ZoneInfo(zone))
        assert moment.time() == datetime.time() or _in_a_gap_at_midnight(moment)


def _in_a_gap_at_midnight(moment: datetime.datetime) -> bool:
    """Where a clock skipped midnight, the day's edge is its first moment."""
    before = datetime.datetime.fromtimestamp(moment.timestamp() - 1, moment.tzinfo)
    return before.date() < moment.date()


def test_a_range_ending_in_an_hour_repeated_across_midnight_gets_its_last_day() -> None:
    """Moncton fell back from 1993-10-31 00:01 to 1993-10-30 23:01: the second 23:30 of
    the 30th comes after the 31st's midnight, so the last day bucket is the 31st."""
    zone = "America/Moncton"
    end = datetime.datetime(1993, 10, 30, 23, 30, fold=1, tzinfo=zoneinfo.ZoneInfo(zone))
    query = calendar_query("day", zone, local(zone, 1993, 10, 29), str(end.timestamp()))
    assert query.end == float(local(zone, 1993, 11, 1))
    assert query.buckets_per_series == 3


def test_fill_budget_counts_every_series() -> None:
    budget = Budget(answer_buckets=100_000)
    assert budget.fill_problem("zero", 100, 1000) is None
    trouble = budget.fill_problem("zero", 100, 1001)
    assert trouble is not None and "100 series x 1001 buckets" in trouble
    assert "fill=none" in trouble


def test_a_query_over_the_fill_budget_is_refused_by_parse_query() -> None:
    args = MultiDict(
        [
            *(("key", f"k{i}") for i in range(10)),
            ("fill", "null"),
            ("granularity", "hour"),
            ("from", "0"),
            ("to", str(1001 * 3600)),
        ]
    )
    with pytest.raises(InvalidQuery) as refused:
        parse_query(args, bucket=3600, now=0, budget=Budget(answer_buckets=10_000))
    assert refused.value.details[0]["parameter"] == "fill"
    assert parse_query(args, bucket=3600, now=0, budget=Budget(answer_buckets=10_010))


def test_the_widened_range_stays_before_year_10000() -> None:
    args = MultiDict(
        [("key", "k"), ("from", "9999-12-31T22:00:00Z"), ("to", "9999-12-31T23:30:00Z")]
    )
    with pytest.raises(InvalidQuery) as refused:
        parse_query(args, bucket=3600, now=0)
    assert "after 9999-12-31" in refused.value.details[0]["message"]
