"""The ``wrk`` scenario: the batch figure cross-checked with a standard tool.

`wrk <https://github.com/wg/wrk>`_ (the Debian package ``wrk``) posts 1,000-event
JSON arrays over 1,000 keys x 24 h (``bench/wrk_batch.lua``) on 16 connections
against trioagg in its recommended deployment (``trioagg serve --workers 2``), on
the hypercorn CLI (trio workers, ``-w 2``), and against the seed's Go design, each
on a fresh SQLite file. Each server then gets SIGTERM; what counts is what it **committed**:
``sum(count)`` of its store after the drain, over wrk's time plus the drain. The
exact wrk command lines are printed, so a user can run them by hand.

The store must hold every acknowledged event (2xx answers x events per request)
and at most one more request's events per connection (those in flight when wrk
stopped, which the server may still commit).
"""

from __future__ import annotations

import re
import resource
import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import godesign, verify
from .loadgen import process_cpu, system_busy_cpu
from .runner import OTHER_UTIL_LIMIT, Bench, Measurement
from .scenarios import BATCH_CONNECTIONS, BATCH_EVENTS, KEYS, Row, ScenarioResult, Sizes
from .server import DEFAULT_WORKERS, Deployment, Server, ServerError, command

SCRIPT = Path(__file__).resolve().parent / "wrk_batch.lua"
#: one wrk thread: the requests are rendered before the clock starts, so one is plenty,
#: and it leaves the server more of a 2-core machine
WRK_THREADS = 1
POOL = 64
SKIP_LINE = "wrk cross-check skipped: wrk not found (apt-get install wrk)"

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_DONE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.M)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M)
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


