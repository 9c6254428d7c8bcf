"""The client scenario's targets (bench/clientpath.py), from made-up results."""

from __future__ import annotations

from typing import Any

from bench.scenarios import ScenarioResult, client_targets


def _facts(thread_rate: int, total_s: float, ingest_rate: int, rss_mb: float) -> dict[str, Any]:
    run = {"events_per_s": thread_rate, "total_s": total_s}
    return {
        "per_request_events_per_s": 3_000,
        "thread": run,
        "tasks": run,
        "ingest": {"events_per_s": ingest_rate, "peak_rss_mb": rss_mb},
    }


def test_client_targets_pass_and_miss_on_their_thresholds() -> None:
    good = ScenarioResult("client", facts=_facts(60_001, 0.5, 150_001, 199))
    assert [t.status for t in client_targets({"client": good})] == ["PASS"] * 5
    bad = ScenarioResult("client", facts=_facts(59_999, 1.3, 150_001, 200))
    assert [t.status for t in client_targets({"client": bad})] == ["MISS"] * 5


def test_client_targets_skip_when_not_run() -> None:
    assert [t.status for t in client_targets({})] == ["SKIP"]
    failed = ScenarioResult("client", error="server did not start")
    assert [t.status for t in client_targets({"client": failed})] == ["SKIP"]
