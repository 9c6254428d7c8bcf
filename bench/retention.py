"""The ``tiers`` scenario: a simulated year of 1-minute data, with and without tiers.

Issue 22's "show it": the same generated data (one event per series per minute, for
``series`` series over ``days`` simulated days ending at the current hour) is written
day by day straight into two fresh SQLite stores through the writers' own store API
(:meth:`~trioagg.store.Store.append`, the journal, then :meth:`~trioagg.store.Store.flush`),
not sent in real time: one store with ``--bucket 1m --tiers '1m for 7d, 1h for 400d,
1d forever'``, which is rolled (:meth:`~trioagg.store.Store.roll_tiers` at the simulated
day's end) after each simulated day, each roll timed; one plain ``--bucket 1m`` store.

Then, for each store: its size on disk, and a year-long query of one key at
``granularity=day`` through a real ``trioagg serve`` started on the finished store, over
HTTP (distinct keys, read cache off). A plain store refuses that query (a year of one
1-minute series is 525,600 rows, past the 250,000 rows a query may read), so both stores
also answer it in this process through the store's read and the query's answer
(:func:`read_and_answer`) with the row budget lifted; the answers of the two stores must
be equal (count, sum, min, max), and each store must hold every event written.
"""

from __future__ import annotations

import functools
import math
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from werkzeug.datastructures import MultiDict

from trioagg.core.events import NO_TAGS, Point
from trioagg.core.settings import Settings
from trioagg.query.aggregates import answer, parse_query
from trioagg.query.budget import Budget
from trioagg.store import Store, open_store

from . import verify
from .runner import Bench, BenchError
from .scenarios import DAY, Row, ScenarioResult, Sizes
from .server import Server, command

TIERS = "1m for 7d, 1h for 400d, 1d forever"
#: The tier tables of :data:`TIERS` (finest first).
TABLES = ("rollups", "rollups_3600", "rollups_86400")
MINUTE = 60
#: Head rows (series x minutes) written before a flush: about a writer's flush window
#: under load, and a bound on the harness's memory.
FLUSH_ROWS = 200_000
#: Year-long queries timed over HTTP per store (each of another key: no read cache).
HTTP_QUERIES = 10
#: ... and in this process (read + answer), each of another key.
LOCAL_QUERIES = 5
#: Events of a year of one event per minute for 1,000 series (issue 22's size).
YEAR_EVENTS = 1_000 * 525_600
STATS = ("count", "sum", "min", "max", "avg")
#: The row budget of the in-process query: enough for a year of one 1-minute series.
LIFTED = Budget(rows=10_000_000, answer_buckets=10_000_000)
_NO_LATENCY: dict[str, float | None] = {"p50": None, "p95": None, "p99": None}


def key_of(number: int) -> str:
    return f"bench.tiers.{number:04d}"


def value_of(series: int, minute: int) -> float:
    """The value series ``series`` reports at minute ``minute`` (integers: sums exact)."""
    return float((minute * 7 + series * 13) % 1_000)


@dataclass
class Filled:
    """What writing a simulated year into one store did."""

    db: Path
    tiered: bool
    series: int
    days: int
    start: int
    end: int
    events: int = 0
    write_s: float = 0.0
    #: seconds of each simulated day's roll, and the rows it moved (tiered only)
    roll_s: list[float] = field(default_factory=list)
    roll_rows: list[int] = field(default_factory=list)

    @property
    def rows_rolled(self) -> int:
        return sum(self.roll_rows)

    def settings(self) -> Settings:
        return Settings.from_text(
            {"db": str(self.db), "bucket": "1m", "tiers": TIERS if self.tiered else "none"}
        )

    def flags(self) -> list[str]:
        return ["--bucket", "1m", "--tiers", TIERS if self.tiered else "none"]


