"""The ``client`` scenario: the seed's single events through ``trioagg.client``.

Users send one event at a time; the client batches them. This scenario sends
the seed's 30 K single events (1,000 keys over 24 h) three ways against fresh
servers of the run's deployment: one event per request (the load generator,
as the seed scenario does), ``Client.send()`` from one thread, and
``AsyncClient.send()`` from 64 trio tasks. For the client paths it reports
events/s of the ``send()`` calls and the time until all are committed
(``close()`` returns after the last durable answer), next to the Go design's
own run of the same events, one request each, in the same run (committed:
its drain after SIGTERM included), when it can be built here. Then ``trioagg ingest`` of
an NDJSON file of 1 M lines: events/s end to end and the client's peak RSS.
Every path's store must hold exactly the events sent.

The client runs in a child process of its own (``python -m bench.clientpath
SPEC``), like the load generator, so its CPU does not slow the harness.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from . import verify
from .runner import Bench, BenchError
from .scenarios import (
    DAY,
    KEYS,
    Row,
    ScenarioResult,
    Sizes,
    committed_row,
    go_design,
    make_row,
    writes_phase,
)
from .server import Server, command, python_path

TASKS = 64
_NO_LATENCY: dict[str, float | None] = {"p50": None, "p95": None, "p99": None}


def client_scenario(bench: Bench, sizes: Sizes) -> ScenarioResult:
    result = ScenarioResult("client")
    events = sizes.client_events
    what = f"{events:,} single events"
    single = bench.measure(
        "client one-per-request", "trioagg", [writes_phase(bench, events, pool=events)]
    )
    result.measurements.append(single)
    per_request = make_row(
        "client",
        "per-request",
        f"{what}, 1 per request",
        single,
        "writes",
        "w",
        "write",
        unit="events/s",
    )
    result.rows.append(per_request)
    go = go_design(bench, "client go one-per-request", [writes_phase(bench, events, pool=events)])
    go_s = None
    if go is not None:
        result.measurements.append(go)
        go_row = committed_row(
            make_row(
                "client",
                "per-request",
                f"{what}, 1 per request",
                go,
                "writes",
                "w",
                "write",
                unit="events/s",
            ),
            go,
        )
        result.rows.append(go_row)
        # The time until the Go design had committed all it acknowledged.
        go_s = go_row.events / go_row.rate if go_row.rate else None
        result.facts["go_design_s"] = round(go_s, 4) if go_s else None
    for mode, label in (("thread", "Client, 1 thread"), ("tasks", f"AsyncClient, {TASKS} tasks")):
        run = _on_server(bench, f"client {mode}", events, _drive, mode=mode, events=events)
        rate = events / run["total_s"]
        result.rows.append(
            _row(f"client-{mode}", f"{what}, {label}", rate, run["total_s"], run, events)
        )
        result.facts[mode] = {
            **run,
            "events_per_s": round(rate),
            "x_per_request": round(rate / per_request.rate, 1) if per_request.rate else None,
            "x_go_design": round(go_s / run["total_s"], 2) if go_s else None,
        }
    lines = sizes.ingest_lines
    run = _on_server(bench, "client ingest", lines, _ingest, lines=lines)
    rate = lines / run["total_s"]
    result.rows.append(
        _row("ingest", f"trioagg ingest, {lines:,} lines", rate, run["total_s"], run, lines)
    )
    result.facts["ingest"] = {**run, "events_per_s": round(rate)}
    result.facts["per_request_events_per_s"] = round(per_request.rate)
    return result


def _row(key: str, what: str, rate: float, elapsed: float, run: dict[str, Any], n: int) -> Row:
    note = f"send {run['send_s']:.2f}s, committed {run['total_s']:.2f}s"
    if run.get("peak_rss_mb") is not None:
        note = f"client peak RSS {run['peak_rss_mb']:.0f} MB"
    return Row(
        scenario="client",
        key=key,
        what=what,
        system="trioagg",
        unit="events/s",
        rate=rate,
        elapsed_s=elapsed,
        requests=run.get("requests", 0),
        events=n,
        latency_ms=dict(_NO_LATENCY),
        server_cpu_1k=None,
        client_cpu_1k=None,
        client_share=None,
        note=note,
    )


def _on_server(bench: Bench, label: str, expected: int, work: Any, **spec: Any) -> dict[str, Any]:
    """Run ``work`` against a fresh trioagg server on a SQLite file; check the store."""
    deployment = bench.options.deployment
    db = bench.workdir / f"{label.replace(' ', '_')}.db"
    verify.remove_store(db)
    argv, env = command("trioagg", deployment, db)
    log = bench.workdir / f"{label.replace(' ', '_')}.log"
    server = Server(
        "trioagg", argv, env, log, workers=deployment.workers, trioagg_src=deployment.trioagg_src
    )
    bench.progress.set(f"{label}: starting")
    try:
        server.start()
        bench.progress.set(label)
        run: dict[str, Any] = work(bench, f"http://127.0.0.1:{server.port}", **spec)
        exit_code = server.stop()
    except BaseException:
        server.kill()
        raise
    stored, _ = verify.store_totals(db)
    if exit_code != 0 or stored != expected:
        raise BenchError(
            f"{label}: {stored:,} events stored of {expected:,} sent (server exit {exit_code})"
        )
    run["stored"] = stored
    return run


def _child_env(bench: Bench) -> dict[str, str]:
    env = dict(os.environ)
    src = bench.options.deployment.trioagg_src
    env["PYTHONPATH"] = python_path(src, env.get("PYTHONPATH"))
    return env


def _drive(bench: Bench, url: str, *, mode: str, events: int) -> dict[str, Any]:
    spec = {"url": url, "mode": mode, "events": events, "start": bench.day_start}
    done = subprocess.run(
        [sys.executable, "-m", "bench.clientpath", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_child_env(bench),
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"client {mode}: exit {done.returncode}: {done.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _ingest(bench: Bench, url: str, *, lines: int) -> dict[str, Any]:
    path = bench.workdir / f"ingest-{lines}.ndjson"
    rng = random.Random(7)
    with open(path, "w") as out:
        for _ in range(lines):
            key = rng.randrange(KEYS)
            ts = bench.day_start + rng.random() * DAY
            out.write(f'{{"key":"bench.key.{key}","ts":{ts:.3f},"value":{rng.random():.4f}}}\n')
    argv = [sys.executable, "-m", "trioagg", "ingest", str(path), "--url", url, "--no-progress"]
    began = time.perf_counter()
    process = subprocess.Popen(
        argv, env=_child_env(bench), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    summary = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    path.unlink()
    if process.returncode != 0:
        raise BenchError(f"trioagg ingest: exit {process.returncode}: {summary[-2000:]}")
    return {
        "send_s": total,
        "total_s": total,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "summary": summary.strip().splitlines()[-1],
    }


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: send the events, one ``send()`` each, and time it."""
    import trio

    from trioagg.client import AsyncClient, Client

    rng = random.Random(7)
    items = [
        (f"bench.key.{rng.randrange(KEYS)}", spec["start"] + rng.random() * DAY)
        for _ in range(spec["events"])
    ]
    if spec["mode"] == "thread":
        client = Client(spec["url"])
        began = time.perf_counter()
        for key, ts in items:
            client.send(key, ts=ts)
        sent = time.perf_counter()
        client.close()
        counters = client.counters
    else:

        async def main() -> tuple[float, float, Any]:
            async with AsyncClient(spec["url"]) as client:
                began = time.perf_counter()

                async def task(share: list[tuple[str, float]]) -> None:
                    for key, ts in share:
                        await client.send(key, ts=ts)
                        await trio.lowlevel.checkpoint()  # tasks take turns, as real ones do

                async with trio.open_nursery() as nursery:
                    for n in range(TASKS):
                        nursery.start_soon(task, items[n::TASKS])
                sent = time.perf_counter()
            return began, sent, client.counters

        began, sent, counters = trio.run(main)
    done = time.perf_counter()
    if counters.acknowledged != len(items) or counters.failed:
        raise SystemExit(f"acknowledged {counters.acknowledged} of {len(items)}: {counters}")
    return {
        "send_s": round(sent - began, 4),
        "total_s": round(done - began, 4),
        "retried": counters.retried,
        "duplicates": counters.duplicates,
    }


if __name__ == "__main__":
    print(json.dumps(drive(json.loads(sys.argv[1]))))
