"""Tiers over real HTTP, on the wall clock: a tiered server answers its rolled days at
the granularity every tier can serve, exactly; refuses a finer one naming the tier; takes
a late event into the tier holding its time; and refuses an event older than its
retention with a 422 naming the limit, counted in /metrics; with its days in a zone,
answers days in that zone and refuses them in another naming why."""

from __future__ import annotations

import datetime
import random
import zoneinfo
from typing import Any

import pytest

from . import clock
from .conftest import StartServer, assert_envelope, metric, post

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)

H = 3600
TIERS = "1m for 1d, 1h for 4d"  # the retention: 4 days


def truth(events: list[dict[str, Any]]) -> dict[int, tuple[int, float, float, float]]:
    hours: dict[int, list[float]] = {}
    for event in events:
        hours.setdefault(event["ts"] // H * H, []).append(event["value"])
    return {hour: (len(v), sum(v), min(v), max(v)) for hour, v in hours.items()}


async def test_a_tiered_server_answers_rolled_days_and_refuses_what_it_cannot(
    start_server: StartServer,
) -> None:
    server = await start_server(bucket="1m", tiers=TIERS)
    # Three whole past days, all within the retention: taken when the test runs, not when
    # its module was imported (a suite that crossed midnight meanwhile put the first
    # seconds of those days past the 4-day retention).
    day = clock.whole_days_ago(3)
    rng = random.Random()
    sent: list[dict[str, Any]] = [
        {"key": "orders", "ts": day + rng.randrange(3 * 86400), "value": rng.randrange(-50, 500)}
        for _ in range(3000)
    ]
    for at in range(0, len(sent), 1000):
        assert (await post(server.client, sent[at : at + 1000])).status_code == 200
    service = server.app.service
    await service.writers.flushed()
    # The roll at start found nothing and moved the marks to the horizons: these past
    # events were written straight into the tier holding their time.
    await service.store.roll_tiers()
    hours: dict[str, str | int] = {
        "key": "orders",
        "from": day,
        "to": day + 3 * 86400,
        "granularity": "hour",
    }
    got = (await server.client.get("/v1/aggregates", params=hours)).json()
    (series,) = got["results"]
    answered = {
        clock_seconds(b["start"]): (b["count"], b["sum"], b["min"], b["max"])
        for b in series["buckets"]
    }
    assert answered == truth(sent)
    top: dict[str, str | int] = {"from": day, "to": day + 3 * 86400, "stat": "sum"}
    ranked = (await server.client.get("/v1/top", params=top)).json()["results"]
    assert ranked == [{"key": "orders", "sum": sum(event["value"] for event in sent)}]
    # Minutes are gone from the rolled days: refused, naming the tier.
    minutes = {**hours, "granularity": "bucket"}
    refused = await server.client.get("/v1/aggregates", params=minutes)
    assert refused.status_code == 422
    assert_envelope(refused.json(), "invalid_query")
    (problem,) = refused.json()["error"]["details"]
    assert problem["parameter"] == "granularity"
    assert "its tier '1h for 4d' holds 1h buckets of data older than 1d" in problem["message"]
    # A late event in a rolled hour goes into that hour.
    late = {"key": "orders", "ts": day + 5 * H + 17, "value": 1000}
    assert (await post(server.client, late)).status_code == 200
    got = (await server.client.get("/v1/aggregates", params=hours)).json()
    (bucket,) = [
        b for b in got["results"][0]["buckets"] if clock_seconds(b["start"]) == day + 5 * H
    ]
    assert (bucket["count"], bucket["max"]) == (truth(sent)[day + 5 * H][0] + 1, 1000)
    # Older than the retention: 422 naming the limit, counted.
    old = {"key": "orders", "ts": clock.whole_days_ago(5), "value": 1}
    refused = await post(server.client, [old, late])
    assert refused.status_code == 422
    (problem,) = refused.json()["error"]["details"]
    assert problem["field"] == "ts" and problem["index"] == 0
    assert "is older than this store keeps anything" in problem["message"]
    assert problem["message"].endswith(", the retention of --tiers)")
    assert await metric(server, "trioagg_events_past_retention_total") == 1
    keys = (await server.client.get("/v1/keys")).json()
    assert keys["tiers"] == [{"width": "1m", "horizon": "1d"}, {"width": "1h", "horizon": "4d"}]
    assert [entry["key"] for entry in keys["keys"]] == ["orders"]


async def test_a_store_without_tiers_answers_as_before(start_server: StartServer) -> None:
    server = await start_server()
    day = clock.whole_days_ago(3)
    assert (await post(server.client, {"key": "k", "ts": day, "value": 1})).status_code == 200
    assert "tiers" not in (await server.client.get("/v1/keys")).json()
    long_ago = clock.whole_days_ago(5000)
    old = {"key": "k", "ts": long_ago, "value": 1}
    assert (await post(server.client, old)).status_code == 200  # kept for ever
    every: dict[str, str | int] = {"key": "k", "from": long_ago, "to": day + 60}
    got = (await server.client.get("/v1/aggregates", params={**every, "granularity": "all"})).json()
    assert got["results"][0]["buckets"][0]["count"] == 2
    assert await metric(server, "trioagg_tier_rows_rolled_total") >= 0


def clock_seconds(stamp: str) -> int:
    return int(datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())


async def test_a_process_told_less_than_another_rolled_refuses_rather_than_miscount(
    start_server: StartServer,
) -> None:
    # Two processes of one store during a change of horizons: the first keeps minutes
    # for two days, the second, started after it, for one, and rolls further.
    first = await start_server(bucket="1m", tiers="1m for 2d, 1h for 4d")
    await start_server(bucket="1m", tiers="1m for 1d, 1h for 4d")  # rolls at start
    hour = clock.whole_hours_ago(36)
    event = {"key": "orders", "ts": hour + 60, "value": 1}
    assert (await post(first.client, event)).status_code == 200
    await first.app.service.writers.flushed()
    minutes: dict[str, str | int] = {
        "key": "orders",
        "from": hour,
        "to": hour + H,
        "granularity": "bucket",
    }
    refused = await first.client.get("/v1/aggregates", params=minutes)
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["error"]["details"]
    assert problem["message"].startswith("the store holds a 1h bucket from ")
    assert "rolled its tiers further than this one expected" in problem["message"]
    hours = {**minutes, "granularity": "hour"}
    got = (await first.client.get("/v1/aggregates", params=hours)).json()
    assert got["results"][0]["buckets"][0]["count"] == 1


async def test_local_days_answer_in_their_zone_and_refuse_another(
    start_server: StartServer,
) -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    tiers = "1m for 1d, 1h for 2d, 1d in Europe/Paris forever"
    server = await start_server(bucket="1m", tiers=tiers)
    rng = random.Random()
    first = clock.whole_days_ago(6)
    sent: list[dict[str, Any]] = [
        {"key": "orders", "ts": first + rng.randrange(5 * 86400), "value": rng.randrange(-50, 500)}
        for _ in range(2000)
    ]
    assert (await post(server.client, sent[:1000])).status_code == 200
    assert (await post(server.client, sent[1000:])).status_code == 200
    await server.app.service.writers.flushed()
    await server.app.service.store.roll_tiers()
    by_day: dict[str, int] = {}
    for event in sent:
        day = datetime.datetime.fromtimestamp(event["ts"], paris).date()
        start = datetime.datetime.combine(day, datetime.time(), paris).astimezone(datetime.UTC)
        stamp = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        by_day[stamp] = by_day.get(stamp, 0) + 1
    days: dict[str, str | int] = {
        "key": "orders",
        "from": first,
        "to": first + 5 * 86400,
        "granularity": "day",
        "tz": "Europe/Paris",
    }
    got = await server.client.get("/v1/aggregates", params=days)
    assert got.status_code == 200, got.text
    (series,) = got.json()["results"]
    assert {b["start"]: b["count"] for b in series["buckets"]} == by_day
    refused = await server.client.get("/v1/aggregates", params={**days, "tz": "UTC"})
    assert refused.status_code == 422
    assert_envelope(refused.json(), "invalid_query")
    (problem,) = refused.json()["error"]["details"]
    assert problem["parameter"] == "tz"
    assert problem["message"].startswith("day buckets in UTC cut the days this store keeps")
    assert (
        "its tier '1d in Europe/Paris forever' holds days of Europe/Paris" in (problem["message"])
    )
    assert "ask with tz=Europe/Paris" in problem["message"]
    keys = (await server.client.get("/v1/keys")).json()
    assert keys["tiers"][-1] == {"width": "1d", "horizon": "forever", "zone": "Europe/Paris"}
