"""A ``1d`` tier in a time zone, in the store (one SQLite file, two shard files,
PostgreSQL): the roll merges the finer buckets of each local day (23, 24 or 25 hours
across DST changes) into one row at the local midnight, queries in that zone at day,
week and month granularity over the rolled days answer what an untiered store fed the
same events answers, a late event lands in its local day, a query in another zone is
refused naming the tier's, and a changed zone is refused like a changed width.

Time is given: the roll takes an explicit ``now``."""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import sys
import textwrap
import zoneinfo
from typing import Any

import hypothesis
import pytest
import trio
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from trioagg.core.errors import ConfigError, InvalidQuery
from trioagg.core.events import Point
from trioagg.core.tiers import Tiers, parse_tiers
from trioagg.query.aggregates import answer, parse_query
from trioagg.store import Store, open_store

from .conftest import shard_files, sql
from .test_tiers_store import (
    EXACT,
    _flags,
    assert_same,
    events,
    fill,
    interleave,
    open_,
    opened,
    settings_of,
    stores,
    tier_rows,
    twin_url,
    writes,
)

__all__ = ["opened", "twin_url"]  # fixtures, used by name

M, H, D = 60, 3600, 86400
TIERS = "1m for 1d, 1h for 2d, 1d in Europe/Paris forever"
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
#: Six days from 2024-10-24T00:00Z (Paris leaves summer time on the 27th: 25 hours), and
#: six from 2024-03-28T00:00Z (Paris enters it on the 31st: 23 hours).
AUTUMN, SPRING = 1729728000, 1711584000
DAYS = 6


def local_day(moment: float) -> int:
    """The Paris midnight starting the local day of ``moment``."""
    day = datetime.datetime.fromtimestamp(moment, PARIS).date()
    return int(datetime.datetime.combine(day, datetime.time(), PARIS).timestamp())


def day_buckets(db: str) -> list[int]:
    """The buckets of the day tier's rows, over every shard file."""
    query = "SELECT DISTINCT bucket FROM rollups_86400"
    if db.startswith("postgresql"):
        found = sql(db, query)
    else:
        found = []
        for path in shard_files(db):
            with contextlib.closing(sqlite3.connect(path)) as conn:
                found += conn.execute(query).fetchall()
    return sorted({int(bucket) for (bucket,) in found})


async def ask(store: Store, now: int, start: int, granularity: str, zone: str) -> Any:
    """The /v1/aggregates answer of ``visits`` by region over ``DAYS`` days from ``start``,
    as the app builds it."""
    args = MultiDict({"key": "visits", "from": str(start), "to": str(start + DAYS * D)})
    args.update({"granularity": granularity, "tz": zone, "stats": EXACT, "group_by": "region"})
    query = parse_query(
        args, bucket=M, now=now, tiers=store.policy.tiers, held=store.tiers_held(now)
    )
    parts = await store.read_parts(query.keys, query.start, query.end, fits=query.holds_whole)
    return json.loads(answer(query, [*parts.stored, *parts.overlay]).joined())


