"""A lean HTTP/1.1 load generator: ``python -m bench.loadgen < spec.json > result.json``.

It runs in its own process so that its CPU is measured apart from the server's.
Everything that costs CPU is done before the clock starts: requests are
rendered to bytes up front, connections are opened up front. While the clock
runs, each of many keep-alive connections (trio tasks on raw sockets) sends
one pre-rendered request, reads only the status line and the headers it
needs (``content-length``, ``connection``), reads the body, records the
latency and goes on with the next request. ``"accepted": N`` is read from the
bodies of 2xx answers to POSTs, so that the acknowledged event count is the
server's own word.

Spec (JSON on stdin)::

    {"host": "127.0.0.1", "port": 8000, "server_pids": [123],
     "db_pid": 456,
     "phases": [{"name": "writes", "max_seconds": 120,
                 "streams": [{"name": "w", "connections": 64,
                              "requests": 30000, "duration": null,
                              "mix": [{"class": "write", "weight": 1,
                                       "request": {"kind": "events", ...}}]}]}]}

A stream stops after ``requests`` requests or ``duration`` seconds, whichever
comes first. Result (JSON on stdout): per phase, per stream and per request
class, the status counts, acknowledged and sent events, latencies, and the CPU
seconds the server processes, the database server (``db_pid`` and its children,
when given) and this process spent during the phase.
With ``"metrics": "/metrics"`` in the spec, the generator scrapes that path
before the first phase and after each one (outside the phase's clock) and adds
``loop_stalls`` to each phase: the server's event-loop stalls during it
(``bench.stalls``). Progress goes to stderr as one JSON object per line.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import trio

from . import stalls

LOCALHOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PERCENTILES = (50, 95, 99)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class SpecError(ValueError):
    """The spec asks for something the generator does not do."""


# --------------------------------------------------------------------------- rendering


def rfc3339(seconds: float) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def key_name(prefix: str, index: int) -> str:
    return f"{prefix}{index:06d}"


def render_event(rng: random.Random, template: dict[str, Any]) -> bytes:
    key = key_name(template.get("key_prefix", "k"), rng.randrange(template["keys"]))
    ts = template["start"] + rng.random() * template["span"]
    value = round(rng.uniform(0.0, 100.0), 3)
    event = b'{"key":"%s","ts":"%s","value":%r' % (key.encode(), rfc3339(ts).encode(), value)
    if template.get("distinct_ids"):  # feeds the distinct-count sketches
        event += b',"distinct_id":"u%d"' % rng.randrange(template["distinct_ids"])
    return event + b"}"


def http_request(
    method: str,
    path: str,
    host: str,
    port: int,
    body: bytes = b"",
    content_type: str = "",
    bearer: str | None = None,
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if bearer:
        head += f"Authorization: Bearer {bearer}\r\n"
    if method == "POST":
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def render_request(
    rng: random.Random, template: dict[str, Any], host: str, port: int
) -> tuple[bytes, int]:
    """One request as bytes, with the number of events it carries."""
    kind = template["kind"]
    if kind == "events":
        count = int(template.get("events", 1))
        fmt = template.get("format", "json")
        events = [render_event(rng, template) for _ in range(count)]
        if fmt == "ndjson":
            body = b"\n".join(events) + b"\n"
            content_type = "application/x-ndjson"
        elif fmt == "json":
            body = (
                events[0]
                if count == 1 and not template.get("array")
                else b"[%s]" % b",".join(events)
            )
            content_type = "application/json"
        else:
            raise SpecError(f"unknown event format {fmt!r}")
        path = "/v1/events" if template.get("wait", True) else "/v1/events?wait=false"
        request = http_request("POST", path, host, port, body, content_type, template.get("bearer"))
        return request, count
    if kind == "aggregates":
        key = key_name(template.get("key_prefix", "k"), rng.randrange(template["keys"]))
        params = {"key": key, "from": int(template["from"]), "to": int(template["to"])}
        params["granularity"] = template.get("granularity", "hour")
        if "stats" in template:
            params["stats"] = template["stats"]
        return http_request("GET", "/v1/aggregates?" + urlencode(params), host, port), 0
    if kind == "get":
        return http_request("GET", template["path"], host, port), 0
    raise SpecError(f"unknown request kind {kind!r}")


@dataclass
class Pool:
    """Pre-rendered requests of one stream, used round-robin."""

    requests: list[bytes]
    classes: list[int]
    events: list[int]
    class_names: list[str]


def render_pool(stream: dict[str, Any], host: str, port: int, seed: int) -> Pool:
    mix = stream["mix"]
    if not mix:
        raise SpecError(f"stream {stream.get('name')!r} has no requests")
    names = [entry.get("class", entry["request"]["kind"]) for entry in mix]
    weights = [float(entry.get("weight", 1)) for entry in mix]
    size = int(stream.get("pool", 1000))
    rng = random.Random(seed)
    pool = Pool([], [], [], names)
    for _ in range(size):
        index = rng.choices(range(len(mix)), weights)[0] if len(mix) > 1 else 0
        data, events = render_request(rng, mix[index]["request"], host, port)
        pool.requests.append(data)
        pool.classes.append(index)
        pool.events.append(events)
    return pool


# --------------------------------------------------------------------------- responses


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as this generator understands it."""


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, content length and whether the server closes, from a response head
    (everything before the blank line). Only what the generator needs is read."""
    if not head.startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    status = int(head[9:12])
    lower = head.lower()
    position = lower.find(b"\r\ncontent-length:")
    if position < 0:
        if b"\r\ntransfer-encoding:" in lower:
            raise ProtocolError("chunked responses are not supported by this generator")
        length = 0
    else:
        start = position + 17
        end = lower.find(b"\r\n", start)
        length = int(lower[start : end if end >= 0 else len(lower)])
    close = b"\r\nconnection: close" in lower or head.startswith(b"HTTP/1.0")
    return status, length, close


def accepted_count(body: bytes, name: bytes = b"accepted") -> int | None:
    """N of ``"accepted": N`` (or another integer member) in a JSON body, without
    decoding the rest."""
    position = body.find(b'"%s"' % name)
    if position < 0:
        return None
    position = body.find(b":", position) + 1
    while body[position : position + 1] == b" ":
        position += 1
    end = position
    while body[end : end + 1].isdigit():
        end += 1
    return int(body[position:end]) if end > position else None


# --------------------------------------------------------------------------- measuring


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99, max and mean of latencies in seconds, as milliseconds
    (nearest-rank on the sorted values)."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        out[f"p{p}"] = round(ordered[rank - 1] * 1000, 3)
    out["max"] = round(ordered[-1] * 1000, 3)
    out["mean"] = round(sum(ordered) / len(ordered) * 1000, 3)
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def process_tree_cpu(root: int | None) -> dict[int, float]:
    """CPU seconds of ``root`` and its children, by pid (a database server: the
    postmaster and its backends, which come and go with connections)."""
    if root is None:
        return {}
    found = {root: process_cpu(root)}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            found[int(entry)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return found


def cpu_since(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU the processes of ``after`` used since ``before`` (a new process: all of it)."""
    return sum(max(0.0, used - before.get(pid, 0.0)) for pid, used in after.items())


