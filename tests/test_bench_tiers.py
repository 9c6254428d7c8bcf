"""The bench's ``tiers`` scenario (``bench.retention``) at a tiny size: a few series
over a few simulated days, in real SQLite files, and once whole with real servers.

Its figures are checked for sense (the tiered store holds the same events and
answers as the plain one, in fewer rows; each roll moved a day of minutes), never
for timing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench import report, retention, scenarios
from bench.retention import Filled
from bench.runner import Bench, Options, Progress
from bench.scenarios import DAY

from . import clock

SERIES = 2
DAYS = 10  # three days past the finest tier's 7: three rolls that move rows


async def fill_both(tmp_path: Path) -> tuple[Filled, Filled]:
    end = retention.year_end(clock.now())
    tiered = await retention.fill(
        tmp_path / "tiered.db", series=SERIES, days=DAYS, end=end, tiered=True
    )
    plain = await retention.fill(
        tmp_path / "plain.db", series=SERIES, days=DAYS, end=end, tiered=False
    )
    return tiered, plain


async def test_a_tiered_store_holds_the_same_events_in_fewer_rows(tmp_path: Path) -> None:
    tiered, plain = await fill_both(tmp_path)
    events = SERIES * DAYS * 1_440
    assert tiered.events == plain.events == events
    assert (tiered.start, tiered.end) == (plain.start, plain.end)
    assert plain.end - plain.start == DAYS * DAY and plain.end % 3600 == 0
    # the first 7 days' rolls have nothing past the horizon; each later one moves the
    # minutes of the day that just left the 7 days into hours
    assert tiered.roll_rows == [0] * 7 + [SERIES * 1_440] * (DAYS - 7)
    assert plain.roll_rows == [] and plain.roll_s == []

    by_table = retention.tier_totals(tiered.db)
    assert by_table == {
        "rollups": (SERIES * 7 * 1_440, SERIES * 7 * 1_440),
        "rollups_3600": (SERIES * (DAYS - 7) * 24, SERIES * (DAYS - 7) * 1_440),
        "rollups_86400": (0, 0),
    }
    assert retention.tier_totals(plain.db) == {"rollups": (events, events)}
    tiered_files, tiered_live = retention.disk_bytes(tiered.db)
    plain_files, plain_live = retention.disk_bytes(plain.db)
    assert 0 < tiered_live < plain_live <= plain_files
    assert tiered_live <= tiered_files


async def test_both_stores_answer_the_whole_range_alike(tmp_path: Path) -> None:
    tiered, plain = await fill_both(tmp_path)
    _, tiered_answers = await retention.local_queries(tiered, clock.now(), SERIES)
    _, plain_answers = await retention.local_queries(plain, clock.now(), SERIES)
    tiered_totals = retention.totals_of(tiered_answers)
    assert tiered_totals == retention.totals_of(plain_answers)
    for number, buckets in enumerate(tiered_totals):
        # every minute of the range once, summed as generated
        assert sum(bucket[1] for bucket in buckets) == DAYS * 1_440
        first = tiered.start // 60
        expected = sum(retention.value_of(number, m) for m in range(first, first + DAYS * 1_440))
        assert sum(bucket[2] for bucket in buckets) == expected
        assert len(buckets) in (DAYS, DAYS + 1)  # UTC days: the range may start mid-day


def test_tiers_is_a_scenario_of_the_full_and_the_quick_runs() -> None:
    assert "tiers" in scenarios.SCENARIOS and "tiers" in scenarios.QUICK_SCENARIOS
    assert scenarios.RUNNERS["tiers"] is scenarios.tiers
    assert scenarios.FULL.tiers_days == 365
    quick = scenarios.QUICK
    assert quick.tiers_days > 7 and quick.tiers_series < scenarios.FULL.tiers_series


@pytest.mark.slow
def test_the_scenario_measures_both_stores_over_http(tmp_path: Path) -> None:
    bench = Bench(Options(workdir=tmp_path), Progress())
    sizes = replace(scenarios.QUICK, tiers_series=2, tiers_days=9)
    result = scenarios.tiers(bench, sizes)
    facts = result.facts
    tiered, plain = facts["tiered"], facts["plain"]
    assert tiered["events"] == plain["events"] == 2 * 9 * 1_440
    assert tiered["rows"] < plain["rows"]
    assert facts["rows_plain_over_tiered"] > 1
    # nine days of one key are within the row budget: both answer over HTTP
    assert tiered["query_http_statuses"] == plain["query_http_statuses"] == [200]
    assert tiered["roll_days"] == 2 and tiered["rows_rolled"] == 2 * 2 * 1_440
    assert tiered["roll_ms_max"] >= tiered["roll_ms_median"] > 0
    assert [row.key for row in result.rows] == [
        "write tiered",
        "year query tiered",
        "write plain",
        "year query plain",
    ]
    assert all(row.latency_ms["p50"] for row in result.rows if "query" in row.key)
    lines = report._facts({"tiers": result})
    assert lines[0].startswith("tiers: 9 simulated days x 2 series of 1-minute data")
    assert any("roll per simulated day median" in line for line in lines)


def test_the_simulated_year_ends_at_the_current_hour() -> None:
    assert retention.year_end(7_200 + 3_599.9) == 7_200
    assert retention.year_end(7_200) == 7_200


def facts_of(series: int) -> dict[str, object]:
    """The figures compare() makes, for ``series`` series over 9 days (made up)."""
    tiered = {
        "file_bytes": 2**20,
        "rows": 100,
        "query_http_ms": {"p50": 5.0},
        "query_local_ms": {"p50": 4.0},
        "roll_ms_median": 10.0,
        "roll_ms_max": 20.0,
        "roll_days": 2,
        "rows_rolled": 2_880 * series,
        "events_per_s": 80_000.0,
    }
    plain = {
        "file_bytes": 2**22,
        "rows": 400,
        "query_http_statuses": [200],
        "query_http_ms": {"p50": 6.0},
        "query_local_ms": {"p50": 5.0},
    }
    return {
        "series": series,
        "days": 9,
        "tiers": retention.TIERS,
        "tiered": tiered,
        "plain": plain,
        "size_plain_over_tiered": 4.0,
    }


def test_the_summary_estimates_1000_series_only_below_them() -> None:
    few = facts_of(20)
    retention.add_estimate(few)
    lines = retention.summary(few)
    assert "not 1,000 series" in lines[0] and "--tiers-series 1000" in lines[0]
    assert lines[-1].startswith("tiers: for 1,000 series (measured x 50")
    whole = facts_of(1_000)
    retention.add_estimate(whole)
    assert "estimate_1000_series" not in whole
    lines = retention.summary(whole)
    assert "not 1,000 series" not in lines[0]
    assert not any("for 1,000 series" in line for line in lines)