class WrkOutputError(ValueError):
    """wrk's output lacks the summary line (it failed or was interrupted)."""


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures of wrk's standard report (run with ``--latency``): completed requests,
    duration, non-2xx answers, socket errors and the latency percentiles in ms."""
    done = _DONE.search(text)
    if done is None:
        raise WrkOutputError(f"no 'N requests in T' line in wrk's output: {text[-300:]!r}")
    non_2xx = _NON_2XX.search(text)
    socket = _SOCKET.search(text)
    latency = {
        f"p{number}": round(float(value) * _UNITS_MS[unit], 3)
        for number, value, unit in _PERCENTILE.findall(text)
    }
    return {
        "requests": int(done[1]),
        "duration_s": float(done[2]) * _UNITS_MS[done[3]] / 1000,
        "non_2xx": int(non_2xx[1]) if non_2xx else 0,
        "socket_errors": sum(map(int, socket.groups())) if socket else 0,
        "latency_ms": latency,
    }


def wrk_command(
    url: str,
    seconds: float,
    day_start: int,
    *,
    connections: int = BATCH_CONNECTIONS,
    keys: int = KEYS,
    events: int = BATCH_EVENTS,
    script: Path | str = SCRIPT,
) -> list[str]:
    """The wrk command line of one cross-check run."""
    return [
        "wrk",
        "-t",
        str(WRK_THREADS),
        "-c",
        str(connections),
        "-d",
        f"{seconds:g}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(day_start),
        str(keys),
        str(events),
        str(POOL),
    ]


def committed_check(acked: int, stored: int, in_flight_max: int) -> list[str]:
    """Problems of one run's store: an acknowledged event missing, or more stored than
    was acknowledged plus what could have been in flight when wrk stopped."""
    if stored < acked:
        return [f"store has {stored} events, {acked} acknowledged: {acked - stored} lost"]
    if stored > acked + in_flight_max:
        return [
            f"store has {stored} events, {acked} acknowledged and at most {in_flight_max} "
            "in flight: more stored than was sent"
        ]
    return []


def _systems(bench: Bench) -> list[tuple[str, str, str, Deployment]]:
    """(row key, app, label, deployment) of each server wrk is run against."""
    run = bench.options.deployment
    serve = replace(run, deploy="serve", workers=DEFAULT_WORKERS, hypercorn_args=())
    hypercorn = replace(run, deploy="hypercorn", workers=DEFAULT_WORKERS)
    systems = [
        ("wrk", "trioagg", f"trioagg serve --workers {DEFAULT_WORKERS}", serve),
        ("wrk hypercorn", "trioagg", f"trioagg hypercorn -w {DEFAULT_WORKERS}", hypercorn),
    ]
    if bench.options.baselines and bench.go_binary() is not None:
        systems.append(("wrk", godesign.APP, "the seed's Go design", serve))
    return systems


def wrk_scenario(bench: Bench, sizes: Sizes) -> ScenarioResult:
    """wrk (16 connections, 1,000-event JSON arrays, 1,000 keys x 24 h) against trioagg
    serve -w 2, trioagg on hypercorn -w 2 and the Go design: committed events/s including
    the drain."""
    result = ScenarioResult("wrk")
    if shutil.which("wrk") is None:
        bench.warn(SKIP_LINE)
        result.facts["skipped"] = SKIP_LINE
        return result
    commands = []
    for key, app, label, deployment in _systems(bench):
        m, row, line = _run_one(bench, key, app, label, deployment, sizes.wrk_s)
        result.measurements.append(m)
        result.rows.append(row)
        commands.append({"system": label, "command": line})
    result.facts["commands"] = commands
    go = result.row("wrk", godesign.APP)
    if go is not None and go.rate:
        result.facts["trioagg_over_go"] = {
            row.key: round(row.rate / go.rate, 3) for row in result.rows if row.system == "trioagg"
        }
    return result


def _run_one(
    bench: Bench, key: str, app: str, label: str, deployment: Deployment, seconds: float
) -> tuple[Measurement, Row, str]:
    stem = f"wrk-{key.replace(' ', '-')}-{app}"
    db = bench.workdir / f"{stem}.db"
    verify.remove_store(db)
    go_binary = bench.go_binary() if app == godesign.APP else None
    argv, env = command(app, deployment, db, (), go_binary)
    server = Server(
        app,
        argv,
        env,
        bench.workdir / f"{stem}.log",
        workers=deployment.workers_of(app),
        trioagg_src=deployment.trioagg_src,
    )
    bench.progress.set(f"wrk: {label} starting")
    try:
        server.start()
        argv_wrk = wrk_command(f"http://127.0.0.1:{server.port}", seconds, bench.day_start)
        line = shlex.join(argv_wrk)
        bench.progress.note(f"wrk against {label}: {line}")
        bench.progress.set(f"wrk: {label}")
        before = _cpu(server.pids)
        ran = subprocess.run(argv_wrk, capture_output=True, text=True, timeout=seconds + 120)
        cpu = {name: round(after - before[name], 3) for name, after in _cpu(server.pids).items()}
        exit_code = server.stop()
    except BaseException:
        server.kill()
        raise
    if ran.returncode != 0:
        raise ServerError(f"wrk exited with {ran.returncode}: {ran.stderr.strip()[-300:]}")
    figures = parse_wrk(ran.stdout)
    cpu["other_s"] = round(max(0.0, cpu.pop("busy_s") - cpu["server_s"] - cpu["client_s"]), 3)
    if cpu["other_s"] / max(figures["duration_s"], 0.1) >= OTHER_UTIL_LIMIT:
        bench.warn(
            f"BUSY MACHINE during wrk / {label}: other processes used "
            f"{cpu['other_s'] / figures['duration_s']:.0%} of a core; its figures are pessimistic"
        )
    stored, rows = verify.store_totals(db)
    acked = (figures["requests"] - figures["non_2xx"]) * BATCH_EVENTS
    drain = server.stopped_s
    verdict = verify.verdict(
        acked=acked,
        stored=None,
        exit_code=exit_code,
        errors=figures["socket_errors"],
        unexpected={"non-2xx": figures["non_2xx"]} if figures["non_2xx"] else None,
    )
    verdict["problems"] += committed_check(acked, stored, BATCH_CONNECTIONS * BATCH_EVENTS)
    verdict.update(ok=not verdict["problems"], stored_events=stored)
    rate = godesign.committed_rate(stored, figures["duration_s"], drain)
    measurement = Measurement(
        label=f"wrk {label}",
        app=app,
        phases={"wrk": {"command": line, "stdout": ran.stdout, "cpu": cpu, **figures}},
        server={
            "argv": argv,
            "env": env,
            "deploy": deployment.describe() if app == "trioagg" else "one Go process",
            "stop_s": round(drain, 3),
            "exit_code": exit_code,
        },
        store={"events": stored, "rows": rows},
        verdict=verdict,
    )
    bench.record(measurement, db, f"wrk {label}")
    row = Row(
        scenario="wrk",
        key=key,
        what=f"wrk, {label}",
        system=app,
        unit="events/s",
        rate=rate,
        elapsed_s=figures["duration_s"],
        requests=figures["requests"],
        events=stored,
        latency_ms={
            "p50": figures["latency_ms"].get("p50"),
            "p95": None,
            "p99": figures["latency_ms"].get("p99"),
        },
        server_cpu_1k=_per_1k(cpu["server_s"], figures["requests"]),
        client_cpu_1k=_per_1k(cpu["client_s"], figures["requests"]),
        client_share=round(cpu["client_s"] / cpu["server_s"], 3) if cpu["server_s"] else None,
        note=f"committed incl. {drain:.2f} s drain",
    )
    return measurement, row, line


def _cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far: the server's processes, this process's reaped children (wrk
    once it has exited) and the whole machine."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "server_s": sum(process_cpu(pid) for pid in pids),
        "client_s": children.ru_utime + children.ru_stime,
        "busy_s": system_busy_cpu(),
    }


def _per_1k(seconds: float, requests: int) -> float | None:
    return round(seconds / requests * 1000, 4) if requests else None
