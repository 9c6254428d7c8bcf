"""The tiers' pure parts: parsing ``--tiers``, the rules of a changed declaration, which
tier holds a bucket, and where a query's buckets must fall (trioagg.core.tiers), and the
refusals of a query that would cut a coarse tier's bucket (trioagg.query.aggregates)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from werkzeug.datastructures import MultiDict

from trioagg.core.errors import ConfigError, InvalidQuery
from trioagg.core.settings import Settings
from trioagg.core.tiers import (
    Tier,
    Tiers,
    changed,
    check_bucket,
    holding,
    parse_tiers,
    route,
    unaligned,
    widen,
)
from trioagg.core.times import rfc3339
from trioagg.query.aggregates import Query, parse_query

M, H, D = 60, 3600, 86400
THREE = parse_tiers("1m for 7d, 1h for 400d, 1d forever")


def test_parses_tiers_finest_first() -> None:
    assert Tiers((Tier(M, 7 * D), Tier(H, 400 * D), Tier(D, None))) == THREE
    assert str(THREE) == "1m for 7d, 1h for 400d, 1d forever"
    assert THREE is not None and THREE.retention is None
    assert THREE.widths == (M, H, D)
    assert [THREE.table(i) for i in range(3)] == ["rollups", "rollups_3600", "rollups_86400"]


def test_spaces_case_and_units_are_read_and_written_canonically() -> None:
    tiers = parse_tiers("  5m FOR 36h ,15m for 3000m ,1h   for 4d")
    assert str(tiers) == "5m for 36h, 15m for 50h, 1h for 4d"
    tiers = parse_tiers("5m for 1440m, 1h for 48h")
    assert str(tiers) == "5m for 1d, 1h for 2d"
    assert tiers is not None and tiers.retention == 2 * D


@pytest.mark.parametrize("text", ["", "none", " NONE "])
def test_none_is_no_tiers(text: str) -> None:
    assert parse_tiers(text) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1m", "'1m' is not a tier: write WIDTH for HORIZON (1m for 7d), or WIDTH forever"),
        ("1m for 7d, 1h", "'1h' is not a tier"),
        ("7m for 7d, 1h forever", "'7m' is not a tier width (choose one of 1m, 2m, 5m"),
        ("1m for 7d, 2d forever", "'2d' is not a tier width"),
        ("1m for 7 days, 1h forever", "'1m for 7 days' is not a tier"),
        ("1m for 7w, 1h forever", "'7w' is not a horizon (whole minutes, hours or days"),
        ("1m for 0d, 1h forever", "'0d' is not a horizon"),
        ("1m for 1.5d, 1h forever", "'1.5d' is not a horizon"),
        ("1m forever, 1h for 7d", "only the last tier may be kept forever, not '1m forever'"),
        (
            "1h for 7d, 1m forever",
            "the width of '1m forever' must be a multiple of the width before it (1h), and wider",
        ),
        ("1m for 7d, 1m forever", "must be a multiple of the width before it (1m), and wider"),
        ("2h for 7d, 3h forever", "must be a multiple of the width before it (2h)"),
        (
            "1m for 7d, 1h for 7d",
            "the horizon of '1h for 7d' must be longer than the one before it (7d)",
        ),
        (
            "1m for 30m, 1h forever",
            "the tier before '1h forever' keeps 30m, less than one of its 1h buckets",
        ),
        ("1m for 7d", "'1m for 7d' declares one tier: give at least two"),
        ("1m forever", "declares one tier"),
    ],
)
def test_bad_declarations_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_tiers(text)


def test_the_finest_width_must_be_the_bucket() -> None:
    assert check_bucket(THREE, M) is None
    assert check_bucket(None, H) is None
    assert check_bucket(THREE, H) == (
        "the finest tier of --tiers (1m for 7d) must have the store's bucket width, "
        "but --bucket is 1h: give --bucket 1m"
    )
    with pytest.raises(ConfigError, match=r"^--tiers / TRIOAGG_TIERS: the finest tier"):
        Settings.from_text({"tiers": "1m for 7d, 1h forever"})
    settings = Settings.from_env({"TRIOAGG_TIERS": "1m for 7d, 1h forever", "TRIOAGG_BUCKET": "1m"})
    assert str(settings.tiers) == "1m for 7d, 1h forever"
    assert Settings().tiers is None


def test_horizons_may_change_widths_may_not() -> None:
    longer = parse_tiers("1m for 30d, 1h for 800d, 1d forever")
    assert changed(THREE, longer) is None
    assert changed(None, THREE) is None  # tiers declared on a store that had none
    assert changed(None, None) is None
    assert changed(THREE, None) == (
        "--tiers is none, but the store keeps the tiers 1m for 7d, 1h for 400d, 1d forever"
    )
    other = parse_tiers("1m for 7d, 1h forever")
    assert changed(THREE, other) == (
        "--tiers is 1m for 7d, 1h forever, but the store keeps the tiers 1m for 7d, 1h for "
        "400d, 1d forever: the widths of a store's tiers cannot change (their horizons can)"
    )


def test_cuts_are_whole_buckets_of_the_next_tier() -> None:
    assert THREE is not None
    now = 1000 * D + 5 * H + 7 * M + 3
    assert THREE.cut(0, now) == 993 * D + 5 * H  # 7 days back, to the hour
    assert THREE.cut(1, now) == 600 * D  # 400 days back, to the day
    assert THREE.drop_cut(now) is None
    kept = parse_tiers("1m for 2h, 1h for 3d")
    assert kept is not None and kept.drop_cut(now) == 997 * D + 5 * H


def test_route_follows_the_rolled_marks() -> None:
    rolled = [10 * D, 4 * D]  # tier 0 from day 10, tier 1 from day 4, tier 2 before
    assert route(10 * D, rolled) == 0
    assert route(10 * D - 1, rolled) == 1
    assert route(4 * D, rolled) == 1
    assert route(4 * D - M, rolled) == 2
    assert route(0, rolled) == 2
    assert route(5 * D, rolled, first=1) == 1  # what a roll out of tier 0 asks
    assert route(3 * D, rolled, first=1) == 2
    assert route(0, []) == 0


def test_queries_align_where_coarse_tiers_may_hold_data() -> None:
    assert THREE is not None
    now = 1000 * D + 5 * H
    held = holding(THREE, [0, 0], now)
    assert held == [(993 * D + 5 * H, 1), (600 * D, 2)]
    # A mark past the horizon (lengthened since) is where the tier holds data.
    assert holding(THREE, [995 * D, 0], now)[0] == (995 * D, 1)
    # Minutes are fine after the first cut, hours after the second.
    assert unaligned(range(994 * D, 995 * D, M), THREE, held) is None
    assert unaligned(range(993 * D, 994 * D, M), THREE, held) == (993 * D + M, 1)
    assert unaligned(range(700 * D, 701 * D, H), THREE, held) is None
    assert unaligned(range(599 * D, 600 * D + H, H), THREE, held) == (599 * D + H, 2)
    assert widen(599 * D + 5 * H, 993 * D + 7 * M, THREE, held) == (599 * D, 993 * D + H)
    assert widen(995 * D + M, 996 * D + M, THREE, held) == (995 * D + M, 996 * D + M)


NOW = 1000 * D + 5 * H


def query(**params: str) -> Query:
    assert THREE is not None
    return parse_query(
        MultiDict(params), bucket=M, now=NOW, tiers=THREE, held=holding(THREE, [0, 0], NOW)
    )


def test_a_query_finer_than_a_tier_holds_is_refused_naming_it() -> None:
    with pytest.raises(InvalidQuery) as refused:
        query(key="k", granularity="bucket", **{"from": str(990 * D), "to": str(995 * D)})
    (problem,) = refused.value.details
    assert problem["parameter"] == "granularity"
    since = rfc3339(993 * D + 5 * H)
    assert problem["message"] == (
        f"bucket buckets are finer than this store keeps before {since}: its tier "
        "'1h for 400d' holds 1h buckets of data older than 7d (an answer bucket would start "
        f"at {rfc3339(990 * D + M)}); ask for granularity=hour or all, or a range from "
        f"{since} on"
    )
    with pytest.raises(InvalidQuery) as refused:
        query(key="k", granularity="hour", **{"from": str(500 * D), "to": str(700 * D)})
    assert "its tier '1d forever' holds 1d buckets" in refused.value.details[0]["message"]
    with pytest.raises(InvalidQuery) as refused:
        query(
            key="k",
            granularity="day",
            tz="Europe/Paris",
            **{"from": str(500 * D), "to": str(501 * D)},
        )
    (problem,) = refused.value.details
    assert problem["parameter"] == "tz"
    assert problem["message"].startswith(
        "day buckets in Europe/Paris cut the days this store keeps before 1971-08-24T00:00:00Z: "
        "its tier '1d forever' holds days of UTC"
    )
    assert problem["message"].endswith(
        "ask with tz=UTC (or for granularity=all), or for a range from 1971-08-24T00:00:00Z on"
    )


def test_queries_the_tiers_can_answer() -> None:
    fine = query(key="k", granularity="bucket", **{"from": str(995 * D), "to": str(996 * D)})
    assert fine.boundaries[1] - fine.boundaries[0] == M
    hours = query(key="k", granularity="hour", **{"from": str(900 * D), "to": str(996 * D)})
    assert hours.start == 900 * D
    days = query(key="k", granularity="day", **{"from": str(100 * D), "to": str(996 * D)})
    assert days.end == 996 * D
    every = query(key="k", granularity="all", **{"from": str(100 * D + 7), "to": str(996 * D + 7)})
    assert every.boundaries == [100 * D, 996 * D + M]
    # Without tiers nothing changes.
    plain = parse_query(
        MultiDict({"key": "k", "granularity": "bucket", "from": "0", "to": "60"}), bucket=M, now=NOW
    )
    assert plain.boundaries == range(0, 2 * M, M)


PARIS = parse_tiers("1m for 7d, 1h for 400d, 1d in Europe/Paris forever")
#: 2024-10-27: Paris leaves summer time (a 25-hour day); 2024-03-31 enters it (23 hours).
OCT_27, MAR_31 = 1729980000, 1711839600  # their local midnights (22:00Z, 23:00Z before)


def test_a_day_tier_names_its_zone() -> None:
    assert PARIS is not None
    assert PARIS.tiers[-1] == Tier(D, None, "Europe/Paris")
    assert str(PARIS) == "1m for 7d, 1h for 400d, 1d in Europe/Paris forever"
    assert parse_tiers(str(PARIS)) == PARIS  # the record reads back
    assert PARIS.zone == "Europe/Paris" and THREE is not None and THREE.zone == "UTC"
    # UTC is the default, and is written as such.
    assert parse_tiers("1m for 7d, 1d IN UTC forever") == parse_tiers("1m for 7d, 1d forever")
    assert str(parse_tiers("1m for 1d, 1d in Asia/Tokyo for 30d")) == (
        "1m for 1d, 1d in Asia/Tokyo for 30d"
    )
    # Half-hour zones need finer tiers than hours before their days.
    kolkata = parse_tiers("15m for 7d, 30m for 30d, 1d in Asia/Kolkata forever")
    assert kolkata is not None and kolkata.zone == "Asia/Kolkata"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "1m for 7d, 1d in Mars/Olympus forever",
            "'Mars/Olympus' is not an IANA time zone (e.g. Europe/Paris) for the 1d tier",
        ),
        ("1m for 7d, 1d in ../../etc/passwd forever", "is not an IANA time zone"),
        ("1m for 7d, 1d in Europe forever", "'Europe' is not an IANA time zone"),
        (
            "1m for 7d, 1h in Europe/Paris forever",
            "only a 1d tier may name a time zone, not 1h in Europe/Paris",
        ),
        (
            "1m for 7d, 2h for 30d, 1d in Europe/Paris forever",
            "a 1d tier in Europe/Paris needs every finer tier's width to divide an hour (its "
            "local days must be whole buckets of them), not 2h",
        ),
        (
            "1m for 7d, 1h for 30d, 1d in Asia/Kolkata forever",
            "the local days of Asia/Kolkata do not start on edges of the 1h tier's buckets "
            "(its UTC offset is +05:30 at times)",
        ),
        (
            "15m for 7d, 30m for 30d, 1d in Asia/Kathmandu forever",
            "(its UTC offset is +05:45 at times)",
        ),
        ("1m for 7d, 1d in forever", "'1d in forever' is not a tier"),
    ],
)
def test_bad_zones_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_tiers(text)


def test_a_changed_zone_is_refused_like_a_changed_width() -> None:
    assert PARIS is not None
    longer = parse_tiers("1m for 8d, 1h for 500d, 1d in Europe/Paris for 900d")
    assert changed(PARIS, longer) is None
    assert changed(PARIS, THREE) == (
        "--tiers is 1m for 7d, 1h for 400d, 1d forever, but the store keeps the tiers "
        "1m for 7d, 1h for 400d, 1d in Europe/Paris forever: the zone of a store's days "
        "cannot change (its 1d rows are days of Europe/Paris)"
    )
    assert changed(THREE, PARIS) is not None


def test_local_days_last_what_the_zones_days_last() -> None:
    assert PARIS is not None
    assert PARIS.floor(2, OCT_27) == OCT_27
    assert PARIS.floor(2, OCT_27 + 24 * H) == OCT_27  # 24 hours on: still the 27th
    assert PARIS.after(2, OCT_27) == OCT_27 + 25 * H
    assert PARIS.floor(2, OCT_27 - 1) == OCT_27 - 24 * H
    assert PARIS.after(2, MAR_31) == MAR_31 + 23 * H
    assert PARIS.end_of(MAR_31, D) == MAR_31 + 23 * H
    assert PARIS.end_of(MAR_31, H) == MAR_31 + H
    # Moncton fell back at 00:01 on 1993-10-31, to 23:01 of the 30th: the hour after
    # that midnight is in the 31st, though its clock shows the 30th.
    moncton = parse_tiers("1m for 1d, 1d in America/Moncton forever")
    assert moncton is not None
    midnight_31 = 752036400  # 1993-10-31T03:00:00Z
    assert moncton.floor(1, midnight_31 + 1116) == midnight_31
    assert moncton.after(1, midnight_31 - 86400) == midnight_31
    assert moncton.after(1, midnight_31) == midnight_31 + 25 * H
    # Cuts are local midnights: 400 days before 2025-11-30T12:00Z is 2024-10-26T12:00Z.
    assert PARIS.cut(1, 1764504000) == OCT_27 - 24 * H
    assert PARIS.cut(0, 1764504000) == 1764504000 - 7 * D
    kept = parse_tiers("1m for 7d, 1d in Europe/Paris for 400d")
    assert kept is not None and kept.drop_cut(1764504000 + D) == OCT_27
    # Queries over local days: other days' edges cut them, Paris's do not.
    held = [(OCT_27 + 30 * D, 1)]
    assert kept is not None
    assert unaligned([OCT_27, OCT_27 + 25 * H], kept, held) is None
    assert unaligned([OCT_27 + 2 * H], kept, held) == (OCT_27 + 2 * H, 1)
    assert widen(OCT_27 + H, OCT_27 + 3 * H, kept, held) == (OCT_27, OCT_27 + 25 * H)


def test_a_query_in_another_zone_than_the_days_is_refused_naming_it() -> None:
    assert PARIS is not None
    now = OCT_27 + 500 * D
    held = holding(PARIS, [], now)

    def query(**args: str) -> Query:
        return parse_query(MultiDict(args), bucket=M, now=now, tiers=PARIS, held=held)

    span = {"key": "k", "from": str(OCT_27 - 3 * D), "to": str(OCT_27 + 3 * D)}
    days = query(granularity="day", tz="Europe/Paris", **span)
    assert list(days.boundaries)[2:5] == [OCT_27 - 24 * H, OCT_27, OCT_27 + 25 * H]
    weeks = query(granularity="week", tz="Europe/Paris", **span)
    assert len(weeks.boundaries) == 3
    assert query(granularity="month", tz="Europe/Paris", **span).boundaries[0] == (
        1727733600  # 2024-10-01 in Paris
    )
    # A local day of another zone with the same midnights (Berlin's) is the same day.
    assert query(granularity="day", tz="Europe/Berlin", **span).boundaries == days.boundaries
    for zone, granularity in (("UTC", "day"), ("America/New_York", "day"), ("UTC", "week")):
        with pytest.raises(InvalidQuery) as refused:
            query(granularity=granularity, tz=zone, **span)
        (problem,) = refused.value.details
        assert problem["parameter"] == "tz"
        assert problem["message"].startswith(
            f"{granularity} buckets in {zone} cut the days this store keeps before "
        )
        assert (
            "its tier '1d in Europe/Paris forever' holds days of Europe/Paris, of data older "
            "than 400d" in problem["message"]
        )
        assert "ask with tz=Europe/Paris (or for granularity=all)" in problem["message"]
    with pytest.raises(InvalidQuery) as refused:
        query(granularity="hour", **span)
    assert (
        "ask for granularity=day (in Europe/Paris) or all" in (refused.value.details[0]["message"])
    )
    whole = query(granularity="all", **{**span, "from": str(OCT_27 + H)})
    assert whole.boundaries == [OCT_27, OCT_27 + 3 * D + H]
    # A read checks a stored day by the length of that local day: 25 hours on the 27th.
    assert days.holds_whole(OCT_27, D) and days.holds_whole(OCT_27 - 24 * H, D)
    utc_days = dataclasses.replace(days, boundaries=range(OCT_27 - 22 * H, OCT_27 + 3 * D, D))
    assert not utc_days.holds_whole(OCT_27, D)
    hours = dataclasses.replace(days, boundaries=range(OCT_27, OCT_27 + 2 * D, 25 * H))
    assert hours.holds_whole(OCT_27, D)  # a 25-hour answer bucket holds the whole day