def system_busy_cpu() -> float:
    """CPU seconds all CPUs spent not idle, since boot."""
    with open("/proc/stat", "rb") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / _CLK_TCK


@dataclass
class ClassStats:
    statuses: dict[int, int] = field(default_factory=dict)
    ok_latencies: list[float] = field(default_factory=list)
    other_latencies: list[float] = field(default_factory=list)
    sent_events: int = 0
    acked_events: int = 0
    duplicate_events: int = 0
    unknown_events: int = 0
    errors: int = 0
    mismatches: int = 0

    def summary(self, elapsed: float) -> dict[str, Any]:
        ok = len(self.ok_latencies)
        total = ok + len(self.other_latencies)
        return {
            "requests": total,
            "ok": ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "sent_events": self.sent_events,
            "acked_events": self.acked_events,
            "duplicate_events": self.duplicate_events,
            "unknown_events": self.unknown_events,
            "accepted_mismatches": self.mismatches,
            "req_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
            "ok_per_s": round(ok / elapsed, 1) if elapsed > 0 else None,
            "acked_events_per_s": round(self.acked_events / elapsed, 1) if elapsed > 0 else None,
            "latency_ms": percentiles(self.ok_latencies + self.other_latencies),
            "ok_latency_ms": percentiles(self.ok_latencies),
        }


# --------------------------------------------------------------------------- running


@dataclass
class Stream:
    name: str
    pool: Pool
    connections: int
    requests: int | None
    duration: float | None
    stats: list[ClassStats]
    issued: int = 0
    done: int = 0
    deadline: float = math.inf
    started: float = 0.0
    finished: float = 0.0
    reconnects: int = 0

    def take(self) -> int | None:
        if self.requests is not None and self.issued >= self.requests:
            return None
        if time.perf_counter() >= self.deadline:
            return None
        index = self.issued
        self.issued += 1
        return index


