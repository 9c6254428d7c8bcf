"""The ``protocols`` scenario: the same events through each protocol trioagg speaks.

One fresh server of the run's deployment, with ``--statsd``, takes the same number
of events (1,000 keys over the bench's day) three ways, one after the other, in
the same run: ``POST /v1/events`` with 1,000-event JSON arrays (the reference),
OTLP/HTTP exports of 1,000 delta Sum points each (protobuf, as the exporter sends
them; each point's event carries an id), and StatsD counter lines over UDP in
datagrams of 25 lines with DogStatsD timestamps. Each is timed from its first
send until ``/v1/status`` counts every one of its events committed, and reported
in events/s. StatsD has no answer to wait for: the sender keeps at most
:data:`UDP_IN_FLIGHT` datagrams ahead of what the server has read (closed loop),
so that the kernel's buffer does not overflow, and the events the server dropped
are reported. The store must hold exactly the events committed.

The sender runs in a child process of its own (``python -m bench.protocols
SPEC``), so its CPU does not slow the harness.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from typing import Any

from . import verify
from .clientpath import _child_env
from .runner import Bench, BenchError
from .scenarios import DAY, KEYS, Row, ScenarioResult, Sizes
from .server import Server, command

#: Events a JSON request or an OTLP export carries.
PER_REQUEST = 1_000
#: Concurrent senders of JSON requests and OTLP exports.
CONNECTIONS = 8
LINES_PER_DATAGRAM = 25
#: Datagrams sent ahead of what the server has read.
UDP_IN_FLIGHT = 40
PROTOCOLS = ("json", "otlp", "statsd")
_NO_LATENCY: dict[str, float | None] = {"p50": None, "p95": None, "p99": None}


def protocols_scenario(bench: Bench, sizes: Sizes) -> ScenarioResult:
    result = ScenarioResult("protocols")
    events = sizes.protocol_events
    deployment = bench.options.deployment
    db = bench.workdir / "protocols.db"
    verify.remove_store(db)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a free UDP port
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    argv, env = command("trioagg", deployment, db, ["--statsd", f"127.0.0.1:{udp_port}"])
    server = Server(
        "trioagg",
        argv,
        env,
        bench.workdir / "protocols.log",
        workers=deployment.workers,
        trioagg_src=deployment.trioagg_src,
    )
    bench.progress.set("protocols: starting")
    try:
        server.start()
        runs = {}
        for protocol in PROTOCOLS:
            bench.progress.set(f"protocols: {protocol}")
            spec = {
                "url": f"http://127.0.0.1:{server.port}",
                "udp_port": udp_port,
                "protocol": protocol,
                "events": events,
                "start": bench.day_start,
            }
            runs[protocol] = _send(bench, spec)
        exit_code = server.stop()
    except BaseException:
        server.kill()
        raise
    stored, _ = verify.store_totals(db)
    committed = sum(run["committed"] for run in runs.values())
    if exit_code != 0 or stored != committed:
        raise BenchError(
            f"protocols: {stored:,} events stored of {committed:,} committed "
            f"(server exit {exit_code})"
        )
    reference = runs["json"]["events_per_s"]
    for protocol, run in runs.items():
        what = {
            "json": f"POST /v1/events, {PER_REQUEST:,}-event arrays",
            "otlp": f"POST /v1/metrics, {PER_REQUEST:,}-point protobuf exports",
            "statsd": f"StatsD over UDP, {LINES_PER_DATAGRAM} lines a datagram",
        }[protocol]
        note = f"{run['committed']:,} committed in {run['total_s']:.2f}s"
        if run.get("dropped"):
            note += f", {run['dropped']:,} dropped"
        result.rows.append(
            Row(
                scenario="protocols",
                key=protocol,
                what=what,
                system="trioagg",
                unit="events/s",
                rate=run["events_per_s"],
                elapsed_s=run["total_s"],
                requests=run["requests"],
                events=run["committed"],
                latency_ms=dict(_NO_LATENCY),
                server_cpu_1k=None,
                client_cpu_1k=None,
                client_share=None,
                note=note,
            )
        )
        result.facts[protocol] = {
            **run,
            "x_json": round(run["events_per_s"] / reference, 3) if reference else None,
        }
    result.facts["stored"] = stored
    return result


def _send(bench: Bench, spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.protocols", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_child_env(bench),
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        failure = f"exit {done.returncode}: {done.stderr[-2000:]}"
        raise BenchError(f"protocols {spec['protocol']}: {failure}")
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


# ---------------------------------------------------------------------- in the child


def _status(client: Any) -> dict[str, Any]:
    found: dict[str, Any] = client.get("/v1/status").json()
    return found


def _json_bodies(spec: dict[str, Any], rng: random.Random) -> list[bytes]:
    bodies = []
    for _ in range(spec["events"] // PER_REQUEST):
        events = [
            {
                "key": f"bench.json.{rng.randrange(KEYS)}",
                "ts": spec["start"] + rng.random() * DAY,
                "value": rng.randrange(100),
            }
            for _ in range(PER_REQUEST)
        ]
        bodies.append(json.dumps(events).encode())
    return bodies


def _otlp_bodies(spec: dict[str, Any], rng: random.Random) -> list[bytes]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_DELTA

    bodies = []
    for _ in range(spec["events"] // PER_REQUEST):
        request = ExportMetricsServiceRequest()
        scope = request.resource_metrics.add().scope_metrics.add()
        by_key: dict[int, Any] = {}
        for _ in range(PER_REQUEST):
            key = rng.randrange(KEYS)
            metric = by_key.get(key)
            if metric is None:
                metric = by_key[key] = scope.metrics.add(name=f"bench.otlp.{key}")
                metric.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
                metric.sum.is_monotonic = True
            at = int((spec["start"] + rng.random() * DAY) * 1e9)
            point = metric.sum.data_points.add(start_time_unix_nano=at - 1, time_unix_nano=at)
            point.as_int = rng.randrange(100)  # its time (in ns) makes its id its own
        bodies.append(request.SerializeToString())
    return bodies


def _statsd_datagrams(spec: dict[str, Any], rng: random.Random) -> list[bytes]:
    datagrams = []
    for _ in range(spec["events"] // LINES_PER_DATAGRAM):
        lines = [
            f"bench.statsd.{rng.randrange(KEYS)}:{rng.randrange(100)}|c"
            f"|T{int(spec['start'] + rng.random() * DAY)}"
            for _ in range(LINES_PER_DATAGRAM)
        ]
        datagrams.append("\n".join(lines).encode())
    return datagrams


def _post_all(url: str, path: str, content_type: str, bodies: list[bytes]) -> None:
    import httpx
    import trio

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:

            async def sender(share: list[bytes]) -> None:
                for body in share:
                    answer = await client.post(
                        path, content=body, headers={"Content-Type": content_type}
                    )
                    if answer.status_code != 200 or b"rejected" in answer.content:
                        raise SystemExit(f"{path}: {answer.status_code} {answer.text[:300]}")

            async with trio.open_nursery() as nursery:
                for n in range(CONNECTIONS):
                    nursery.start_soon(sender, bodies[n::CONNECTIONS])

    trio.run(main)


def _keep_up(client: Any, sent: int, read_before: int) -> None:
    """Wait until the server has read all but UDP_IN_FLIGHT of ``sent`` datagrams, or
    read none for a second (the kernel dropped some: they never come)."""
    read, since = -1, time.monotonic()
    while True:
        now_read = _status(client)["statsd_datagrams"] - read_before
        if sent - now_read <= UDP_IN_FLIGHT or time.monotonic() - since > 1.0:
            return
        if now_read != read:
            read, since = now_read, time.monotonic()
        time.sleep(0.001)


def drive(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: send ``spec["events"]`` events by one protocol, and time them until
    the server counts them committed."""
    import httpx

    rng = random.Random(7)
    protocol = spec["protocol"]
    with httpx.Client(base_url=spec["url"], timeout=60) as client:
        before = _status(client)
        dropped_before = before["statsd_events_dropped"]
        if protocol == "json":
            bodies = _json_bodies(spec, rng)
            began = time.perf_counter()
            _post_all(spec["url"], "/v1/events", "application/json", bodies)
            requests = len(bodies)
        elif protocol == "otlp":
            bodies = _otlp_bodies(spec, rng)
            began = time.perf_counter()
            _post_all(spec["url"], "/v1/metrics", "application/x-protobuf", bodies)
            requests = len(bodies)
        else:
            datagrams = _statsd_datagrams(spec, rng)
            read_before = before["statsd_datagrams"]
            began = time.perf_counter()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                target = ("127.0.0.1", spec["udp_port"])
                for number, datagram in enumerate(datagrams):
                    if number % 10 == 0:
                        _keep_up(client, number, read_before)
                    sender.sendto(datagram, target)
            requests = len(datagrams)
        sent = time.perf_counter()
        deadline = time.monotonic() + 300
        last_read, read_at = -1, time.monotonic()
        while time.monotonic() < deadline:
            status = _status(client)
            dropped = status["statsd_events_dropped"] - dropped_before
            handled = status["events_committed"] - before["events_committed"] + dropped
            if protocol != "statsd":
                if handled >= spec["events"]:
                    break
            else:  # every datagram the server read (the kernel drops some) is handled
                read = status["statsd_datagrams"] - read_before
                if read != last_read:
                    last_read, read_at = read, time.monotonic()
                parsed = status["statsd_lines_parsed"] - before["statsd_lines_parsed"]
                settled = read >= requests or time.monotonic() - read_at > 1.0
                if settled and handled >= parsed:
                    break
            time.sleep(0.005)
        done = time.perf_counter()
    committed = status["events_committed"] - before["events_committed"]
    return {
        "requests": requests,
        "committed": committed,
        "dropped": dropped,  # by the server; the rest of what is missing, by the kernel
        "lost": spec["events"] - committed - dropped,
        "send_s": round(sent - began, 4),
        "total_s": round(done - began, 4),
        "events_per_s": round(committed / (done - began)),
    }


if __name__ == "__main__":
    print(json.dumps(drive(json.loads(sys.argv[1]))))
