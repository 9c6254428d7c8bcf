"""StatsD and DogStatsD: lines parsed on their own (pure), then the real ``statsd`` and
``datadog`` clients sending every metric type, rates and tags over UDP to a running
trioagg, the totals read back exactly over /v1/aggregates."""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

import httpx
import pytest
import trio
from datadog.dogstatsd.base import DogStatsd
from statsd import StatsClient

from trioagg.core.errors import ConfigError
from trioagg.core.settings import Settings
from trioagg.ingest.decode import Limits
from trioagg.ingest.statsd import DATAGRAM_EVENTS, MAX_SCALE, Gauges, Parser

from .conftest import StartServer, metric

NOW = 1_790_000_000.0
LIMITS = Limits(max_batch=10_000, max_future=3600.0, max_age=86400.0)


def parse(*lines: str, parser: Parser | None = None) -> tuple[list[Any], list[str]]:
    """Events as (key, value, tags dict, distinct_id), and the reasons of refused lines."""
    parsed = (parser or Parser(LIMITS)).parse("\n".join(lines).encode(), NOW)
    events = [(k, v, json.loads(t), d) for k, ts, v, t, d, _ in parsed.points]
    assert all(ts == NOW for _, ts, *_ in parsed.points) or any("|T" in x for x in lines)
    return events, [reason for reason, _, _ in parsed.refused]


def test_a_sampled_counter_scales_count_and_sum_by_whole_events() -> None:
    events, refused = parse("hits:3|c|@0.25", "hits:1|c", "hits:2|c|@1")
    assert refused == []
    assert [v for _, v, _, _ in events] == [3.0] * 4 + [1.0, 2.0]  # count 6, sum 15


@pytest.mark.parametrize("rate", ["0.3", "0", "1.5", "-1", "abc", "0.0001"])
def test_a_rate_that_no_whole_count_matches_is_refused(rate: str) -> None:
    assert parse(f"hits:1|c|@{rate}") == ([], ["rate"])
    assert MAX_SCALE == 1000  # 0.001 is the smallest rate accepted


def test_gauges_set_and_move_by_deltas_per_series() -> None:
    parser = Parser(LIMITS)
    events, _ = parse(
        "temp:10|g",
        "temp:+5|g",
        "temp:-3|g|#room:a",  # another series: from 0
        "temp:-2.5|g",
        "temp:7|g|@0.5",  # a gauge's rate changes nothing
        parser=parser,
    )
    assert [(v, t) for _, v, t, _ in events] == [
        (10.0, {}),
        (15.0, {}),
        (-3.0, {"room": "a"}),
        (12.5, {}),
        (7.0, {}),
    ]
    assert parse("temp:+1|g", parser=parser)[0][0][1] == 8.0  # the parser keeps them


def test_gauge_values_are_kept_for_a_bounded_number_of_series() -> None:
    gauges = Gauges(limit=2)
    parser = Parser(LIMITS, gauges)
    parse("a:1|g", "b:2|g", "a:+1|g", "c:3|g", parser=parser)  # b is the least recent
    assert len(gauges) == 2
    events, _ = parse("b:+1|g", "c:+1|g", parser=parser)
    assert [v for _, v, _, _ in events] == [1.0, 4.0]  # b forgotten: from 0, as StatsD


def test_timers_histograms_distributions_and_sets() -> None:
    events, refused = parse(
        "db.query:12.5|ms", "size:1:2:3|h", "lat:4|d|@0.5", "users:alice|s", "users:bob|s"
    )
    assert refused == []
    assert [(k, v, d) for k, v, _, d in events] == [
        ("db.query", 12.5, None),
        ("size", 1.0, None),
        ("size", 2.0, None),
        ("size", 3.0, None),
        ("lat", 4.0, None),
        ("lat", 4.0, None),
        ("users", 1.0, "alice"),
        ("users", 1.0, "bob"),
    ]


def test_dogstatsd_tags_and_timestamps() -> None:
    events, refused = parse(
        "req:1|c|#env:prod,canary,path:/a:b|c:abc123",
        f"req:1|c|T{int(NOW) - 60}",
        f"req:1|c|T{int(NOW) + 7200}",  # past max_future
        f"req:1|c|T{int(NOW) - 2 * 86400}",  # past max_age
    )
    assert [t for _, _, t, _ in events] == [{"env": "prod", "canary": "true", "path": "/a:b"}, {}]
    assert refused == ["time", "time"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("no-pipe", "malformed"),
        ("name|c", "malformed"),
        ("x:1|q", "type"),
        ("x:one|c", "value"),
        ("x:1e101|g", "value"),
        ("x:nan|ms", "value"),
        ("x:1_000|c", "value"),
        ("x:|s", "value"),
        (":1|c", "name"),
        ("x\x01:1|c", "name"),
        ("x:1|c|#9bad:1", "tags"),
        ("x:1|c|#a:1,a:2", "tags"),
        ("x:1|c|#" + ",".join(f"t{i}:v" for i in range(17)), "tags"),
        ("x:1|c|#a:" + "v" * 256, "tags"),
        ("x:1|c|zzz", "malformed"),
        ("x:1|c|Tsoon", "time"),
        ("_e{5,4}:title|text", "unsupported"),
        ("_sc|check|0", "unsupported"),
    ],
)
def test_a_bad_line_is_refused_alone_with_its_reason(line: str, reason: str) -> None:
    events, refused = parse("ok:1|c", line, "ok:2|c")
    assert refused == [reason]
    assert [v for _, v, _, _ in events] == [1.0, 2.0]


