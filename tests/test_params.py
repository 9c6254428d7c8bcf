"""Query parameters and the query budget as pure functions: times, limits, tables, sums."""

from __future__ import annotations

import pytest
from werkzeug.datastructures import MultiDict

from trioagg.budget import Budget
from trioagg.errors import InvalidQuery
from trioagg.params import AGGREGATES, KEYS, TOP, parse_args
from trioagg.query import parse_query
from trioagg.times import LATEST, parse_time


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


@pytest.mark.parametrize(
    ("granularity", "days", "refused"),
    [("day", 4000, False), ("day", 5000, True), ("week", 30_000, False), ("month", 140_000, True)],
)
def test_calendar_edges_are_bounded_before_any_is_computed(
    granularity: str, days: int, refused: bool
) -> None:
    budget = Budget(calendar_edges=5000)
    trouble = budget.calendar_problem(granularity, 0, days * 86400)
    assert (trouble is not None) == refused
    if refused:
        assert trouble is not None and "coarser granularity" in trouble


def test_the_calendar_bound_is_never_below_the_true_edge_count() -> None:
    budget = Budget(calendar_edges=10**9)
    for granularity, days in [("day", 400), ("week", 3000), ("month", 3000)]:
        args = MultiDict(
            [
                ("key", "k"),
                ("granularity", granularity),
                ("tz", "Europe/Berlin"),
                ("from", "0"),
                ("to", str(days * 86400)),
            ]
        )
        edges = len(parse_query(args, bucket=3600, now=0, budget=budget).boundaries)
        assert (
            edges
            <= int(days * 86400 // {"day": 82800, "week": 601200, "month": 2415600}[granularity])
            + 3
        )


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