async def _connect(host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await sock.connect((host, port))
    return sock


async def _connection(
    stream: Stream,
    host: str,
    port: int,
    sock: trio.socket.SocketType | None,
    go: trio.Event,
) -> None:
    pool = stream.pool
    requests, classes, events = pool.requests, pool.classes, pool.events
    size = len(requests)
    stats = stream.stats
    perf = time.perf_counter
    await go.wait()
    buffer = b""
    while True:
        index = stream.take()
        if index is None:
            break
        slot = index % size
        data = requests[slot]
        cls = stats[classes[slot]]
        count = events[slot]
        cls.sent_events += count
        started = perf()
        try:
            if sock is None:
                sock = await _connect(host, port)
                stream.reconnects += 1
            sent = await sock.send(data)
            while sent < len(data):
                sent += await sock.send(memoryview(data)[sent:])
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                chunk = await sock.recv(65536)
                if not chunk:
                    raise ProtocolError("the server closed the connection")
                buffer += chunk
                end = buffer.find(b"\r\n\r\n")
            status, length, close = parse_head(buffer[:end])
            need = end + 4 + length
            while len(buffer) < need:
                chunk = await sock.recv(max(65536, need - len(buffer)))
                if not chunk:
                    raise ProtocolError("the server closed the connection mid-body")
                buffer += chunk
            elapsed = perf() - started
            body = buffer[end + 4 : need]
            buffer = buffer[need:]
        except (OSError, ProtocolError, ValueError):
            cls.errors += 1
            cls.unknown_events += count
            cls.other_latencies.append(perf() - started)
            buffer = b""
            if sock is not None:
                sock.close()
            sock = None
            await trio.sleep(0.01)  # a refused or reset connection must not spin
            continue
        cls.statuses[status] = cls.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            cls.ok_latencies.append(elapsed)
            if count:
                accepted = accepted_count(body)
                if accepted is None:
                    accepted = count
                elif accepted != count:
                    cls.mismatches += 1
                cls.acked_events += accepted
                duplicates = accepted_count(body, b"duplicates")
                if duplicates:
                    cls.duplicate_events += duplicates
        else:
            cls.other_latencies.append(elapsed)
        stream.done += 1
        if close and sock is not None:
            sock.close()
            sock = None
            buffer = b""
    if sock is not None:
        sock.close()
    stream.finished = max(stream.finished, perf())


async def _watch(
    phase: str,
    streams: list[Stream],
    started: float,
    stall: float,
    scope: trio.CancelScope,
    state: dict[str, Any],
) -> None:
    """Report progress twice a second; cancel the phase when no request has completed
    for ``stall`` seconds (a server that stopped answering must not hang the run)."""
    last_done, last_change = -1, time.perf_counter()
    stalled = False
    while True:
        await trio.sleep(0.5)
        done = sum(s.done + sum(c.errors for c in s.stats) for s in streams)
        now = time.perf_counter()
        if done != last_done:
            last_done, last_change = done, now
        elif now - last_change > stall and not stalled:
            stalled = True
            state["stalled_s"] = round(now - last_change, 1)
            print(
                json.dumps({"phase": phase, "stalled": round(now - last_change, 1)}),
                file=sys.stderr,
                flush=True,
            )
            scope.cancel()
        line = {
            "phase": phase,
            "done": sum(s.done for s in streams),
            "total": sum(s.requests or 0 for s in streams) or None,
            "elapsed": round(time.perf_counter() - started, 1),
            "errors": sum(c.errors for s in streams for c in s.stats),
        }
        print(json.dumps(line), file=sys.stderr, flush=True)


async def run_phase(
    phase: dict[str, Any],
    host: str,
    port: int,
    server_pids: Sequence[int],
    seed: int,
    db_pid: int | None = None,
) -> dict[str, Any]:
    streams = []
    for number, spec in enumerate(phase["streams"]):
        pool = render_pool(spec, host, port, seed + number)
        requests = spec.get("requests")
        duration = spec.get("duration")
        if requests is None and duration is None:
            raise SpecError(f"stream {spec['name']!r} needs requests or duration")
        streams.append(
            Stream(
                spec["name"],
                pool,
                int(spec.get("connections", 1)),
                None if requests is None else int(requests),
                None if duration is None else float(duration),
                [ClassStats() for _ in pool.class_names],
            )
        )
    sockets = [[await _connect(host, port) for _ in range(s.connections)] for s in streams]
    go = trio.Event()
    max_seconds = float(phase.get("max_seconds", 600))
    timed_out = False
    stall = float(phase.get("stall_seconds", 20))
    scope = trio.CancelScope(deadline=trio.current_time() + max_seconds)
    async with trio.open_nursery() as outer:
        watch: dict[str, Any] = {}
        outer.start_soon(_watch, phase["name"], streams, time.perf_counter(), stall, scope, watch)
        with scope:
            async with trio.open_nursery() as nursery:
                for stream, socks in zip(streams, sockets, strict=True):
                    for sock in socks:
                        nursery.start_soon(_connection, stream, host, port, sock, go)
                cpu_server = sum(process_cpu(pid) for pid in server_pids)
                cpu_client = time.process_time()
                cpu_db = process_tree_cpu(db_pid)
                cpu_busy = system_busy_cpu()
                started = time.perf_counter()
                for stream in streams:
                    stream.started = started
                    if stream.duration is not None:
                        stream.deadline = started + stream.duration
                go.set()
        timed_out = scope.cancelled_caught
        ended = time.perf_counter()
        cpu_server = sum(process_cpu(pid) for pid in server_pids) - cpu_server
        cpu_client = time.process_time() - cpu_client
        db_s = cpu_since(cpu_db, process_tree_cpu(db_pid))
        cpu_busy = system_busy_cpu() - cpu_busy
        outer.cancel_scope.cancel()
    elapsed = ended - started
    total_requests = sum(s.done for s in streams)
    result: dict[str, Any] = {
        "name": phase["name"],
        "elapsed_s": round(elapsed, 4),
        "timed_out": timed_out,
        "stalled_s": watch.get("stalled_s"),
        "requests": total_requests,
        "cpu": {
            "server_s": round(cpu_server, 3),
            "client_s": round(cpu_client, 3),
            "other_s": round(max(0.0, cpu_busy - cpu_server - cpu_client - db_s), 3),
            "db_s": round(db_s, 3) if db_pid is not None else None,
            "server_util": round(cpu_server / elapsed, 3) if elapsed else None,
            "client_util": round(cpu_client / elapsed, 3) if elapsed else None,
        },
        "streams": {},
    }
    for stream in streams:
        stream_elapsed = (stream.finished or ended) - stream.started
        classes = {
            name: stats.summary(stream_elapsed)
            for name, stats in zip(stream.pool.class_names, stream.stats, strict=True)
        }
        result["streams"][stream.name] = {
            "connections": stream.connections,
            "elapsed_s": round(stream_elapsed, 4),
            "reconnects": stream.reconnects,
            "classes": classes,
        }
    return result


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    host = spec.get("host", "127.0.0.1")
    if host not in LOCALHOSTS:
        raise SpecError(f"this generator targets the local machine only, not {host!r}")
    port = int(spec["port"])
    pids = [int(pid) for pid in spec.get("server_pids", [])]
    seed = int(spec.get("seed", 1))
    db_pid = spec.get("db_pid")
    metrics = spec.get("metrics")
    before = await scrape(host, port, metrics) if metrics else None
    phases = []
    for number, phase in enumerate(spec["phases"]):
        result = await run_phase(phase, host, port, pids, seed + 100 * number, db_pid)
        if metrics:
            after = await scrape(host, port, metrics)
            result["loop_stalls"] = None
            if before is not None and after is not None:
                result["loop_stalls"] = stalls.window(after, before)
            before = after
        phases.append(result)
    return {"phases": phases}


async def scrape(host: str, port: int, path: str, timeout: float = 5.0) -> stalls.Scrape | None:
    """The stall figures of one GET ``path`` on a connection of its own (None if the
    server does not answer 200 in time)."""
    with trio.move_on_after(timeout):
        try:
            async with trio.SocketStream(await _connect(host, port)) as stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                data = bytearray()
                while b"\r\n\r\n" not in data and (chunk := await stream.receive_some(65536)):
                    data += chunk
                head, _, body = bytes(data).partition(b"\r\n\r\n")
                status, length, _ = parse_head(head)
                while len(body) < length and (chunk := await stream.receive_some(65536)):
                    body += chunk
            if status == 200 and len(body) == length:
                return stalls.parse(body.decode())
        except (OSError, trio.BrokenResourceError, ProtocolError, ValueError):
            pass
    return None


def main() -> None:
    spec = json.load(sys.stdin)
    try:
        result = trio.run(run, spec)
    except SpecError as error:
        print(json.dumps({"error": str(error)}))
        sys.exit(2)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