@stores
@pytest.mark.parametrize(
    ("start", "changed_day", "length"),
    [(AUTUMN, 1729980000, 25 * H), (SPRING, 1711839600, 23 * H)],  # the 27th, the 31st
)
async def test_local_days_are_rolled_and_answered_exactly_across_a_dst_change(
    db_url: str, twin_url: str, opened: list[Store], start: int, changed_day: int, length: int
) -> None:
    tiered = await open_(opened, settings_of(db_url, tiers=TIERS))
    plain = await open_(opened, settings_of(twin_url))
    sent = events(seed=5, start=start, days=DAYS)
    await fill(tiered, sent)
    await fill(plain, sent)
    now = start + DAYS * D + 7 * M
    # 53 rows a transaction: local days rolled in parts, each merged into one row.
    rolled, _ = await tiered.roll_tiers(now=now, rows=53)
    assert rolled > 0
    layout = tier_rows(db_url)
    days = day_buckets(db_url)
    # Every day row starts at a Paris midnight; the days rolled end at the one before
    # the hours' horizon, and the day of the change is among them.
    horizon = local_day(now - 2 * D)
    assert all(local_day(bucket) == bucket for bucket in days)
    assert changed_day in days and days[-1] == local_day(horizon - 1)
    assert layout["rollups_3600"][2] == horizon
    assert sum(events for _, events, _, _ in layout.values()) == len(sent)
    assert local_day(changed_day + length) == changed_day + length  # 23 or 25 hours long
    whole = [p for p in sent if changed_day <= p[1] < changed_day + length and p[0] == "visits"]
    paris = await ask(tiered, now, start, "day", "Europe/Paris")
    buckets = {b["start"]: b["count"] for r in paris["results"] for b in r["buckets"]}
    assert len(buckets) == DAYS + 1
    stamp = datetime.datetime.fromtimestamp(changed_day, datetime.UTC)
    assert sum(
        b["count"]
        for r in paris["results"]
        for b in r["buckets"]
        if b["start"] == stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
    ) == len(whole)
    for granularity in ("day", "week", "month", "all"):
        # granularity=all widens its range to whole local days: ask both from one.
        first = local_day(start) if granularity == "all" else start
        for zone in ("Europe/Paris", "Europe/Berlin"):  # Berlin's days are Paris's
            assert_same(
                await ask(tiered, now, first, granularity, zone),
                await ask(plain, now, first, granularity, zone),
            )
    # Hours are answered where hours are kept: from the hours' horizon on.
    hours = await ask(tiered, now, horizon, "hour", "UTC")
    assert_same(hours, await ask(plain, now, horizon, "hour", "UTC"))
    for zone in ("UTC", "America/New_York"):
        with pytest.raises(InvalidQuery) as refused:
            await ask(tiered, now, start, "day", zone)
        (problem,) = refused.value.details
        assert problem["parameter"] == "tz"
        assert (
            "its tier '1d in Europe/Paris forever' holds days of Europe/Paris"
            in (problem["message"])
        )
    # A late event in a rolled local day (its last hour, after 23:00 UTC) goes into it.
    late_at = changed_day + length - 30 * M
    late: list[Point] = [("visits", float(late_at), 9.0, '{"region":"eu"}', "late", None)]
    before = tier_rows(db_url)
    await fill(tiered, late)
    await fill(plain, late)
    after = tier_rows(db_url)
    assert [after[t][1] - before[t][1] for t in after] == [0, 0, 1]
    assert_same(
        await ask(tiered, now, start, "day", "Europe/Paris"),
        await ask(plain, now, start, "day", "Europe/Paris"),
    )
    # A second roll at the same moment finds nothing to do.
    assert await tiered.roll_tiers(now=now) == (0, 0)


@stores
async def test_a_changed_zone_is_refused(db_url: str, opened: list[Store]) -> None:
    store = await open_(opened, settings_of(db_url, tiers=TIERS))
    await fill(store, events(seed=3, start=AUTUMN, days=1))
    await store.aclose()
    opened.clear()
    for other in ("1m for 1d, 1h for 2d, 1d forever", "1m for 1d, 1h for 2d, 1d in UTC forever"):
        with pytest.raises(ConfigError) as refused:
            await open_store(settings_of(db_url, tiers=other))
        assert "the zone of a store's days cannot change (its 1d rows are days of " in str(
            refused.value
        )
        assert f"start with --tiers '{TIERS}'" in str(refused.value)
    longer = "1m for 2d, 1h for 3d, 1d in Europe/Paris for 900d"
    await open_(opened, settings_of(db_url, tiers=longer))
    assert sql(db_url, "SELECT value FROM meta WHERE name = 'tiers'") == [(longer,)]


