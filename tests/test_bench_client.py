"""The client scenario's targets (bench/clientpath.py), from made-up results."""

from __future__ import annotations

from typing import Any

from bench.scenarios import ScenarioResult, client_targets


def _facts(
    thread_rate: int, total_s: float, ingest_rate: int, rss_mb: float, go_s: float | None = 1.3
) -> dict[str, Any]:
    run = {"events_per_s": thread_rate, "total_s": total_s}
    return {
        "per_request_events_per_s": 3_000,
        "go_design_s": go_s,
        "thread": run,
        "tasks": run,
        "ingest": {"events_per_s": ingest_rate, "peak_rss_mb": rss_mb},
    }


def test_client_targets_pass_and_miss_on_their_thresholds() -> None:
    good = ScenarioResult("client", facts=_facts(60_001, 0.5, 150_001, 199))
    assert [t.status for t in client_targets({"client": good})] == ["PASS"] * 5
    bad = ScenarioResult("client", facts=_facts(59_999, 1.3, 150_001, 200))
    assert [t.status for t in client_targets({"client": bad})] == ["MISS"] * 5


def test_the_client_is_timed_against_the_go_design_of_the_same_run() -> None:
    slow_day = ScenarioResult("client", facts=_facts(60_001, 2.0, 150_001, 199, go_s=2.5))
    assert [t.status for t in client_targets({"client": slow_day})] == ["PASS"] * 5
    fast_go = ScenarioResult("client", facts=_facts(60_001, 2.0, 150_001, 199, go_s=1.9))
    statuses = [t.status for t in client_targets({"client": fast_go})]
    assert statuses == ["PASS", "MISS", "PASS", "MISS", "PASS"]
    no_go = ScenarioResult("client", facts=_facts(60_001, 0.5, 150_001, 199, go_s=None))
    statuses = [t.status for t in client_targets({"client": no_go})]
    assert statuses == ["PASS", "SKIP", "PASS", "SKIP", "PASS"]


def test_client_targets_skip_when_not_run() -> None:
    assert [t.status for t in client_targets({})] == ["SKIP"]
    failed = ScenarioResult("client", error="server did not start")
    assert [t.status for t in client_targets({"client": failed})] == ["SKIP"]
