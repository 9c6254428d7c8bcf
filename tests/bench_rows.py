"""Made-up rows of the bench's table, for the tests of its targets, ratios and report."""

from __future__ import annotations

from bench.scenarios import Row


def bench_row(
    scenario: str,
    key: str,
    system: str,
    rate: float,
    unit: str = "req/s",
    *,
    events: int = 100,
    elapsed_s: float = 1.0,
) -> Row:
    return Row(
        scenario=scenario,
        key=key,
        what=key,
        system=system,
        unit=unit,
        rate=rate,
        elapsed_s=elapsed_s,
        requests=100,
        events=events,
        latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.5},
        server_cpu_1k=0.5,
        client_cpu_1k=0.05,
        client_share=0.1,
    )