#: A process that rolls a store and is killed (SIGKILL) in the middle of a transaction
#: rolling hours into local days: after the day rows are written, before the hours go.
KILLED_MID_DAY_ROLL = textwrap.dedent(
    """
    import os, signal, sys
    import trio
    from trioagg.core.settings import Settings
    from trioagg.store import open_store

    async def main():
        settings = Settings.from_text({**dict(a.split("=", 1) for a in sys.argv[2:])})
        store = await open_store(settings)
        real = store.backend.delete_through
        def killed(conn, table, *args):
            if table == "rollups_3600":
                print("killing myself mid-roll of days", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(conn, table, *args)
        store.backend.delete_through = killed
        await store.roll_tiers(now=float(sys.argv[1]))

    trio.run(main)
    """
)


async def rolled_until_days_fail(
    db_url: str, twin_url: str, opened: list[Store]
) -> tuple[Store, Store, int, dict[str, Any]]:
    """A tiered and an untiered store fed the same days around Paris's autumn change;
    the tiered one's minutes rolled into hours, and its first roll of hours into days
    failed before its delete. Returns both stores, the roll's now and the tiers' rows."""
    tiered = await open_(opened, settings_of(db_url, tiers=TIERS))
    plain = await open_(opened, settings_of(twin_url))
    sent = events(seed=11, start=AUTUMN, days=DAYS)
    await fill(tiered, sent)
    await fill(plain, sent)
    now = AUTUMN + DAYS * D + 7 * M
    backend = tiered.backend
    real = backend.delete_through

    def fail_into_days(conn: Any, table: str, *args: Any) -> int:
        if table == "rollups_3600":
            raise sqlite3.OperationalError("disk I/O error (injected between two statements)")
        return real(conn, table, *args)

    backend.delete_through = fail_into_days  # type: ignore[method-assign,assignment]
    with pytest.raises(Exception, match="injected between two statements"):
        await tiered.roll_tiers(now=now, rows=53)
    backend.delete_through = real  # type: ignore[method-assign]
    layout = tier_rows(db_url)
    # That transaction left nothing behind: no day row, every event once.
    assert layout["rollups_86400"][0] == 0 and layout["rollups_3600"][0] > 0
    assert sum(events for _, events, _, _ in layout.values()) == len(sent)
    return tiered, plain, now, layout


async def assert_rolled_as_untiered(db_url: str, tiered: Store, plain: Store, now: int) -> None:
    await tiered.roll_tiers(now=now, rows=53)
    assert tier_rows(db_url)["rollups_86400"][0] > 0
    for granularity in ("day", "week"):
        assert_same(
            await ask(tiered, now, AUTUMN, granularity, "Europe/Paris"),
            await ask(plain, now, AUTUMN, granularity, "Europe/Paris"),
        )


@stores
async def test_a_roll_of_local_days_that_fails_half_way_leaves_everything_in_place(
    db_url: str, twin_url: str, opened: list[Store]
) -> None:
    tiered, plain, now, _ = await rolled_until_days_fail(db_url, twin_url, opened)
    await assert_rolled_as_untiered(db_url, tiered, plain, now)


@stores
@pytest.mark.slow
async def test_a_process_killed_mid_roll_of_local_days_loses_and_doubles_nothing(
    db_url: str, twin_url: str, opened: list[Store]
) -> None:
    tiered, plain, now, layout = await rolled_until_days_fail(db_url, twin_url, opened)
    flags = [f"{name}={value}" for name, value in {**_flags(db_url), "tiers": TIERS}.items()]
    done = await trio.run_process(
        [sys.executable, "-c", KILLED_MID_DAY_ROLL, str(now), *flags],
        capture_stdout=True,
        check=False,
    )
    assert done.returncode == -9 and b"killing myself mid-roll of days" in done.stdout
    assert tier_rows(db_url) == layout
    await assert_rolled_as_untiered(db_url, tiered, plain, now)


