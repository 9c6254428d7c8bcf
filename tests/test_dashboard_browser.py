"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright,
against a real ``trioagg serve`` holding data. What the page draws must be what the
API answers for the same choice, and what the page's address says must be the view.

One server and one browser serve the whole module; each test has a fresh browser
context (no shared storage), in the Europe/Berlin zone, and fails on any error the
page logs (a script error, a request the page's Content-Security-Policy blocked, a
failed request) but the 422 answers the page asks for and shows.
"""

from __future__ import annotations

import calendar
import contextlib
import fnmatch
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from . import clock
from .conftest import ServerProcess

DAY = clock.whole_days_ago(3)
FROM = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(DAY))
TO = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(DAY + 86400))
RANGE = f"range=custom&from={FROM}&to={TO}"
HOSTILE = '<img src=x onerror="window.pwned=1">'
ZONE = "Europe/Berlin"


def _events() -> list[dict[str, Any]]:
    """Orders by region (3) and plan (2) every hour of DAY but 05:00 and 06:00 (a gap), visits
    without tags, latencies with quantiles, 60 keys to page through, a hostile key."""
    events: list[dict[str, Any]] = []
    for hour in range(24):
        if hour in (5, 6):
            continue
        for n in range(1 + hour % 4):
            region = ("eu", "us", "apac")[(hour + n) % 3]
            plan = "pro" if n % 2 else "free"
            events.append(
                {
                    "key": "shop.orders",
                    "ts": DAY + hour * 3600 + n * 60,
                    "value": 10 + hour + 2.5 * n,
                    "tags": {"region": region, "plan": plan},
                }
            )
        events.append({"key": "shop.visits", "ts": DAY + hour * 3600, "value": hour})
        events.append({"key": "api.latency", "ts": DAY + hour * 3600 + 1, "value": 5 * hour})
    events += [{"key": f"bulk.{n:03}", "ts": DAY + 60} for n in range(60)]
    events.append({"key": HOSTILE, "ts": DAY + 120, "tags": {"who": "<b>bold</b>"}})
    return events


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder: Path = tmp_path_factory.mktemp("dashboard")
    process = ServerProcess(
        folder / "trioagg.db", "--quantiles", "api.*", "--log-level", "warning"
    ).start()
    assert process.url, process.output
    response = httpx.post(f"{process.url}/v1/events", json=_events(), timeout=30)
    assert response.status_code == 200, response.text
    yield process
    process.stop()


@pytest.fixture
def page(browser: Any, site: ServerProcess) -> Iterator[Any]:
    with _page_of(browser, site) as opened:
        yield opened


@contextlib.contextmanager
def _page_of(browser: Any, site: ServerProcess) -> Iterator[Any]:
    """A page of ``site`` in a fresh browser context, failing on any error it logs."""
    context = browser.new_context(
        base_url=site.url,
        timezone_id=ZONE,
        locale="en-US",
        viewport={"width": 1280, "height": 900},
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
    context.set_default_timeout(10_000)
    opened = context.new_page()
    problems: list[str] = []
    refused = "the server responded with a status of 422"  # the API's answers, shown

    def logged(message: Any) -> None:
        if message.type == "error" and refused not in message.text:
            problems.append(message.text)

    opened.on("console", logged)
    opened.on("pageerror", lambda error: problems.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not problems, problems


def api(site: ServerProcess, path: str, params: list[tuple[str, str]]) -> Any:
    return httpx.get(f"{site.url}{path}", params=tuple(params), timeout=30)


def settle(page: Any, loads: int = 1) -> None:
    """Wait until the chart has loaded ``loads`` times since the page opened, and no
    request of the page is still going on."""
    page.wait_for_function(
        "n => window.dashboard && window.dashboard.loads >= n && !document.body.ariaBusy", arg=loads
    )


def loads(page: Any) -> int:
    return int(page.evaluate("() => window.dashboard.loads"))


def choose(page: Any, action: Any) -> None:
    """Do something that asks for a new chart, and wait for it."""
    before = loads(page)
    action()
    settle(page, before + 1)


def plotted(page: Any) -> dict[str, Any]:
    """What the chart draws: its series' labels and its columns (x in seconds)."""
    drawn: dict[str, Any] = page.evaluate(
        """() => {
            const chart = window.dashboard.chart;
            return {labels: chart.series.slice(1).map(s => s.label), data: chart.data};
        }"""
    )
    return drawn