def test_a_line_of_bytes_that_are_not_utf8_is_refused_alone() -> None:
    parsed = Parser(LIMITS).parse(b"ok:1|c\n\xff\xfe:1|c\nok:1|c|#a:\xff\n", NOW)
    assert len(parsed.points) == 1 and [r for r, _, _ in parsed.refused] == ["name", "tags"]


def test_a_datagram_makes_a_bounded_number_of_events() -> None:
    lines = "\n".join(["x:1|c|@0.001"] * (DATAGRAM_EVENTS // 1000 + 3)).encode()
    parsed = Parser(LIMITS).parse(lines, NOW)
    assert len(parsed.points) == DATAGRAM_EVENTS
    assert [r for r, _, _ in parsed.refused] == ["too_many_events"] * 3


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("none", None),
        ("8125", ("127.0.0.1", 8125)),
        (":8125", ("127.0.0.1", 8125)),
        ("0.0.0.0:9125", ("0.0.0.0", 9125)),
        ("[::1]:8125", ("::1", 8125)),
    ],
)
def test_the_statsd_setting_takes_an_address(text: str, address: Any) -> None:
    assert Settings.from_text({"statsd": text}).statsd == address


@pytest.mark.parametrize("text", ["host:", "1.2.3.4:70000", "[::1]8125", "x:y"])
def test_the_statsd_setting_refuses_what_is_no_address(text: str) -> None:
    with pytest.raises(ConfigError, match="--statsd / TRIOAGG_STATSD"):
        Settings.from_text({"statsd": text})