#: 12 hours before Paris's 25-hour 2024-10-27: the writes' 36 hours span that day.
ZONED_T0 = 1729980000 - 12 * H
#: As test_tiers_store's, but the clock goes up to a day at a time, so that local days,
#: the 25-hour one too, are rolled in most runs.
zoned_operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), writes),
        st.tuples(st.just("roll"), st.tuples(st.integers(0, 24), st.integers(1, 6))),
        st.tuples(st.just("fail"), st.integers(1, 6)),
    ),
    max_size=25,
)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(operations=zoned_operations)
def test_any_interleaving_of_writes_and_rolls_into_local_days_keeps_every_event_once(
    operations: list[tuple[str, Any]],
) -> None:
    tiers = parse_tiers("1m for 2h, 1h for 1d, 1d in Europe/Paris forever")
    assert tiers is not None
    last = len(tiers) - 1

    def every_event_once_in_its_local_day(conn: sqlite3.Connection, written: list[Point]) -> None:
        # Every event in one tier, once, in its local day; every day row at a local
        # midnight.
        assert local_days(conn, tiers) == truth_by_local_day(written, tiers)
        for (bucket,) in conn.execute("SELECT bucket FROM rollups_86400"):
            assert tiers.floor(last, bucket) == bucket

    def count_days(conn: sqlite3.Connection) -> None:
        days = conn.execute("SELECT count(DISTINCT bucket) FROM rollups_86400").fetchone()[0]
        hypothesis.event(f"local days rolled: {min(days, 2)}{'+' if days >= 2 else ''}")

    interleave(
        tiers,
        ZONED_T0,
        operations,
        failing_tier=1,
        check=every_event_once_in_its_local_day,
        after=count_days,
    )


def local_days(conn: sqlite3.Connection, tiers: Tiers) -> dict[tuple[str, int], tuple[int, ...]]:
    """(count, sum, min, max) per key and local day of the day tier, over every tier."""
    days: dict[tuple[str, int], list[int]] = {}
    for index in range(len(tiers)):
        for key, bucket, count, total, low, high in conn.execute(
            f"SELECT key, bucket, count, count * shift + s1, min, max FROM {tiers.table(index)}"
        ):
            day = days.setdefault(
                (key, tiers.floor(len(tiers) - 1, bucket)), [0, 0, 10**9, -(10**9)]
            )
            day[0] += count
            day[1] += round(total)
            day[2], day[3] = min(day[2], round(low)), max(day[3], round(high))
    return {slot: tuple(values) for slot, values in days.items()}


def truth_by_local_day(points: list[Point], tiers: Tiers) -> dict[tuple[str, int], tuple[int, ...]]:
    days: dict[tuple[str, int], list[int]] = {}
    for key, ts, value, *_ in points:
        day = days.setdefault((key, local_day(ts)), [0, 0, 10**9, -(10**9)])
        day[0] += 1
        day[1] += int(value)
        day[2], day[3] = min(day[2], int(value)), max(day[3], int(value))
    return {slot: tuple(values) for slot, values in days.items()}


@stores
async def test_a_last_tier_of_local_days_keeps_whole_days_of_its_horizon(
    db_url: str, opened: list[Store]
) -> None:
    store = await open_(opened, settings_of(db_url, tiers="1m for 1d, 1d in Europe/Paris for 3d"))
    sent = events(seed=12, start=AUTUMN, days=DAYS)
    await fill(store, sent)
    now = AUTUMN + DAYS * D + 7 * M
    rolled, dropped = await store.roll_tiers(now=now)
    assert rolled > 0 and dropped > 0
    # Kept: whole local days from the one holding the moment three days before now
    # (2024-10-27T00:07Z, 02:07 in Paris): the 25-hour 27th, from its midnight.
    kept_from = local_day(now - 3 * D)
    assert kept_from == 1729980000  # 2024-10-26T22:00:00Z
    layout = tier_rows(db_url, ("rollups", "rollups_86400"))
    assert layout["rollups_86400"][2] == kept_from
    assert sum(events for _, events, _, _ in layout.values()) == sum(
        1 for point in sent if point[1] >= kept_from
    )
    assert await store.roll_tiers(now=now) == (0, 0)
