"""The stress harness's own logic: arguments, commands, response parsing, verification.

No timing thresholds and no real servers here; the benchmark itself is ``just bench``.
"""

from __future__ import annotations

import random
import sqlite3
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from bench import cli, loadgen, scenarios, verify
from bench.report import table
from bench.runner import cpu_per_1k
from bench.scenarios import Row, ScenarioResult, evaluate_targets
from bench.server import Deployment, command, flag_value, flags_to_env, split_args

# ---------------------------------------------------------------------- arguments


def test_defaults_run_every_scenario_with_trioagg_serve() -> None:
    options, args = cli.parse_args([])
    assert options.scenarios == scenarios.SCENARIOS
    assert options.deployment.deploy == "serve"
    assert options.deployment.server_args == ()
    assert not options.quick
    assert options.baselines
    assert args.scale == 1.0


def test_scenarios_are_comma_separated_repeatable_and_in_run_order() -> None:
    options, _ = cli.parse_args(["--scenario", "scaling,seed", "--scenario", "batch", "--quick"])
    assert options.scenarios == ("seed", "batch", "scaling")
    assert options.quick
    assert cli.parse_scenarios(["all"]) == scenarios.SCENARIOS


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.parse_args(["--scenario", "seeds"])
    assert raised.value.code == 2
    assert "unknown scenario 'seeds'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--server-arg", "--sync=normal", "--server-arg", "--batch-size 500"],
        ["--server-arg=--sync=normal", "--server-arg=--batch-size 500"],
        ["--server-arg", "--sync normal", "--server-arg", "--batch-size=500"],
    ],
)
def test_server_args_pass_through_in_any_spelling(argv: list[str]) -> None:
    options, _ = cli.parse_args(argv)
    env = flags_to_env(options.deployment.server_args)
    assert env == {"TRIOAGG_SYNC": "normal", "TRIOAGG_BATCH_SIZE": "500"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "2"], "--workers needs --deploy hypercorn"),
        (["--keep-alive", "30"], "--keep-alive needs --deploy hypercorn"),
        (["--hypercorn-arg", "--backlog 10"], "--hypercorn-arg needs --deploy hypercorn"),
        (["--server-arg", "sync"], "expected a --flag"),
        (["--server-arg", "--sync"], "--sync needs a value"),
        (["--scale", "0"], "--scale must be"),
        (["--connections", "0"], "--connections must be"),
    ],
)
def test_bad_combinations_fail_before_running(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_hypercorn_deployment_takes_workers_and_keep_alive() -> None:
    options, _ = cli.parse_args(
        ["--deploy", "hypercorn", "--workers", "2", "--keep-alive", "30", "--hypercorn-arg", "-b x"]
    )
    deployment = options.deployment
    assert (deployment.workers, deployment.keep_alive) == (2, 30.0)
    assert deployment.hypercorn_args == ("-b", "x")
    assert "--workers 2" in deployment.describe()


def test_trioagg_src_must_hold_the_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--trioagg-src", str(tmp_path)])
    assert "holds no trioagg package" in capsys.readouterr().err
    (tmp_path / "trioagg").mkdir()
    options, _ = cli.parse_args(["--trioagg-src", str(tmp_path)])
    assert options.deployment.trioagg_src == str(tmp_path.resolve())


def test_unknown_trioagg_ref(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--trioagg-ref", "no-such-ref-anywhere"])
    assert "is not a commit" in capsys.readouterr().err


def test_flags_to_env_and_flag_value() -> None:
    args = split_args(["--queue-size 4", "--enqueue-timeout=100ms", "--sync full", "--sync=normal"])
    assert flags_to_env(args) == {
        "TRIOAGG_QUEUE_SIZE": "4",
        "TRIOAGG_ENQUEUE_TIMEOUT": "100ms",
        "TRIOAGG_SYNC": "normal",
    }
    assert flag_value(args, "--sync") == "normal"
    assert flag_value(args, "--bucket") is None


# ---------------------------------------------------------------------- server commands


def test_serve_command_puts_user_flags_after_the_scenarios() -> None:
    deployment = Deployment(server_args=("--queue-size", "64"))
    argv, env = command("trioagg", deployment, Path("/tmp/x.db"), ["--queue-size", "4"])
    assert argv[1:5] == ["-m", "trioagg", "serve", "--db"]
    assert argv[argv.index("--port") + 1] == "0"
    assert argv[-4:] == ["--queue-size", "4", "--queue-size", "64"]
    assert env == {}


def test_hypercorn_command_uses_the_trio_worker_and_env_settings() -> None:
    deployment = Deployment(
        deploy="hypercorn", workers=2, keep_alive=30, server_args=("--sync", "normal")
    )
    argv, env = command("trioagg", deployment, Path("/tmp/x.db"), ["--queue-size", "4"])
    assert argv[argv.index("--worker-class") + 1] == "trio"
    assert argv[argv.index("--workers") + 1] == "2"
    assert argv[argv.index("--keep-alive") + 1] == "30"
    assert argv[-1] == "trioagg.app:create_app()"
    assert env == {
        "TRIOAGG_DB": "/tmp/x.db",
        "TRIOAGG_QUEUE_SIZE": "4",
        "TRIOAGG_SYNC": "normal",
    }


def test_baselines_follow_the_deployment_and_the_sync_setting() -> None:
    normal = Deployment(server_args=("--sync=normal",))
    argv, _ = command("naive", normal, Path("/tmp/n.db"))
    assert argv[1:4] == ["-m", "bench.baselines", "naive"]
    assert argv[argv.index("--sync") + 1] == "normal"
    argv, env = command("ceiling", Deployment(deploy="hypercorn"), Path("/tmp/c.db"))
    assert argv[-1] == "bench.baselines:ceiling_app()"
    assert env["BENCH_SYNC"] == "full"
    with pytest.raises(ValueError):
        command("postgres", normal, None)


# ---------------------------------------------------------------------- load generator


def test_parse_head_reads_status_length_and_close() -> None:
    head = b"HTTP/1.1 503 \r\ncontent-type: application/json\r\ncontent-length: 17\r\nx: 1"
    assert loadgen.parse_head(head) == (503, 17, False)
    head = b"HTTP/1.1 200 \r\nContent-Length: 2\r\nConnection: close"
    assert loadgen.parse_head(head) == (200, 2, True)
    assert loadgen.parse_head(b"HTTP/1.0 204 No Content") == (204, 0, True)
    with pytest.raises(loadgen.ProtocolError):
        loadgen.parse_head(b"SSH-2.0-OpenSSH")
    with pytest.raises(loadgen.ProtocolError):
        loadgen.parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked")


def test_accepted_count() -> None:
    assert loadgen.accepted_count(b'{"accepted":1000,"duplicates":3}') == 1000
    assert loadgen.accepted_count(b'{"accepted": 7}') == 7
    assert loadgen.accepted_count(b'{"accepted":1,"duplicates":3}', b"duplicates") == 3
    assert loadgen.accepted_count(b'{"error":{}}') is None


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    random.Random(1).shuffle(values)
    result = loadgen.percentiles(values)
    assert (result["p50"], result["p95"], result["p99"], result["max"]) == (50, 95, 99, 100)
    assert result["mean"] == pytest.approx(50.5)
    assert loadgen.percentiles([])["p99"] is None


def _body(request: bytes) -> bytes:
    return request.split(b"\r\n\r\n", 1)[1]


def test_rendered_events_are_valid_and_inside_the_day() -> None:
    start = int(time.time()) // 3600 * 3600 - 86400
    template = {"kind": "events", "keys": 10, "start": start, "span": 86400}
    rng = random.Random(3)
    single, count = loadgen.render_request(rng, template, "127.0.0.1", 8000)
    assert count == 1
    assert single.startswith(b"POST /v1/events HTTP/1.1\r\n")
    event = msgspec.json.decode(_body(single))
    assert set(event) == {"key", "ts", "value"}
    assert event["ts"].endswith("Z")
    stamp = msgspec.json.decode(b'"%s"' % event["ts"].encode(), type=Any)
    assert stamp

    array, count = loadgen.render_request(
        rng, {**template, "events": 50, "array": True, "wait": False}, "127.0.0.1", 8000
    )
    assert count == 50
    assert array.startswith(b"POST /v1/events?wait=false HTTP/1.1\r\n")
    assert f"Content-Length: {len(_body(array))}".encode() in array
    events = msgspec.json.decode(_body(array))
    assert len(events) == 50
    assert {e["key"] for e in events} <= {loadgen.key_name("k", i) for i in range(10)}

    ndjson, count = loadgen.render_request(
        rng, {**template, "events": 5, "format": "ndjson"}, "127.0.0.1", 8000
    )
    assert b"Content-Type: application/x-ndjson" in ndjson
    lines = _body(ndjson).splitlines()
    assert count == len(lines) == 5


def test_rendered_reads_ask_for_one_key_and_one_day() -> None:
    request, count = loadgen.render_request(
        random.Random(1),
        {"kind": "aggregates", "keys": 5, "from": 3600, "to": 3600 + 86400},
        "127.0.0.1",
        1,
    )
    assert count == 0
    line = request.split(b"\r\n", 1)[0].decode()
    assert line.startswith("GET /v1/aggregates?key=k00000")
    assert "from=3600&to=90000&granularity=hour" in line


def test_pools_are_deterministic_and_follow_the_mix() -> None:
    stream = {
        "name": "rw",
        "pool": 2000,
        "mix": [
            {"class": "read", "weight": 4, "request": {"kind": "get", "path": "/x"}},
            {"class": "write", "weight": 1, "request": {"kind": "get", "path": "/y"}},
        ],
    }
    one = loadgen.render_pool(stream, "127.0.0.1", 1, seed=5)
    two = loadgen.render_pool(stream, "127.0.0.1", 1, seed=5)
    assert one.requests == two.requests
    assert one.class_names == ["read", "write"]
    reads = one.classes.count(0) / len(one.classes)
    assert 0.75 < reads < 0.85


def test_only_local_targets() -> None:
    with pytest.raises(loadgen.SpecError):
        trio.run(loadgen.run, {"host": "10.0.0.1", "port": 1, "phases": []})


async def test_loadgen_counts_acknowledged_events_and_reconnects() -> None:
    """Against a tiny server: 2xx answers count their events, others do not, and a
    ``connection: close`` answer makes the generator reconnect."""
    answers = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal answers
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            body, buffer = buffer[:length], buffer[length:]
            answers += 1
            if answers % 4 == 0:
                reply, status = b'{"error":{}}', b"503"
            else:
                count = len(msgspec.json.decode(body))
                reply, status = b'{"accepted":%d,"duplicates":0}' % count, b"200"
            close = answers % 5 == 0
            await stream.send_all(
                b"HTTP/1.1 %s \r\ncontent-length: %d\r\n%s\r\n%s"
                % (status, len(reply), b"connection: close\r\n" if close else b"", reply)
            )
            if close:
                await stream.aclose()
                return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        template = {"kind": "events", "events": 3, "array": True, "keys": 4, "start": 0}
        spec = {
            "port": port,
            "phases": [
                {
                    "name": "p",
                    "streams": [
                        {
                            "name": "s",
                            "connections": 2,
                            "requests": 40,
                            "pool": 10,
                            "mix": [{"class": "write", "request": {**template, "span": 60}}],
                        }
                    ],
                }
            ],
        }
        result = await loadgen.run(spec)
        nursery.cancel_scope.cancel()
    phase = result["phases"][0]
    stream = phase["streams"]["s"]
    stats = stream["classes"]["write"]
    assert phase["requests"] == stats["requests"] == 40
    assert stats["statuses"] == {"200": 30, "503": 10}
    assert stats["sent_events"] == 120
    assert stats["acked_events"] == 90
    assert stats["errors"] == 0
    assert stream["reconnects"] == 7  # every close but the last one is followed by a request
    assert verify.acknowledged(result)["acked_events"] == 90
    assert verify.unexpected_statuses(result) == {"503": 10}
    assert verify.unexpected_statuses(result, frozenset({503})) == {}


# ---------------------------------------------------------------------- verification


def test_verdict_passes_only_when_stored_equals_acknowledged() -> None:
    assert verify.verdict(acked=100, stored=100, exit_code=0)["ok"]
    assert verify.verdict(acked=100, stored=None, exit_code=0)["ok"]  # the ceiling stores nothing
    lost = verify.verdict(acked=100, stored=97, exit_code=0)
    assert not lost["ok"]
    assert "3 acknowledged events lost" in lost["problems"][0]
    extra = verify.verdict(acked=100, stored=101, exit_code=0)
    assert "1 unacknowledged stored" in extra["problems"][0]
    assert verify.verdict(acked=100, stored=95, duplicates=5, exit_code=0)["ok"]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"exit_code": 1}, "exit code 1"),
        ({"exit_code": None}, "exit code None"),
        ({"exit_code": 0, "errors": 2}, "2 requests failed"),
        ({"exit_code": 0, "unexpected": {"500": 3}}, "3 x 500"),
        ({"exit_code": 0, "timed_out": True}, "time limit"),
    ],
)
def test_verdict_fails_on_unclean_runs(kwargs: dict[str, Any], problem: str) -> None:
    result = verify.verdict(acked=5, stored=5, **kwargs)
    assert not result["ok"]
    assert problem in " ".join(result["problems"])


