"""GET /v1/aggregates over real HTTP: ranges, granularities, tags, group_by, stats, errors.
The tables of invalid and hostile queries (of /v1/keys and /v1/top too) run against the
parsers themselves; one request of each endpoint keeps the wiring honest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from werkzeug.datastructures import MultiDict

from trioagg.core.errors import InvalidQuery
from trioagg.core.settings import Settings
from trioagg.core.times import rfc3339
from trioagg.query.aggregates import ParsedQueries, is_timeless, parse_query
from trioagg.query.discovery import parse_keys_query, parse_top_query

from . import clock
from .conftest import Server, StartServer, assert_envelope, post

HOUR = 3600
# Three whole past days: the longest span sent here is 3,000 minutes (50 hours).
DAY = clock.whole_days_ago(3)
#: The bucket width of a server with the default settings.
BUCKET = Settings().bucket
#: The receive time of the queries parsed here without a server: fixed.
PARSED_AT = 1_800_000_000.0


async def aggregates(server: Server, **params: Any) -> Any:
    response = await server.client.get("/v1/aggregates", params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
async def loaded(server: Server) -> Server:
    events = [
        {"key": "pay", "ts": DAY + 10, "value": 10, "tags": {"region": "eu", "plan": "pro"}},
        {"key": "pay", "ts": DAY + 20, "value": 20, "tags": {"region": "us", "plan": "pro"}},
        {"key": "pay", "ts": DAY + HOUR + 5, "value": 30, "tags": {"region": "eu"}},
        {"key": "pay", "ts": DAY + 86400 + 1, "value": 40, "tags": {"region": "eu"}},
        {"key": "pay", "ts": DAY + 86400 + 2, "value": 50},
        {"key": "signup", "ts": DAY + 30, "value": 1},
    ]
    assert (await post(server.client, events)).status_code == 200
    return server


async def test_hourly_default_stats(loaded: Server) -> None:
    doc = await aggregates(loaded, key="pay", **{"from": DAY, "to": DAY + 2 * HOUR})
    assert doc["granularity"] == "hour" and doc["tz"] == "UTC"
    (result,) = doc["results"]
    assert result["key"] == "pay" and result["tags"] == {}
    assert [b["count"] for b in result["buckets"]] == [2, 1]
    assert result["buckets"][0] == {
        "start": doc["from"],
        "count": 2,
        "sum": 30.0,
        "min": 10.0,
        "max": 20.0,
        "avg": 15.0,
    }


async def test_day_and_all_merge_exactly(loaded: Server) -> None:
    span = {"from": DAY, "to": DAY + 2 * 86400}
    doc = await aggregates(loaded, key="pay", granularity="day", stats="count,sum,stddev", **span)
    buckets = doc["results"][0]["buckets"]
    assert [(b["count"], b["sum"]) for b in buckets] == [(3, 60.0), (2, 90.0)]
    assert buckets[0]["stddev"] == pytest.approx(8.16496580927726)
    doc = await aggregates(loaded, key="pay", granularity="all", stats="count,min,max,avg", **span)
    assert doc["results"][0]["buckets"] == [
        {"start": doc["from"], "count": 5, "min": 10.0, "max": 50.0, "avg": 30.0}
    ]


async def test_native_bucket_granularity(start_server: StartServer) -> None:
    server = await start_server(bucket="5m")
    await post(server.client, [{"key": "k", "ts": DAY + s} for s in (0, 299, 300, 900)])
    doc = await aggregates(server, key="k", granularity="bucket", **{"from": DAY, "to": DAY + HOUR})
    starts = [b["start"][11:16] for b in doc["results"][0]["buckets"]]
    assert starts == ["00:00", "00:05", "00:15"]
    assert [b["count"] for b in doc["results"][0]["buckets"]] == [2, 1, 1]


async def test_range_is_bucket_aligned_and_echoed(loaded: Server) -> None:
    doc = await aggregates(loaded, key="pay", **{"from": DAY + 1800, "to": DAY + 5400})
    assert doc["from"].endswith("T00:00:00Z") and doc["to"].endswith("T02:00:00Z")
    rfc = await aggregates(loaded, key="pay", **{"from": doc["from"], "to": doc["to"]})
    assert rfc == doc


async def test_tag_filters_and_group_by(loaded: Server) -> None:
    span = {"from": DAY, "to": DAY + 2 * 86400, "granularity": "all", "stats": "count,sum"}
    doc = await aggregates(loaded, key="pay", **{"tag.region": "eu"}, **span)
    assert doc["results"] == [
        {
            "key": "pay",
            "tags": {"region": "eu"},
            "buckets": [{"start": doc["from"], "count": 3, "sum": 80.0}],
        }
    ]
    doc = await aggregates(loaded, key="pay", **{"tag.region": "eu", "tag.plan": "pro"}, **span)
    assert doc["results"][0]["buckets"][0]["count"] == 1
    doc = await aggregates(loaded, key="pay", group_by="region", **span)
    assert [(r["tags"], r["buckets"][0]["count"]) for r in doc["results"]] == [
        ({"region": "eu"}, 3),
        ({"region": "us"}, 1),
        ({}, 1),
    ]


async def test_several_keys_and_missing_keys(loaded: Server) -> None:
    doc = await aggregates(
        loaded,
        key=["signup", "pay", "nothing"],
        granularity="all",
        stats="count",
        **{"from": DAY, "to": DAY + 2 * 86400},
    )
    assert [(r["key"], [b["count"] for b in r["buckets"]]) for r in doc["results"]] == [
        ("signup", [1]),
        ("pay", [5]),
        ("nothing", []),
    ]


async def test_default_range_is_the_last_24_hours(server: Server) -> None:
    now = clock.now()
    await post(server.client, [{"key": "recent"}, {"key": "recent", "ts": now - 30 * HOUR}])
    doc = await aggregates(server, key="recent", granularity="all", stats="count")
    assert doc["results"][0]["buckets"][0]["count"] == 1
    assert doc["to"] > doc["from"]


# (parameters, a parameter a problem names)
INVALID: list[tuple[dict[str, Any], str]] = [
    ({}, "key"),
    ({"key": "k", "granularity": "fortnight"}, "granularity"),
    ({"key": "k", "stats": "count,median"}, "stats"),
    ({"key": "k", "from": "2026-11-24T00:00:00"}, "from"),
    ({"key": "k", "to": "soon"}, "to"),
    ({"key": "k", "from": "200", "to": "100"}, "from"),
    ({"key": "k", "colour": "red"}, "colour"),
    ({"key": [f"k{i}" for i in range(101)]}, "key"),
]


def refusal(path: str, params: dict[str, Any]) -> InvalidQuery:
    """What the parser of ``path`` raises for ``params``, as a default server parses them."""
    args = MultiDict(params)
    with pytest.raises(InvalidQuery) as caught:
        if path == "/v1/aggregates":
            parse_query(args, bucket=BUCKET, now=PARSED_AT)
        elif path == "/v1/keys":
            parse_keys_query(args)
        else:
            parse_top_query(args, bucket=BUCKET, now=PARSED_AT)
    error = caught.value
    assert error.status == 422
    assert_envelope(json.loads(error.body()), "invalid_query")
    return error


@pytest.mark.parametrize(("params", "parameter"), INVALID)
def test_invalid_queries_name_the_parameter(params: dict[str, Any], parameter: str) -> None:
    error = refusal("/v1/aggregates", params)
    assert parameter in [d["parameter"] for d in error.details]


async def test_every_problem_of_a_query_is_listed(server: Server) -> None:
    """The wiring of the tables here: an invalid query is a 422 in the envelope."""
    response = await server.client.get(
        "/v1/aggregates", params={"granularity": "x", "stats": "nope", "to": "soon"}
    )
    assert response.status_code == 422
    assert_envelope(response.json(), "invalid_query")
    parameters = {d["parameter"] for d in response.json()["error"]["details"]}
    assert parameters == {"key", "granularity", "stats", "to"}


HOSTILE = [
    {"key": "k", "from": "nan"},
    {"key": "k", "from": "-inf"},
    {"key": "k", "from": "-1e20"},
    {"key": "k", "from": "0", "to": "1e300", "granularity": "bucket"},
    {"key": "k", "from": "0", "to": "2e11", "granularity": "day"},
    {"key": "k", "from": "0", "to": "9999-12-31T23:00:00Z", "granularity": "day"},
    {
        "key": "k",
        "from": "9999-12-30T00:00:00Z",
        "to": "9999-12-31T23:00:00+00:00",
        "granularity": "month",
    },
    {"key": "k", "from": "0001-01-01T00:00:00Z", "granularity": "day"},
    {"key": "k", "tz": "America"},
    {"key": "k", "tz": "x" * 5000},
    {"key": "k", "tz": "../../etc/passwd"},
    {"key": "k", "tag.region": ""},
    {"key": "k", "from": "\u0661\u0662"},  # Arabic-Indic digits, which float() would take
    {"key": "k", "from": "1764000000000"},  # epoch milliseconds
    {"key": "k", "from": "1" * 5000},
    {"key": "k", "stats": "p\u0665"},
    {"key": "k", "granularity": "hour", "fill": "zero", "from": "0", "to": "1e9"},
]


@pytest.mark.parametrize("params", HOSTILE)
def test_hostile_aggregates_queries_are_422(params: dict[str, str]) -> None:
    refusal("/v1/aggregates", params)


# (endpoint, parameters, the parameter its first problem names)
DISCOVERY_REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/keys", {"limit": "²"}, "limit"),
    ("/v1/keys", {"limit": "1" * 5000}, "limit"),
    ("/v1/keys", {"limit": "\u0663"}, "limit"),
    ("/v1/keys", {"limit": "0"}, "limit"),
    ("/v1/keys", {"prefix": "p" * 300}, "prefix"),
    ("/v1/keys", {"limit": ["1", "2"]}, "limit"),
    ("/v1/keys", {"colour": "red"}, "colour"),
    ("/v1/top", {"limit": "²"}, "limit"),
    ("/v1/top", {"from": "0", "to": "1e100"}, "to"),
    ("/v1/top", {"from": ""}, "from"),
    ("/v1/top", {"from": "-1"}, "from"),
    ("/v1/top", {"to": "9999-12-31T23:59:59Z"}, "to"),  # widened past 9999
    ("/v1/top", {"stat": "median"}, "stat"),
    ("/v1/top", {"from": "later"}, "from"),
]


@pytest.mark.parametrize(("path", "params", "parameter"), DISCOVERY_REFUSED)
def test_hostile_discovery_queries_are_422(
    path: str, params: dict[str, Any], parameter: str
) -> None:
    assert refusal(path, params).details[0]["parameter"] == parameter


async def test_discovery_errors_are_422_naming_the_parameter(server: Server) -> None:
    """The wiring of the table above, on each endpoint it covers."""
    for path, params, parameter in [
        ("/v1/keys", {"limit": "0"}, "limit"),
        ("/v1/top", {"stat": "median"}, "stat"),
    ]:
        response = await server.client.get(path, params=params)
        assert response.status_code == 422, response.text
        assert_envelope(response.json(), "invalid_query")
        assert response.json()["error"]["details"][0]["parameter"] == parameter


async def test_epoch_milliseconds_are_refused_with_grafana_advice(server: Server) -> None:
    response = await server.client.get(
        "/v1/aggregates", params={"key": "k", "from": "1764000000000", "to": "1764003600000"}
    )
    assert response.status_code == 422
    messages = [d["message"] for d in response.json()["error"]["details"]]
    assert len(messages) == 2
    assert all("milliseconds" in m and "${__from:date:seconds}" in m for m in messages)


async def test_fill_over_the_answer_budget_is_refused_before_reading(server: Server) -> None:
    # 100 keys x 1,441 hourly buckets = 144,100 buckets > 100,000, refused up front
    params: dict[str, Any] = {
        "key": [f"k{i}" for i in range(100)],
        "fill": "zero",
        "from": DAY - 60 * 86400,
        "to": DAY,
    }
    response = await server.client.get("/v1/aggregates", params=params)
    assert response.status_code == 422
    (detail,) = response.json()["error"]["details"]
    assert detail["parameter"] == "fill" and "100 series x 1440 buckets" in detail["message"]


async def test_rows_over_the_budget_are_refused(loaded: Server) -> None:
    from trioagg.query.budget import Budget

    loaded.app.budget = Budget(rows=3)
    span = {"from": DAY, "to": DAY + 2 * 86400}
    response = await loaded.client.get("/v1/aggregates", params={"key": "pay", **span})
    assert response.status_code == 422
    assert "more than the 3 rows" in response.json()["error"]["details"][0]["message"]
    doc = await aggregates(loaded, key="signup", **span)  # one row: within the budget
    assert doc["results"][0]["buckets"][0]["count"] == 1


async def test_group_by_with_fill_is_bounded_by_series_times_buckets(loaded: Server) -> None:
    from trioagg.query.budget import Budget

    loaded.app.budget = Budget(answer_buckets=100)
    span: dict[str, Any] = {
        "from": DAY,
        "to": DAY + 2 * 86400,
        "fill": "zero",
        "group_by": "region",
    }
    # 48 hourly buckets: one series fits, the three series of pay (eu, us, none) do not
    doc = await aggregates(loaded, key="signup", **span)
    assert len(doc["results"][0]["buckets"]) == 48
    response = await loaded.client.get("/v1/aggregates", params={"key": "pay", **span})
    assert response.status_code == 422
    assert "3 series x 48 buckets" in response.json()["error"]["details"][0]["message"]


async def test_answers_past_the_inline_size_are_whole(start_server: StartServer) -> None:
    server = await start_server(bucket="1m")
    events = [{"key": "k", "ts": DAY + 60 * i, "tags": {"n": str(i % 7)}} for i in range(3000)]
    assert (await post(server.client, events)).status_code == 200
    span = {"from": DAY, "to": DAY + 3000 * 60, "granularity": "bucket", "stats": "count"}
    doc = await aggregates(server, key="k", **span)
    assert sum(b["count"] for b in doc["results"][0]["buckets"]) == 3000


async def test_keys_of_many_series_are_listed_whole(server: Server) -> None:
    events = [{"key": "wide", "ts": DAY, "tags": {"n": str(i)}} for i in range(2500)]
    assert (await post(server.client, events)).status_code == 200
    response = await server.client.get("/v1/keys", params={"prefix": "wide"})
    assert response.json()["keys"] == [
        {
            "key": "wide",
            "tags": ["n"],
            "first": response.json()["keys"][0]["first"],
            "last": response.json()["keys"][0]["first"],
            "series": 2500,
        }
    ]


def test_only_queries_with_both_ends_mean_the_same_whenever_asked() -> None:
    assert is_timeless(MultiDict([("key", "k"), ("from", "1"), ("to", "2")]))
    assert not is_timeless(MultiDict([("key", "k"), ("from", "1")]))  # to: now
    assert not is_timeless(MultiDict([("key", "k"), ("to", "2")]))  # from: to - 24 h
    assert not is_timeless(MultiDict([("key", "k")]))


def test_parsed_queries_are_kept_by_context_and_bounded() -> None:
    parsed: ParsedQueries[str] = ParsedQueries(entries=2, longest=8)
    parsed.put(b"q=1", "acme", "acme's")
    parsed.put(b"q=1", None, "no tenant's")
    assert (parsed.get(b"q=1", "acme"), parsed.get(b"q=1", None)) == ("acme's", "no tenant's")
    assert parsed.get(b"q=1", "globex") is None
    parsed.put(b"q=2", None, "second")  # full: the oldest put goes
    assert parsed.get(b"q=1", "acme") is None and len(parsed) == 2
    parsed.put(b"q=123456789", None, "long")  # longer than longest: never kept
    assert parsed.get(b"q=123456789", None) is None and len(parsed) == 2
    parsed.put(b"q=3", None, "large", size=101)  # holds more than largest: never kept
    assert parsed.get(b"q=3", None) is None
    parsed.put(b"q=4", None, "small", size=100)
    assert parsed.get(b"q=4", None) == "small"


def test_only_queries_holding_few_edges_are_kept_parsed() -> None:
    """A calendar query holds its edges as a list (a day's over 13 years: 4,688 of
    them, ~190 KB): such entries made 2,048 kept queries weigh ~400 MB."""
    days = parse_query(
        MultiDict(
            [
                ("key", "k"),
                ("granularity", "day"),
                ("from", "1990-01-01T00:00:00Z"),
                ("to", "2002-11-01T00:00:00Z"),
            ]
        ),
        bucket=3600,
        now=PARSED_AT,
    )
    hours = parse_query(
        MultiDict([("key", "k"), ("from", "0"), ("to", str(3600 * 24 * 365))]),
        bucket=3600,
        now=PARSED_AT,
    )
    assert days.edges_held == 4688 and hours.edges_held == 0
    assert days.edges_held > ParsedQueries().largest


def test_answers_write_buckets_before_1970_as_rfc3339() -> None:
    """The week holding 1970-01-01 starts on 1969-12-29: still a date-time."""
    assert rfc3339(-259200) == "1969-12-29T00:00:00Z"
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1_764_000_000) == "2025-11-24T16:00:00Z"