def drawn_from(answer: dict[str, Any], stats: list[str], label: Any) -> dict[str, Any]:
    """The chart an answer should give: x the union of bucket starts, one column per
    result and stat, null where a result has no such bucket."""
    starts = sorted(
        {_seconds(bucket["start"]) for result in answer["results"] for bucket in result["buckets"]}
    )
    labels: list[Any] = []
    data: list[list[Any]] = [starts]
    for result in answer["results"]:
        buckets = {_seconds(bucket["start"]): bucket for bucket in result["buckets"]}
        for stat in stats:
            labels.append(label(result, stat))
            data.append([buckets[x].get(stat) if x in buckets else None for x in starts])
    return {"labels": labels, "data": data}


def _seconds(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def curl_params(page: Any) -> list[tuple[str, str]]:
    """The parameters of the page's "copy as curl" command."""
    command = page.locator("#curl").text_content()
    url = re.fullmatch(r"curl -s '([^']+)'", command)
    assert url is not None, command
    return parse_qsl(urlsplit(url[1]).query)


def test_keys_are_listed_paged_and_searched(page: Any, site: ServerProcess) -> None:
    page.goto(f"/?{RANGE}")
    keys = page.locator("#keys button")
    keys.nth(49).wait_for()
    assert keys.count() == 50
    first = keys.first
    assert first.locator(".name").text_content() == HOSTILE  # as text, not as HTML
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("#keys img").count() == 0
    page.click("#more-keys")
    keys.nth(63).wait_for()
    assert keys.count() == 64
    assert page.locator("#more-keys").is_hidden()

    page.fill("#search", "shop.")
    page.wait_for_function("() => document.querySelectorAll('#keys button').length === 2")
    orders = page.locator("#keys button", has_text="shop.orders")
    assert orders.locator(".tag").all_text_contents() == ["plan", "region"]
    assert "6 series" in orders.text_content()
    assert "prefix=shop." in page.url

    top = page.locator("#top button")
    top.nth(1).wait_for()
    assert top.locator(".name").all_text_contents() == ["shop.orders", "shop.visits"]
    asked = [("from", FROM), ("to", TO), ("prefix", "shop.")]
    expected = api(site, "/v1/top", asked).json()["results"]
    assert top.first.locator(".value").text_content() == str(expected[0]["count"])

    page.select_option("#top-stat", "sum")
    by_sum = api(site, "/v1/top", [*asked, ("stat", "sum")]).json()["results"]
    shown = [f"{item['key']}{item['sum']:,g}" for item in by_sum]
    page.wait_for_function(
        "shown => [...document.querySelectorAll('#top button')].map(b => b.textContent)"
        ".join() === shown.join()",
        arg=shown,
    )


def test_a_picked_key_is_drawn_as_the_api_answers_it(page: Any, site: ServerProcess) -> None:
    page.goto(f"/?{RANGE}")
    settle(page, 0)
    page.fill("#search", "shop.o")
    choose(page, lambda: page.click("#keys button:has-text('shop.orders')"))
    params = [
        ("key", "shop.orders"),
        ("from", FROM),
        ("to", TO),
        ("granularity", "hour"),  # auto: a day's range, hourly
        ("tz", ZONE),  # the browser's zone
        ("fill", "null"),
        ("stats", "count,avg,min,max"),
    ]
    assert curl_params(page) == params
    answer = api(site, "/v1/aggregates", params).json()
    assert page.evaluate("() => window.dashboard.answer") == answer
    assert plotted(page) == drawn_from(answer, ["count", "avg", "min", "max"], lambda r, s: s)
    counts = plotted(page)["data"][1]
    assert len(counts) == 24 and counts[5] == counts[6] == 0  # the empty hours, as the API says
    assert plotted(page)["data"][2][5] is None  # drawn as a gap

    page.click("#copy-curl")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied == page.locator("#curl").text_content()


def test_missing_buckets_break_the_line(page: Any, site: ServerProcess) -> None:
    """fill=none leaves empty buckets out of the answer: the line breaks there."""
    page.goto(f"/?{RANGE}&key=shop.orders&stats=count&fill=none")
    settle(page)
    answer = page.evaluate("() => window.dashboard.answer")
    assert len(answer["results"][0]["buckets"]) == 22  # 05:00 and 06:00 have no events
    xs, counts = plotted(page)["data"]
    assert xs[5] == DAY + 5 * 3600 and counts[5] is None
    assert xs[6] == DAY + 7 * 3600 and counts[6] == 4
    assert len(xs) == 23


def by_region(answer: dict[str, Any], stats: list[str]) -> dict[str, Any]:
    return drawn_from(answer, stats, lambda r, s: f"region={r['tags']['region']} · {s}")


def test_group_by_draws_one_line_per_group(page: Any, site: ServerProcess) -> None:
    """The default stats (count, avg, min/max) grouped by a tag of 3 values: 3 lines, of
    the first stat; the stats become a choice of one."""
    page.goto(f"/?{RANGE}&key=shop.orders&tz=UTC")
    settle(page)
    assert plotted(page)["labels"] == ["count", "avg", "min", "max"]
    choose(page, lambda: page.select_option("#group-by", "region"))
    assert dict(curl_params(page))["stats"] == "count"
    answer = api(site, "/v1/aggregates", curl_params(page)).json()
    assert plotted(page) == by_region(answer, ["count"])
    assert plotted(page)["labels"] == [f"region={r} · count" for r in ("apac", "eu", "us")]
    assert page.locator("[data-stat=count]").get_attribute("type") == "radio"
    assert page.is_visible("#one-stat")

    choose(page, lambda: page.check("[data-stat=sum]"))
    assert not page.is_checked("[data-stat=count]")
    answer = api(site, "/v1/aggregates", curl_params(page)).json()
    assert plotted(page) == by_region(answer, ["sum"])
    choose(page, lambda: page.check("[data-stat='min,max']"))  # a band per group
    assert dict(curl_params(page))["stats"] == "min,max"
    assert len(plotted(page)["labels"]) == 6

    page.select_option("#filter-tag", "region")
    page.fill("#filter-value", "us")
    choose(page, lambda: page.click("#add-filter"))
    assert ("tag.region", "us") in curl_params(page)
    assert "tag.region=us" in page.url
    answer = api(site, "/v1/aggregates", curl_params(page)).json()
    assert [result["tags"] for result in answer["results"]] == [{"region": "us"}]
    assert plotted(page) == drawn_from(answer, ["min", "max"], lambda r, s: s)
    assert page.locator("#filters .chip").text_content().startswith("region = us")

    choose(page, lambda: page.click("#filters .remove"))
    choose(page, lambda: page.select_option("#group-by", ""))  # the stats are boxes again
    assert page.locator("[data-stat=count]").get_attribute("type") == "checkbox"
    choose(page, lambda: page.check("[data-stat=count]"))
    assert plotted(page)["labels"] == ["count", "min", "max"]


def test_the_axes_say_what_they_show(page: Any, site: ServerProcess) -> None:
    """The y-axes' labels (drawn on the canvas: read from the chart), counts on the left."""
    page.goto(f"/?{RANGE}&key=api.latency&stats=count,distinct,avg,p99")
    settle(page)
    labels = "() => window.dashboard.chart.axes.slice(1).map(axis => [axis.side, axis.label])"
    assert page.evaluate(labels) == [[3, "count, distinct"], [1, "value: avg, p99"]]
    choose(page, lambda: page.uncheck("[data-stat=count]"))
    assert page.evaluate(labels) == [[3, "distinct"], [1, "value: avg, p99"]]


def test_a_range_without_events_offers_the_keys_last(page: Any, site: ServerProcess) -> None:
    """The default range (the last 24 h) over events three days old: the page says so
    and jumps to the 24 h that end with the key's last bucket."""
    page.goto("/?key=shop.orders&tz=UTC")
    settle(page)
    page.locator("#elsewhere").wait_for()  # the key's first and last come on their own
    assert page.is_visible("#chart-empty-text")
    last = time.strftime("%Y-%m-%d %H:%M", time.gmtime(DAY + 23 * 3600))
    assert last in page.locator("#elsewhere-text").text_content()
    assert page.locator("#jump").text_content() == (
        f"Show {FROM[:10]} {FROM[11:16]} → {TO[:10]} {TO[11:16]}"
    )
    choose(page, lambda: page.click("#jump"))
    address = dict(parse_qsl(urlsplit(page.url).query))
    assert (address["range"], address["from"], address["to"]) == ("custom", FROM, TO)
    assert (dict(curl_params(page))["from"], dict(curl_params(page))["to"]) == (FROM, TO)
    assert page.is_hidden("#chart-empty")
    assert sum(plotted(page)["data"][1]) == len([e for e in _events() if e["key"] == "shop.orders"])

    # no events for a tag filter in a range that holds the last bucket: nothing to offer
    page.goto(f"/?{RANGE}&key=shop.orders&tag.region=nowhere")
    settle(page)
    assert page.is_visible("#chart-empty-text") and page.is_hidden("#elsewhere")


def test_the_address_reloads_the_same_view(page: Any, site: ServerProcess) -> None:
    page.goto(f"/?{RANGE}&key=shop.orders")
    settle(page)
    choose(page, lambda: page.select_option("#granularity", "day"))
    choose(page, lambda: page.select_option("#fill", "zero"))
    choose(page, lambda: page.check("[data-stat=sum]"))
    choose(page, lambda: page.uncheck("[data-stat='min,max']"))
    choose(page, lambda: page.select_option("#group-by", "plan"))
    choose(page, lambda: page.check("[data-stat=sum]"))
    choose(page, lambda: page.fill("#tz", "America/New_York") or page.press("#tz", "Enter"))
    view = page.evaluate("() => window.dashboard.request")
    drawn = plotted(page)
    assert dict(view)["tz"] == "America/New_York" and dict(view)["stats"] == "sum"
    assert drawn["labels"] == ["plan=free · sum", "plan=pro · sum"]

    again = page.context.new_page()
    again.goto(page.url)
    settle(again)
    assert again.evaluate("() => window.dashboard.request") == view
    assert plotted(again) == drawn
    assert again.input_value("#granularity") == "day"
    assert again.input_value("#tz") == "America/New_York"
    assert again.input_value("#group-by") == "plan"
    assert again.is_checked("[data-stat=sum]") and not again.is_checked("[data-stat='min,max']")


def test_an_invalid_range_shows_the_apis_error(page: Any, site: ServerProcess) -> None:
    page.goto(f"/?{RANGE}&key=shop.visits")
    settle(page)
    assert page.locator("#error").is_hidden()
    page.fill("#from", TO)
    page.fill("#to", FROM)
    choose(page, lambda: page.click("#apply-range"))
    refused = api(site, "/v1/aggregates", curl_params(page)).json()["error"]
    assert page.locator("#error").is_visible()
    assert page.locator("#error-title").text_content() == "The API answered 422 invalid_query"
    assert page.locator("#error-message").text_content() == refused["message"]
    details = page.locator("#error-details li").all_text_contents()
    assert details == [f"{d['parameter']} {d['message']}" for d in refused["details"]]
    assert page.evaluate("() => window.dashboard.chart") is None

    page.fill("#from", str((DAY - 86400) * 1000))  # epoch milliseconds, as Grafana sends
    page.fill("#to", TO)
    choose(page, lambda: page.press("#to", "Enter"))
    assert "looks like epoch milliseconds" in page.locator("#error-details").text_content()

    page.fill("#from", FROM)
    choose(page, lambda: page.click("#apply-range"))
    # The range also reloads the top list, whose 422 stays shown until its own answer,
    # which may come after the chart's.
    page.locator("#error").wait_for(state="hidden")


def test_percentiles_for_the_keys_that_keep_them(page: Any, site: ServerProcess) -> None:
    page.goto(f"/?{RANGE}&key=api.latency&stats=count")
    settle(page)
    assert page.is_enabled("#percentiles") and page.is_hidden("#quantiles-note")
    page.fill("#percentiles", "p50,p99")
    choose(page, lambda: page.press("#percentiles", "Enter"))
    answer = api(site, "/v1/aggregates", curl_params(page)).json()
    assert plotted(page) == drawn_from(answer, ["count", "p50", "p99"], lambda r, s: s)

    page.fill("#search", "shop.v")
    choose(page, lambda: page.click("#keys button:has-text('shop.visits')"))
    assert dict(curl_params(page))["stats"] == "count"  # not kept for this key: dropped
    assert page.is_disabled("#percentiles") and page.is_visible("#quantiles-note")

    page.goto(f"/?{RANGE}&key=shop.visits&stats=count,p99")  # as a shared link might say
    settle(page)
    assert "quantiles are not kept for shop.visits" in page.locator("#error").text_content()


def test_auto_refresh_keeps_the_view_and_health_shows(page: Any, site: ServerProcess) -> None:
    page.goto(f"/?{RANGE}&key=shop.visits&stats=count&granularity=day&live=1")
    settle(page)
    view = page.evaluate("() => window.dashboard.request")
    before = plotted(page)["data"][1][0]
    posted = httpx.post(f"{site.url}/v1/events", json={"key": "shop.visits", "ts": DAY + 7})
    assert posted.status_code == 200
    page.wait_for_function(
        "n => window.dashboard.chart.data[1][0] === n", arg=before + 1, timeout=5000
    )
    assert page.evaluate("() => window.dashboard.request") == view
    assert page.input_value("#live") == "1"

    status = httpx.get(f"{site.url}/v1/status").json()
    page.wait_for_function(
        "n => document.querySelector('#health-total').textContent === n",
        arg=f"{status['events_committed']:,} events",
        timeout=8000,
    )
    assert page.locator("#health-queue").text_content() == "0 / 1,024"
    assert page.locator("#health-commit").text_content().endswith(" ms")


def test_the_pages_own_logic(page: Any, site: ServerProcess) -> None:
    """The page's pure functions, run in the browser: globs as --quantiles reads them,
    auto granularity, the address's round trip."""
    page.goto(f"/?{RANGE}")
    settle(page, 0)
    module = page.evaluate(
        "() => document.querySelector('script[type=module]').src.replace('dashboard.js', "
        "'state.js')"
    )
    patterns = ["api.*", "db.?", "[ab]x", "[!a]y", "a.b", "*", "x[", "q[*]"]
    keys = ["api.latency", "db.1", "db.12", "ax", "cx", "ay", "by", "a.b", "aXb", "x[", "q*"]
    matches = page.evaluate(
        """async ([module, patterns, keys]) => {
            const state = await import(module);
            return patterns.map(p => keys.map(k => state.keepsQuantiles(k, [p])));
        }""",
        [module, patterns, keys],
    )
    assert matches == [[fnmatch.fnmatchcase(k, p) for k in keys] for p in patterns]

    chosen = page.evaluate(
        """async (module) => {
            const state = await import(module);
            const auto = {granularity: "auto"};
            return [
                state.chooseGranularity(auto, 3600, 60),
                state.chooseGranularity(auto, 86400, 60),
                state.chooseGranularity(auto, 30 * 86400, 3600),
                state.chooseGranularity(auto, 90 * 86400, 3600),
                state.chooseGranularity(auto, 40 * 365 * 86400, 3600),
                state.chooseGranularity(auto, null, 3600),
                state.chooseGranularity({granularity: "day"}, 3600, 3600),
            ];
        }""",
        module,
    )
    assert chosen == ["bucket", "hour", "hour", "day", "month", "hour", "day"]

    address = "key=a%26b&range=custom&from=1&to=2&granularity=week&tz=UTC&fill=zero&" + (
        "stats=count%2Cp99&group_by=x&tag.__proto__=1&tag.y=%3C%3E&top=sum&prefix=a&live=5"
    )
    again = page.evaluate(
        "async ([m, a]) => (await import(m)).writeState((await import(m)).readState(a))",
        [module, address],
    )
    assert again == address.replace("count%2Cp99", "count")  # grouped: one stat

    grouped = page.evaluate(
        """async (module) => {
            const state = await import(module);
            return ["", "stats=p99,count", "stats=max,avg,min", "stats=min,count"].map(
                (stats) => state.readState(`group_by=x&${stats}`).stats);
        }""",
        module,
    )
    assert grouped == [["count"], ["p99"], ["min", "max"], ["min"]]


@pytest.fixture(scope="module")
def locked_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server with auth on, holding the module's events, and a read key for the page."""
    from trioagg.core.settings import Settings
    from trioagg.keys.admin import create_key
    from trioagg.store import make_backend

    db = tmp_path_factory.mktemp("locked") / "trioagg.db"
    backend = make_backend(Settings(db=str(db)))
    viewer = create_key(backend, "viewer", ("read",))
    writer = create_key(backend, "writer", ("ingest",))
    process = ServerProcess(db, "--auth", "on", "--log-level", "warning").start()
    assert process.url, process.output
    response = httpx.post(
        f"{process.url}/v1/events",
        json=_events(),
        headers={"Authorization": f"Bearer {writer}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    yield process, viewer
    process.stop()


def test_the_page_sends_the_key_typed_in_its_header(
    browser: Any, locked_site: tuple[ServerProcess, str]
) -> None:
    site, viewer = locked_site
    context = browser.new_context(base_url=site.url, timezone_id=ZONE, locale="en-US")
    context.set_default_timeout(10_000)
    page = context.new_page()
    problems: list[str] = []
    refused = "the server responded with a status of 401"  # before the key is typed

    def logged(message: Any) -> None:
        if message.type == "error" and refused not in message.text:
            problems.append(message.text)

    page.on("console", logged)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(f"/?key=shop.orders&{RANGE}")
        page.locator("#error-title", has_text="401 unauthorized").wait_for()
        assert "API key field" in page.locator("#error-message").text_content()
        assert page.locator("#keys button").count() == 0

        page.fill("#api-key", viewer)
        page.press("#api-key", "Enter")
        page.locator("#keys button", has_text="api.latency").wait_for()
        page.wait_for_function("() => document.getElementById('error').hidden")
        settle(page)
        assert plotted(page)["data"][0]  # the chart has buckets
        assert page.evaluate("() => sessionStorage.getItem('trioagg.apiKey')") == viewer
        command = page.locator("#curl").text_content()
        assert '-H "Authorization: Bearer $TRIOAGG_API_KEY"' in command
        assert viewer not in command and viewer not in page.url

        page.reload()  # the tab keeps the key
        page.locator("#keys button", has_text="api.latency").wait_for()
        assert page.input_value("#api-key") == viewer
        other = context.new_page()  # sessionStorage is per tab: a new one has no key
        other.goto(f"/?{RANGE}")
        assert other.evaluate("() => sessionStorage.getItem('trioagg.apiKey')") is None
    finally:
        context.close()
    assert not problems, problems


TIERS = "1m for 1d, 1h for 2d, 1d in Europe/Paris forever"
PARIS_TIER = {"width": "1d", "horizon": "forever", "zone": "Europe/Paris"}


@pytest.fixture(scope="module")
def tiered_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose tiers keep minutes for a day, hours for two, then Paris's days,
    holding an event every hour of the past six days (each written into the tier that
    holds its time)."""
    db = tmp_path_factory.mktemp("tiered") / "trioagg.db"
    process = ServerProcess(
        db, "--bucket", "1m", "--tiers", TIERS, "--log-level", "warning"
    ).start()
    assert process.url, process.output
    first = clock.whole_days_ago(6)
    events = [
        {"key": "shop.orders", "ts": first + hour * 3600, "value": hour} for hour in range(144)
    ]
    response = httpx.post(f"{process.url}/v1/events", json=events, timeout=30)
    assert response.status_code == 200, response.text
    yield process
    process.stop()


def test_the_tiers_are_shown_and_auto_asks_what_they_can_answer(
    browser: Any, tiered_site: ServerProcess
) -> None:
    with _page_of(browser, tiered_site) as page:
        # Seven days in Paris reach its days: auto asks for days, not the hours it would
        # ask for without tiers, and draws the API's answer.
        page.goto("/?key=shop.orders&range=7d&granularity=auto&tz=Europe/Paris&stats=count")
        settle(page)
        tiers = page.locator("#tiers li")
        assert tiers.all_text_contents() == ["1m for 1d", "1h for 2d", "1d in Europe/Paris forever"]
        assert tiers.nth(0).get_attribute("title") == (
            "1m buckets kept for 1d, then merged into 1h buckets"
        )
        assert tiers.nth(2).get_attribute("title") == "1d buckets kept for ever"
        request = dict(page.evaluate("() => window.dashboard.request"))
        assert request["granularity"] == "day"
        assert page.locator("#error").is_hidden()
        answer = api(tiered_site, "/v1/aggregates", list(request.items())).json()
        assert page.evaluate("() => window.dashboard.answer") == answer
        assert sum(b["count"] or 0 for b in answer["results"][0]["buckets"]) == 144
        summary = page.locator("#summary").text_content()
        assert "from the tier 1d in Europe/Paris forever on" in summary
        # Berlin's days have Paris's midnights: asked for, and answered.
        choose(page, lambda: (page.fill("#tz", "Europe/Berlin"), page.press("#tz", "Enter")))
        request = dict(page.evaluate("() => window.dashboard.request"))
        assert (request["granularity"], request["tz"]) == ("day", "Europe/Berlin")
        assert page.locator("#error").is_hidden()
        berlin = page.evaluate("() => window.dashboard.answer")
        assert [b["count"] for b in berlin["results"][0]["buckets"]] == [
            b["count"] for b in answer["results"][0]["buckets"]
        ]
        # In UTC nothing the day tier holds can be answered: the page shows why.
        choose(page, lambda: (page.fill("#tz", "UTC"), page.press("#tz", "Enter")))
        assert page.locator("#error").is_visible()
        assert page.locator("#error-title").text_content() == "The API answered 422 invalid_query"
        detail = page.locator("#error-details li").text_content()
        assert detail.startswith("tz day buckets in UTC cut the days this store keeps")
        assert "holds days of Europe/Paris" in detail and "ask with tz=Europe/Paris" in detail
        assert page.evaluate("() => window.dashboard.chart") is None
        # A day back reaches the hours (by the margin the server allows), an hour back
        # only the minutes: auto asks for hours, then minutes, answered.
        choose(page, lambda: page.click("[data-range='24h']"))
        request = dict(page.evaluate("() => window.dashboard.request"))
        assert request["granularity"] == "hour" and page.locator("#error").is_hidden()
        choose(page, lambda: page.click("[data-range='1h']"))
        request = dict(page.evaluate("() => window.dashboard.request"))
        assert request["granularity"] == "bucket" and page.locator("#error").is_hidden()


def test_the_pages_choice_of_granularity_over_tiers(
    browser: Any, tiered_site: ServerProcess
) -> None:
    with _page_of(browser, tiered_site) as page:
        page.goto("/")
        settle(page, 0)
        module = page.evaluate(
            "() => document.querySelector('script[type=module]').src.replace('dashboard.js', "
            "'state.js')"
        )
        tiers = httpx.get(f"{tiered_site.url}/v1/keys", timeout=30).json()["tiers"]
        assert tiers[-1] == PARIS_TIER
        chosen = page.evaluate(
            """async ([module, tiers]) => {
                const S = await import(module);
                const pick = (tz, span, age) =>
                    S.chooseGranularity({granularity: "auto", tz}, span, 60,
                                        S.tiersReached(tiers, age));
                const reached = (age) => S.tiersReached(tiers, age).map((t) => t.width);
                return [
                    reached(3600), reached(86400 - 301), reached(86400 - 299),
                    reached(2 * 86400), reached(null),
                    pick("UTC", 3600, 3600), pick("UTC", 86400, 86400 - 600),
                    pick("UTC", 86400, 86400), pick("Europe/Paris", 7 * 86400, 7 * 86400),
                    pick("UTC", 7 * 86400, 7 * 86400),
                    pick("Europe/Paris", 40 * 365 * 86400, 40 * 365 * 86400),
                    pick("Europe/Paris", null, null),
                    S.tierText(tiers[2]), S.tierText({width: "1d", horizon: "400d", zone: "UTC"}),
                    S.spanSeconds("36h"), S.spanSeconds("forever"),
                ];
            }""",
            [module, tiers],
        )
        assert chosen == [
            ["1m"],
            ["1m"],
            ["1m", "1h"],
            ["1m", "1h", "1d"],
            ["1m", "1h", "1d"],
            "bucket",
            "hour",
            "hour",
            "day",
            "day",  # none fits: the API's refusal names the tier's zone
            "month",
            "day",
            "1d in Europe/Paris forever",
            "1d for 400d",
            129600,
            None,
        ]