def test_store_totals_counts_events_and_rows(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE rollups (key TEXT, bucket INTEGER, tags TEXT, count INTEGER)")
    conn.executemany(
        "INSERT INTO rollups VALUES (?, ?, '{}', ?)", [("a", 0, 3), ("a", 3600, 4), ("b", 0, 1)]
    )
    conn.commit()
    conn.close()
    assert verify.store_totals(db) == (8, 3)


def test_cpu_per_1k_requests() -> None:
    phase = {"requests": 2000, "cpu": {"server_s": 1.0, "client_s": 0.1}}
    assert cpu_per_1k(phase) == (0.5, 0.05)
    assert cpu_per_1k({"requests": 0, "cpu": {}}) == (None, None)


# ---------------------------------------------------------------------- targets and table


def _row(scenario: str, key: str, system: str, rate: float, unit: str = "req/s") -> Row:
    return Row(
        scenario=scenario,
        key=key,
        what=key,
        system=system,
        unit=unit,
        rate=rate,
        elapsed_s=1.0,
        requests=100,
        events=100,
        latency_ms={"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.5},
        server_cpu_1k=0.5,
        client_cpu_1k=0.05,
        client_share=0.1,
    )


def test_targets_pass_miss_and_skip() -> None:
    seed = ScenarioResult(
        "seed",
        rows=[
            _row("seed", "writes", "trioagg", 950),
            _row("seed", "writes", "ceiling", 1000),
            _row("seed", "writes", "naive", 200),
            _row("seed", "reads", "trioagg", 700),
            _row("seed", "reads", "ceiling", 1000),
        ],
    )
    batch = ScenarioResult("batch", rows=[_row("batch", "json", "trioagg", 250_000, "events/s")])
    targets = {t.name: t for t in evaluate_targets({"seed": seed, "batch": batch})}
    assert targets["single durable (seed writes) >= 0.9 x ceiling"].status == "PASS"
    assert targets["single durable (seed writes) >= 5 x naive"].status == "MISS"
    assert targets["reads >= 0.8 x ceiling GET"].status == "MISS"
    assert targets["batch durable >= 200,000 events/s"].status == "PASS"
    assert targets["single wait=false >= 0.9 x ceiling"].status == "SKIP"
    assert targets["overload: 0 lost, peak RSS < 300 MB"].status == "SKIP"


def test_table_shows_ratios_targets_and_verification() -> None:
    seed = ScenarioResult(
        "seed",
        rows=[_row("seed", "writes", "trioagg", 900), _row("seed", "writes", "ceiling", 1000)],
    )
    text = table(
        "header",
        {"seed": seed, "batch": ScenarioResult("batch", error="it broke")},
        evaluate_targets({"seed": seed}),
        {"ok": False, "checked": 2, "failures": ["x: lost"]},
        ["CLIENT IS THE LIMIT"],
    )
    assert "0.90" in text
    assert "batch     FAILED: it broke" in text
    assert "PASS  single durable (seed writes) >= 0.9 x ceiling" in text
    assert "VERIFY  FAIL" in text
    assert "WARNING: CLIENT IS THE LIMIT" in text


def test_scaled_sizes() -> None:
    small = scenarios.scaled(scenarios.FULL, 0.1)
    assert small.seed_writes == 3000
    assert small.batch_s == pytest.approx(0.8)
    assert small.scaling_keys == scenarios.FULL.scaling_keys
    assert scenarios.scaled(scenarios.FULL, 1) is scenarios.FULL