async def totals(
    server: Any, key: str, stats: str = "count,sum,min,max,last", **params: Any
) -> Any:
    answer = await server.client.get(
        "/v1/aggregates", params={"key": key, "granularity": "all", "stats": stats, **params}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


async def wait_for_lines(server: Any, lines: int, refused: int = 0) -> None:
    """Until the server parsed (or refused) every line sent and committed their events."""
    with trio.fail_after(10):
        while True:
            status = (await server.client.get("/v1/status")).json()
            if (
                status["statsd_lines_parsed"] >= lines
                and status["statsd_lines_refused"] >= refused
                and status["events_committed"] >= status["events_accepted"]
            ):
                return
            await trio.sleep(0.02)


def sampled(seed: int, rates: list[float]) -> list[bool]:
    """Which of the sampled calls a client sends, replaying its random draws."""
    draws = random.Random(seed)
    return [draws.random() <= rate for rate in rates]


def statsd_address(server: Any) -> str:
    receiver = server.app.service.statsd
    assert receiver is not None, "the server listens for StatsD"
    address: str = receiver.address
    return address


def pending(server: Any) -> int:
    receiver = server.app.service.statsd
    assert receiver is not None
    return len(receiver._pending)


async def test_the_statsd_client_sends_every_type_and_totals_read_back_exactly(
    start_server: StartServer,
) -> None:
    server = await start_server(statsd="127.0.0.1:0", quantiles="api.latency")
    host, port = statsd_address(server).rsplit(":", 1)
    client = StatsClient(host, int(port), prefix="api")
    random.seed(1234)
    for _ in range(10):
        client.incr("hits", 2, rate=0.5)  # sampled: 2/0.5 = 4 per line sent
    client.incr("hits", 3)
    client.decr("hits", 1)
    client.gauge("workers", 8)
    client.gauge("workers", 3, delta=True)
    client.gauge("workers", -5)  # the client sends 0|g then -5|g
    client.gauge("workers", -1, delta=True)
    for ms in (10, 20, 30, 40):
        client.timing("latency", ms)
    for user in ("ann", "bob", "ann", "cy"):
        client.set("visitors", user)
    client.close()
    sent = sampled(1234, [0.5] * 10)
    lines = sum(sent) + 2 + 5 + 4 + 4
    await wait_for_lines(server, lines)

    hits = sum(sent) * 2 + 2  # 2 events of 2 per line sent, then 3, then -1
    (result,) = await totals(server, "api.hits", "count,sum")
    assert result["buckets"][0] == {
        "start": result["buckets"][0]["start"],
        "count": hits,
        "sum": sum(sent) * 4 + 2.0,
    }
    (result,) = await totals(server, "api.workers")
    assert result["buckets"][0]["last"] == -6.0
    assert result["buckets"][0]["count"] == 5 and result["buckets"][0]["max"] == 11.0
    (result,) = await totals(server, "api.latency", "count,sum,p50,max")
    assert result["buckets"][0]["count"] == 4 and result["buckets"][0]["sum"] == 100.0
    assert result["buckets"][0]["p50"] in (20.0, 30.0)
    (result,) = await totals(server, "api.visitors", "count,distinct")
    assert result["buckets"][0]["count"] == 4 and result["buckets"][0]["distinct"] == 3
    assert await metric(server, "trioagg_statsd_datagrams_total") >= lines - 1


async def test_the_dogstatsd_client_sends_tags_rates_and_timestamps(
    start_server: StartServer,
) -> None:
    server = await start_server(statsd="127.0.0.1:0")
    host, port = statsd_address(server).rsplit(":", 1)
    client = DogStatsd(
        host=host,
        port=int(port),
        disable_telemetry=True,
        origin_detection_enabled=False,
        constant_tags=["env:test"],
    )
    random.seed(99)
    try:
        for _ in range(8):
            client.increment("orders", 5, tags=["shop:eu"], sample_rate=0.25)
        client.increment("orders", 1, tags=["shop:us", "flagged"])
        client.gauge("queue", 42, tags=["shop:eu"])
        client.gauge("queue", 40, tags=["shop:eu"])
        client.histogram("basket", 3.5, tags=["shop:eu"])
        client.distribution("basket", 6.5, tags=["shop:eu"], sample_rate=1)
        client.timing("checkout", 120, tags=["shop:eu"])
        client.set("buyers", "u1", tags=["shop:eu"])
        client.set("buyers", "u2", tags=["shop:eu"])
        client.increment("orders", tags=["shop:b@d!"])  # the client sends shop:b_d_
        client.increment("orders", tags=["9x:1"])  # refused: no tag name starts with a digit
        client.event("deploy", "v2")  # refused: not a metric
    finally:
        client.close_socket()
    sent = sampled(99, [0.25] * 8)
    lines = sum(sent) + 1 + 2 + 2 + 1 + 2 + 1
    await wait_for_lines(server, lines, refused=2)

    results = await totals(server, "orders", "count,sum", group_by="shop", **{"tag.env": "test"})
    by_shop = {r["tags"]["shop"]: r["buckets"][0] for r in results}
    assert (by_shop["eu"]["count"], by_shop["eu"]["sum"]) == (sum(sent) * 4, sum(sent) * 20.0)
    assert (by_shop["us"]["count"], by_shop["us"]["sum"]) == (1, 1.0)
    assert by_shop["b_d_"]["count"] == 1
    flagged = await totals(server, "orders", "count", **{"tag.flagged": "true"})
    assert flagged[0]["buckets"][0]["count"] == 1
    (queue,) = await totals(server, "queue", "count,last", **{"tag.shop": "eu"})
    assert queue["buckets"][0]["last"] == 40.0
    (basket,) = await totals(server, "basket", "count,sum,min,max")
    assert basket["buckets"][0]["count"] == 2 and basket["buckets"][0]["sum"] == 10.0
    (buyers,) = await totals(server, "buyers", "distinct")
    assert buyers["buckets"][0]["distinct"] == 2
    assert await metric(server, "trioagg_statsd_lines_refused_total", reason="tags") == 1
    assert await metric(server, "trioagg_statsd_lines_refused_total", reason="unsupported") == 1


async def test_a_flood_is_counted_dropped_not_held(start_server: StartServer) -> None:
    """With the writers' queue full, datagrams still arrive and are parsed; their events
    are dropped and counted, and memory holds no more than the bounded pending list."""
    server = await start_server(statsd="127.0.0.1:0", queue_size="1", enqueue_timeout="0s")
    host, port = statsd_address(server).rsplit(":", 1)
    line = b"\n".join([b"flood:1|c|@0.001"] * 20)  # 20,000 events a datagram
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(40):
            sender.sendto(line, (host, int(port)))
            await trio.sleep(0)
    with trio.fail_after(10):
        while (await server.client.get("/v1/status")).json()["statsd_datagrams"] < 10:
            await trio.sleep(0.02)
    await wait_for_lines(server, 0)
    status = (await server.client.get("/v1/status")).json()
    (flood,) = await totals(server, "flood", "count")
    stored = flood["buckets"][0]["count"] if flood["buckets"] else 0
    received = status["statsd_lines_parsed"] * 1000
    assert stored + status["statsd_events_dropped"] + pending(server) == received


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.slow
def test_with_workers_one_of_them_receives_and_keeps_the_gauges(server_process: Any) -> None:
    port = free_udp_port()
    server = server_process("--workers", "2", "--statsd", str(port), "--flush-window", "0")
    server.start()
    server.wait_for("is serving", count=2)
    assert server.output.count(f"receiving StatsD on udp 127.0.0.1:{port}") == 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"g:10|g", ("127.0.0.1", port))
        for _ in range(5):  # from other source ports: one worker keeps the series all the same
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.sendto(b"g:+1|g", ("127.0.0.1", port))
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while True:
            answer = client.get(
                "/v1/aggregates",
                params={"key": "g", "granularity": "all", "stats": "count,max,last"},
            ).json()
            buckets = answer["results"][0]["buckets"]
            if (buckets and buckets[0]["count"] == 6) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert (buckets[0]["count"], buckets[0]["max"], buckets[0]["last"]) == (6, 15.0, 15.0)
    assert server.stop() == 0, server.output