def year_end(now: float) -> int:
    """The simulated year ends at the current hour, so a server started on the finished
    store finds its tiers rolled as far as its own clock says (within the hour)."""
    return int(now // 3600 * 3600)


async def fill(
    db: Path,
    *,
    series: int,
    days: int,
    end: int,
    tiered: bool,
    progress: Callable[[str], None] | None = None,
) -> Filled:
    """Write ``days`` simulated days ending at ``end`` of one event per series and minute
    into a fresh store at ``db``, day by day: journalled in hour-sized batches, flushed
    every :data:`FLUSH_ROWS` rows and at each day's end; with ``tiered``, rolled at the
    end of each simulated day as if it were then (timed)."""
    verify.remove_store(db)
    filled = Filled(db, tiered, series, days, end - days * DAY, end)
    keys = [key_of(s) for s in range(series)]
    store = await open_store(filled.settings())
    try:
        for day in range(days):
            day_start = filled.start + day * DAY
            began = time.perf_counter()
            pending = 0
            for hour in range(24):
                first = (day_start + hour * 3600) // MINUTE
                points: list[Point] = [
                    (key, float(minute * MINUTE + 30), value_of(s, minute), NO_TAGS, None, None)
                    for minute in range(first, first + 60)
                    for s, key in enumerate(keys)
                ]
                await store.append([points])
                pending += len(points)
                if pending >= FLUSH_ROWS:
                    await store.flush()
                    pending = 0
            await store.flush()
            filled.write_s += time.perf_counter() - began
            filled.events += series * 1_440
            if progress is not None:
                progress(f"day {day + 1}/{days}")
            if tiered:
                began = time.perf_counter()
                rolled, _ = await store.roll_tiers(now=day_start + DAY)
                filled.roll_s.append(time.perf_counter() - began)
                filled.roll_rows.append(rolled)
    finally:
        await store.aclose()
    return filled


def disk_bytes(db: Path) -> tuple[int, int]:
    """(bytes of the store's files, bytes of its pages in use): a store that deleted
    rows keeps their pages for new ones until a VACUUM."""
    files = sum(
        Path(f"{path}{suffix}").stat().st_size
        for path in verify.store_files(db)
        for suffix in ("", "-wal")
        if Path(f"{path}{suffix}").exists()
    )
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        pages, free, size = (
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    return files, (pages - free) * size


def tier_totals(db: Path) -> dict[str, tuple[int, int]]:
    """Per rollups table of the store: (rows, events)."""
    found = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        for table in TABLES:
            try:
                row = conn.execute(f"SELECT count(*), coalesce(sum(count), 0) FROM {table}")
            except sqlite3.OperationalError:  # a plain store has one table
                continue
            rows, events = row.fetchone()
            found[table] = (int(rows), int(events))
    return found


def year_args(key: str, filled: Filled) -> dict[str, str]:
    """A query of one key over the whole simulated range, by UTC day."""
    return {
        "key": key,
        "from": str(filled.start // DAY * DAY),
        "to": str(math.ceil(filled.end / DAY) * DAY),
        "granularity": "day",
        "stats": ",".join(STATS),
    }


async def read_and_answer(store: Store, args: dict[str, str], now: float) -> bytes:
    """A query answered as the server answers it (parse, the store's read with the
    tiers' check, the answer), with the row budget lifted (:data:`LIFTED`)."""
    query = parse_query(
        MultiDict(args),
        bucket=store.bucket,
        now=now,
        budget=LIFTED,
        tiers=store.policy.tiers,
        held=store.tiers_held(now),
    )
    parts = await store.read_parts(
        query.keys,
        query.start,
        query.end,
        limit=LIFTED.rows + 1,
        fits=query.holds_whole if store.policy.tiers is not None else None,
    )
    return answer(query, [*parts.stored, *parts.overlay], LIFTED).joined()


async def local_queries(filled: Filled, now: float, count: int) -> tuple[list[float], list[Any]]:
    """Seconds of ``count`` year-long queries (of the first ``count`` keys), and their
    answers."""
    import json

    store = await open_store(filled.settings())
    seconds, answers = [], []
    try:
        for number in range(count):
            began = time.perf_counter()
            body = await read_and_answer(store, year_args(key_of(number), filled), now)
            seconds.append(time.perf_counter() - began)
            answers.append(json.loads(body))
    finally:
        await store.aclose()
    return seconds, answers


def http_queries(
    bench: Bench, filled: Filled, count: int, name: str
) -> tuple[list[float], list[int], str]:
    """Seconds and statuses of ``count`` year-long queries over HTTP to a ``trioagg
    serve`` of the run's deployment started on the finished store (read cache off), and
    the first refusal's message, if any."""
    import httpx

    deployment = bench.options.deployment
    flags = [*filled.flags(), "--read-cache-entries", "0"]
    argv, env = command("trioagg", deployment, filled.db, flags)
    server = Server(
        "trioagg",
        argv,
        env,
        bench.workdir / f"{name}.log",
        workers=deployment.workers,
        trioagg_src=deployment.trioagg_src,
    )
    seconds, statuses, refusal = [], [], ""
    try:
        server.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as client:
            for number in range(count):
                began = time.perf_counter()
                reply = client.get("/v1/aggregates", params=year_args(key_of(number), filled))
                seconds.append(time.perf_counter() - began)
                statuses.append(reply.status_code)
                if reply.status_code != 200 and not refusal:
                    refusal = reply.text[:300]
        exit_code = server.stop()
    except BaseException:
        server.kill()
        raise
    if exit_code != 0:
        raise BenchError(f"tiers: the server on {filled.db.name} exited {exit_code}")
    return seconds, statuses, refusal


def _ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return dict(_NO_LATENCY)
    ordered = sorted(x * 1e3 for x in seconds)
    last = len(ordered) - 1
    return {
        "p50": round(statistics.median(ordered), 2),
        "p95": round(ordered[min(last, int(0.95 * len(ordered)))], 2),
        "p99": round(ordered[min(last, int(0.99 * len(ordered)))], 2),
    }


def totals_of(answers: list[Any]) -> list[list[tuple[Any, ...]]]:
    """The stats that must be equal with and without tiers, per answer bucket."""
    return [
        [
            (bucket["start"], *(bucket[stat] for stat in ("count", "sum", "min", "max")))
            for series in reply["results"]
            for bucket in series["buckets"]
        ]
        for reply in answers
    ]


def measure(
    bench: Bench, name: str, *, tiered: bool, series: int, days: int, end: int
) -> tuple[dict[str, Any], list[Any]]:
    """Fill one store and measure it: its figures, and its year-long answers."""
    bench.progress.set(f"tiers: writing {days} days x {series} series ({name})")
    db = bench.workdir / f"tiers-{name}.db"
    write = functools.partial(
        fill, db, series=series, days=days, end=end, tiered=tiered, progress=bench.progress.update
    )
    filled = trio.run(write)
    files, live = disk_bytes(db)
    totals = tier_totals(db)
    stored = sum(events for _, events in totals.values())
    if stored != filled.events:
        raise BenchError(f"tiers ({name}): {stored:,} events stored of {filled.events:,}")
    bench.progress.set(f"tiers: year-long queries ({name})")
    local_s, answers = trio.run(local_queries, filled, time.time(), min(series, LOCAL_QUERIES))
    http_s, statuses, refusal = http_queries(
        bench, filled, min(series, HTTP_QUERIES), f"tiers-{name}"
    )
    answered = [s for s, code in zip(http_s, statuses, strict=True) if code == 200]
    figures: dict[str, Any] = {
        "events": filled.events,
        "write_s": round(filled.write_s, 3),
        "events_per_s": round(filled.events / filled.write_s) if filled.write_s else None,
        "file_bytes": files,
        "live_bytes": live,
        "tables": {table: {"rows": r, "events": e} for table, (r, e) in totals.items()},
        "rows": sum(r for r, _ in totals.values()),
        "query_local_ms": _ms(local_s),
        "query_http_ms": _ms(answered),
        "query_http_statuses": sorted(set(statuses)),
        "query_http_refusal": refusal,
        "query_http_any_ms": _ms(http_s),
    }
    if tiered:
        # The first week's rolls have nothing to move yet: the figures are those of the
        # days whose roll moved a day of minutes into hours (the steady state).
        moving = [s for s, rows in zip(filled.roll_s, filled.roll_rows, strict=True) if rows]
        figures.update(
            roll_days=len(moving),
            roll_ms_median=round(statistics.median(moving) * 1e3, 2) if moving else None,
            roll_ms_max=round(max(moving) * 1e3, 2) if moving else None,
            roll_ms_total=round(sum(filled.roll_s) * 1e3, 1),
            rows_rolled=filled.rows_rolled,
            roll_ms_per_day=[round(x * 1e3, 2) for x in filled.roll_s],
        )
    return figures, answers


def compare(bench: Bench, series: int, days: int) -> dict[str, Any]:
    """Fill both stores, measure them, check they agree; the figures (no rows)."""
    end = year_end(time.time())
    figures: dict[str, Any] = {"series": series, "days": days, "tiers": TIERS}
    answers = {}
    for name, tiered in (("tiered", True), ("plain", False)):
        figures[name], answers[name] = measure(
            bench, name, tiered=tiered, series=series, days=days, end=end
        )
    if totals_of(answers["tiered"]) != totals_of(answers["plain"]):
        raise BenchError("tiers: the year-long answers of the tiered and plain stores differ")
    plain, tiered = figures["plain"], figures["tiered"]
    figures["size_plain_over_tiered"] = round(plain["file_bytes"] / tiered["file_bytes"], 2)
    figures["rows_plain_over_tiered"] = round(plain["rows"] / tiered["rows"], 2)
    add_estimate(figures)
    return figures


def add_estimate(figures: dict[str, Any]) -> None:
    """Below issue 22's 1,000 series, add to ``figures`` their estimate for 1,000."""
    series, days = figures["series"], figures["days"]
    tiered, plain = figures["tiered"], figures["plain"]
    if series >= 1_000:  # issue 22's size, measured: nothing to estimate
        return
    # Rows, bytes and the rows a roll moves grow with the series (a query of one key's
    # range does not): issue 22's 1,000 series, estimated linearly, labelled as such.
    # The roll grows faster than that (measured 4-5 x the estimate at 1,000 series, see
    # docs/retention.md): --tiers-series 1000 measures it.
    times = 1_000 / series
    figures["estimate_1000_series"] = {
        "how": f"measured x {times:g} (linear in series), over the same {days} days",
        "tiered_mb": round(tiered["file_bytes"] * times / 2**20),
        "plain_mb": round(plain["file_bytes"] * times / 2**20),
        "roll_ms_median": round((tiered["roll_ms_median"] or 0) * times),
        "roll_ms_max": round((tiered["roll_ms_max"] or 0) * times),
        # what writing a whole year of 1,000 series would take at this run's rate
        "year_write_hours": round(YEAR_EVENTS / tiered["events_per_s"] / 3600, 1),
    }


def summary(facts: dict[str, Any]) -> list[str]:
    """The scenario's lines in the report's FACTS."""
    tiered, plain = facts["tiered"], facts["plain"]
    guess = facts.get("estimate_1000_series")
    refused = plain["query_http_statuses"] != [200]
    http = (
        f"plain over HTTP: {','.join(map(str, plain['query_http_statuses']))} (over the row budget)"
        if refused
        else f"plain over HTTP p50 {plain['query_http_ms']['p50']:.1f} ms"
    )
    size = (
        ""
        if guess is None
        else f" (not 1,000 series: a year of them is 525.6 M events per store, about "
        f"{guess['year_write_hours']} h of writing at this run's rate; --tiers-series 1000)"
    )
    lines = [
        f"tiers: {facts['days']} simulated days x {facts['series']} series of 1-minute data"
        f"{size}; --tiers '{facts['tiers']}'",
        f"tiers: on disk {tiered['file_bytes'] / 2**20:,.1f} MB tiered, "
        f"{plain['file_bytes'] / 2**20:,.1f} MB plain ({facts['size_plain_over_tiered']} x); "
        f"rows {tiered['rows']:,} vs {plain['rows']:,}",
        f"tiers: query of 1 key's {facts['days']} days, by day: tiered over HTTP p50 "
        f"{_num(tiered['query_http_ms']['p50'])} ms; {http}; read + answer p50 "
        f"{_num(tiered['query_local_ms']['p50'])} ms tiered, "
        f"{_num(plain['query_local_ms']['p50'])} ms plain",
        f"tiers: roll per simulated day median {_num(tiered['roll_ms_median'])} ms, max "
        f"{_num(tiered['roll_ms_max'])} ms, over the {tiered['roll_days']} days that rolled "
        f"({tiered['rows_rolled']:,} rows rolled in all)",
    ]
    if guess is not None:
        lines.append(
            f"tiers: for 1,000 series ({guess['how']}): {guess['tiered_mb']:,} MB tiered, "
            f"{guess['plain_mb']:,} MB plain, roll per day median "
            f"{guess['roll_ms_median']:,} ms, max {guess['roll_ms_max']:,} ms (the roll "
            "grows faster than linearly: an underestimate)"
        )
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def tiers_scenario(bench: Bench, sizes: Sizes) -> ScenarioResult:
    result = ScenarioResult("tiers")
    series, days = sizes.tiers_series, sizes.tiers_days
    figures = compare(bench, series, days)
    result.facts.update(figures)
    size = f"{days} days x {series} series"
    for name in ("tiered", "plain"):
        f = figures[name]
        mb = f["file_bytes"] / 2**20
        note = f"{mb:,.1f} MB on disk, {f['rows']:,} rows"
        if name == "tiered":
            note += (
                f"; roll per simulated day median {_num(f['roll_ms_median'])} ms, "
                f"max {_num(f['roll_ms_max'])} ms"
            )
        result.rows.append(
            Row(
                scenario="tiers",
                key=f"write {name}",
                what=f"{size}, {name}",
                system="trioagg",
                unit="events/s",
                rate=float(f["events_per_s"] or 0),
                elapsed_s=f["write_s"],
                requests=0,
                events=f["events"],
                latency_ms=dict(_NO_LATENCY),
                server_cpu_1k=None,
                client_cpu_1k=None,
                client_share=None,
                note=note,
            )
        )
        http = f["query_http_ms"] if f["query_http_ms"]["p50"] is not None else None
        local = f["query_local_ms"]
        if http is not None:
            latency, how = http, f"HTTP, read + answer p50 {local['p50']:.0f} ms"
        else:
            latency = local
            statuses = ",".join(map(str, f["query_http_statuses"]))
            refused = f["query_http_any_ms"]["p50"] or 0
            how = f"read + answer; HTTP {statuses} in {refused:.0f} ms (over the row budget)"
        p50 = latency["p50"] or 0
        result.rows.append(
            Row(
                scenario="tiers",
                key=f"year query {name}",
                what=f"1 key, {days} d by day, {name}",
                system="trioagg",
                unit="req/s",
                rate=1e3 / p50 if p50 else 0.0,
                elapsed_s=0.0,
                requests=len(f["query_http_statuses"]),
                events=0,
                latency_ms=latency,
                server_cpu_1k=None,
                client_cpu_1k=None,
                client_share=None,
                note=how,
            )
        )
    return result
