"""The stress harness's own logic: arguments, commands, response parsing, verification.

No timing thresholds and no real servers here; the benchmark itself is ``just bench``.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from bench import cli, loadgen, pgstore, report, scenarios, stalls, verify
from bench.report import table
from bench.runner import cpu_per_1k
from bench.scenarios import ScenarioResult, evaluate_targets
from bench.server import Deployment, command, flag_value, flags_to_env, split_args

from . import clock
from .bench_rows import bench_row

# ---------------------------------------------------------------------- arguments


def test_defaults_run_every_scenario_on_the_recommended_deployment() -> None:
    options, args = cli.parse_args([])
    assert options.scenarios == scenarios.SCENARIOS
    # docs/deploying.md: trioagg serve --workers 2 on a 2-core machine
    assert (options.deployment.deploy, options.deployment.workers) == ("serve", 2)
    assert options.deployment == Deployment()
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
        (["--hypercorn-arg", "--backlog 10"], "--hypercorn-arg needs --deploy hypercorn"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--server-arg", "--workers=3"], "give the worker count with --workers"),
        (["--keep-alive", "-1"], "--keep-alive must not be negative"),
        (["--server-arg", "sync"], "expected a --flag"),
        (["--server-arg", "--sync"], "--sync needs a value"),
        (["--scale", "0"], "--scale must be"),
        (["--connections", "0"], "--connections must be"),
        (["--tiers-series", "0"], "--tiers-series must be"),
    ],
)
def test_bad_combinations_fail_before_running(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_both_deployments_take_workers_and_keep_alive() -> None:
    options, _ = cli.parse_args(["--workers", "1", "--keep-alive", "30"])
    deployment = options.deployment
    assert (deployment.deploy, deployment.workers, deployment.keep_alive) == ("serve", 1, 30.0)
    assert deployment.describe() == "serve --workers 1 --keep-alive 30"
    options, _ = cli.parse_args(["--deploy", "hypercorn"])
    assert (options.deployment.deploy, options.deployment.workers) == ("hypercorn", 2)
    # the run's header says where the Quart baselines run when it is not the same way
    assert Deployment().describe() == "serve --workers 2 (Quart baselines: hypercorn CLI)"


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
    assert argv[argv.index("--workers") + 1] == "2"
    assert argv[-4:] == ["--queue-size", "4", "--queue-size", "64"]
    assert env == {}


def test_serve_command_takes_the_workers_and_the_keep_alive_as_trioagg_flags() -> None:
    deployment = Deployment(workers=3, keep_alive=30, server_args=("--sync", "normal"))
    argv, env = command("trioagg", deployment, Path("/tmp/x.db"))
    assert argv[1:4] == ["-m", "trioagg", "serve"]
    assert argv[argv.index("--workers") + 1] == "3"
    assert argv[argv.index("--keep-alive-timeout") + 1] == "30"
    assert "--keep-alive" not in argv
    assert argv[-2:] == ["--sync", "normal"]  # the user's flags last: they win
    assert env == {}
    # one process is trioagg serve's default, and runs commits older than --workers too
    argv, _ = command("trioagg", Deployment(workers=1), Path("/tmp/x.db"))
    assert "--workers" not in argv


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


@pytest.mark.parametrize("deploy", ["serve", "hypercorn"])
def test_baselines_with_several_workers_run_on_the_hypercorn_cli(deploy: str) -> None:
    """They have no supervisor like trioagg serve: several workers is hypercorn's CLI."""
    deployment = Deployment(deploy=deploy, workers=2, keep_alive=30)
    for app in ("ceiling", "naive"):
        argv, env = command(app, deployment, Path("/tmp/n.db"))
        assert argv[1:3] == ["-m", "hypercorn"]
        assert argv[argv.index("--worker-class") + 1] == "trio"
        assert argv[argv.index("--workers") + 1] == "2"
        assert argv[argv.index("--keep-alive") + 1] == "30"
        assert argv[-1] == f"bench.baselines:{app}_app()"
        assert env == {"BENCH_DB": "/tmp/n.db", "BENCH_SYNC": "full"}


def test_baselines_in_one_process_follow_serve_and_the_sync_setting() -> None:
    normal = Deployment(workers=1, keep_alive=30, server_args=("--sync=normal",))
    argv, env = command("naive", normal, Path("/tmp/n.db"))
    assert argv[1:4] == ["-m", "bench.baselines", "naive"]
    assert argv[argv.index("--sync") + 1] == "normal"
    assert argv[argv.index("--keep-alive") + 1] == "30"
    assert env == {}
    argv, env = command("ceiling", Deployment(deploy="hypercorn", workers=1), Path("/tmp/c.db"))
    assert argv[-1] == "bench.baselines:ceiling_app()"
    assert argv[argv.index("--workers") + 1] == "1"
    assert env["BENCH_SYNC"] == "full"
    with pytest.raises(ValueError):
        command("postgres", normal, None)


def test_the_go_design_is_one_worker_whatever_the_deployment() -> None:
    deployment = Deployment(workers=3)
    assert [deployment.workers_of(app) for app in ("trioagg", "ceiling", "go")] == [3, 3, 1]


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
    start = clock.whole_hours_ago(24)
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


def test_remove_store_deletes_every_file_of_a_sharded_store_and_nothing_else(
    tmp_path: Path,
) -> None:
    from trioagg.store.sqlite import SQLiteBackend

    db = tmp_path / "s.db"
    backend = SQLiteBackend(str(db), shards=3)
    conn = backend.connect(write=True)
    backend.prepare(conn, 3600)
    shard = backend.connect(write=True, shard=2)  # leaves its WAL files while open
    assert {path.name for path in verify.store_files(db)} == {"s.db", "s.db-shard1", "s.db-shard2"}
    neighbours = [tmp_path / "s.db.bak", tmp_path / "s.dbx", tmp_path / "other.db"]
    for path in neighbours:
        path.write_bytes(b"keep")
    verify.remove_store(db)
    backend.close(shard)
    backend.close(conn)
    assert sorted(tmp_path.iterdir()) == sorted(neighbours)


def test_cpu_per_1k_requests() -> None:
    phase = {"requests": 2000, "cpu": {"server_s": 1.0, "client_s": 0.1}}
    assert cpu_per_1k(phase) == (0.5, 0.05)
    assert cpu_per_1k({"requests": 0, "cpu": {}}) == (None, None)


# ---------------------------------------------------------------------- targets and table


def test_targets_pass_miss_and_skip() -> None:
    seed = ScenarioResult(
        "seed",
        rows=[
            bench_row("seed", "writes", "trioagg", 950),
            bench_row("seed", "writes", "ceiling", 1000),
            bench_row("seed", "writes", "naive", 200),
            bench_row("seed", "reads", "trioagg", 700),
            bench_row("seed", "reads", "ceiling", 1000),
        ],
    )
    batch = ScenarioResult(
        "batch", rows=[bench_row("batch", "json", "trioagg", 250_000, "events/s")]
    )
    targets = {t.name: t for t in evaluate_targets({"seed": seed, "batch": batch})}
    assert targets["single durable (seed writes) >= 0.9 x ceiling"].status == "PASS"
    assert targets["single durable (seed writes) >= 5 x naive"].status == "MISS"
    assert targets["reads >= 1.0 x ceiling GET"].status == "MISS"
    assert targets["batch durable >= 200,000 events/s"].status == "PASS"
    assert targets["batch durable >= 2 x Go design (committed)"].status == "SKIP"
    assert targets["reads during batch ingest >= 0.8 x ceiling GET"].status == "SKIP"
    assert targets["single wait=false >= 0.9 x ceiling"].status == "SKIP"
    assert targets["overload: 0 lost, peak RSS < 300 MB"].status == "SKIP"


def test_table_shows_ratios_targets_and_verification() -> None:
    seed = ScenarioResult(
        "seed",
        rows=[
            bench_row("seed", "writes", "trioagg", 900),
            bench_row("seed", "writes", "ceiling", 1000),
        ],
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


_BOUNDS = ["0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.25", "0.5", "1.0"]
_BOUNDS += ["2.5", "+Inf"]


def _metrics(
    counts: list[int],
    longest: dict[str, float],
    steps: list[int] | None = None,
    step_longest: dict[str, float] | None = None,
    timed: int = 0,
) -> str:
    """A /metrics text as trioagg writes it with PROMETHEUS_MULTIPROC_DIR: the stall
    histogram summed over workers, one longest-stall gauge per scraped worker; with
    ``steps``, the CPU step histogram, counter and gauges too."""
    bounds = _BOUNDS
    lines = [
        "# HELP trioagg_events_accepted_total Events accepted (queued for commit).",
        "# TYPE trioagg_events_accepted_total counter",
        "trioagg_events_accepted_total 12.0",
        "# HELP trioagg_loop_stall_seconds How late the event loop woke a 10 ms heartbeat.",
        "# TYPE trioagg_loop_stall_seconds histogram",
        "trioagg_loop_stall_seconds_sum 0.27",
        *(
            f'trioagg_loop_stall_seconds_bucket{{le="{le}"}} {n}.0'
            for le, n in zip(bounds, counts, strict=True)
        ),
        f"trioagg_loop_stall_seconds_count {counts[-1]}.0",
        "# HELP trioagg_loop_stall_max_seconds The longest the event loop was held.",
        "# TYPE trioagg_loop_stall_max_seconds gauge",
        *(f'trioagg_loop_stall_max_seconds{{pid="{pid}"}} {s}' for pid, s in longest.items()),
    ]
    if steps is not None:
        lines += [
            "# HELP trioagg_loop_step_cpu_seconds Task steps of at least 1 ms of CPU.",
            "# TYPE trioagg_loop_step_cpu_seconds histogram",
            *(
                f'trioagg_loop_step_cpu_seconds_bucket{{le="{le}"}} {n}.0'
                for le, n in zip(bounds, steps, strict=True)
            ),
            f"trioagg_loop_step_cpu_seconds_count {steps[-1]}.0",
            "# HELP trioagg_loop_steps_timed_total Task steps timed.",
            "# TYPE trioagg_loop_steps_timed_total counter",
            f"trioagg_loop_steps_timed_total {timed}.0",
            "# HELP trioagg_loop_step_cpu_max_seconds The most CPU of one step.",
            "# TYPE trioagg_loop_step_cpu_max_seconds gauge",
            *(
                f'trioagg_loop_step_cpu_max_seconds{{pid="{pid}"}} {s}'
                for pid, s in (step_longest or {}).items()
            ),
        ]
    return "\n".join(lines) + "\n"


def test_cpu_steps_of_a_phase_are_the_step_histogram_between_two_scrapes() -> None:
    quiet = [90] * 12
    before = stalls.parse(_metrics(quiet, {"11": 0.05}, [0] * 12, {"11": 0.0}, timed=1000))
    assert before.steps_timed == 1000 and before.step_longest == {"11": 0.0}
    # during the phase: 5,000 steps timed, 3 of 1-2 ms, 1 of 5-10 ms
    steps = [0, 3, 3, 4] + [4] * 8
    stalled = [90] * 5 + [91] * 7  # and one heartbeat 20-50 ms late
    after = stalls.parse(_metrics(stalled, {"11": 0.05}, steps, {"11": 0.0071}, timed=6000))
    phase = stalls.window(after, before)
    assert phase is not None
    assert (phase["cpu_steps_timed"], phase["cpu_steps_over_1ms"]) == (5000, 4)
    assert phase["cpu_step_at_most_ms"] == 10.0
    # the gauge read from every worker bounds it tighter; a stall with no CPU step behind it
    server = stalls.longest([after], workers=1)
    assert server is not None and server["cpu_step_max_ms"] == 7.1
    assert stalls.step_bound_ms(phase, server) == 7.1
    assert stalls.bound_ms(phase, server) == 50.0
    # steps timed, none of 1 ms: under 1 ms; nothing timed: no figure
    calm = stalls.window(after, after)
    assert calm is not None and calm["cpu_step_at_most_ms"] is None
    assert stalls.step_bound_ms(calm, server) is None
    later = stalls.parse(_metrics(stalled, {"11": 0.05}, steps, {"11": 0.0071}, timed=7000))
    timed_only = stalls.window(later, after)
    assert timed_only is not None and timed_only["cpu_step_at_most_ms"] == 0.0
    assert stalls.step_bound_ms(timed_only, server) == 0.0
    # a server without the step timer: the stall figures alone
    assert "cpu_steps_timed" not in (stalls.window(stalls.parse(_metrics(quiet, {}))) or {})


def test_stalls_of_a_phase_are_the_histogram_between_two_scrapes() -> None:
    before = stalls.parse(_metrics([90, 95, 98, 98, 98] + [98] * 7, {"11": 0.004}))
    assert before.buckets[0] == (0.001, 90.0) and before.buckets[-1] == (float("inf"), 98.0)
    assert before.longest == {"11": 0.004}
    # during the phase: 100 heartbeats, 3 of them 10-20 ms late, 1 of them 20-50 ms late
    after = stalls.parse(_metrics([180, 190, 194, 194, 197] + [198] * 7, {"12": 0.031}))
    assert stalls.window(after, before) == {"heartbeats": 100, "over_10ms": 4, "at_most_ms": 50.0}
    # since start: the highest non-empty bucket of the whole histogram
    assert stalls.window(before) == {"heartbeats": 98, "over_10ms": 0, "at_most_ms": 5.0}
    # a quiet phase: nothing new
    assert stalls.window(before, before) == {"heartbeats": 0, "over_10ms": 0, "at_most_ms": 0.0}
    # beyond the last bucket: no upper bound
    beyond = stalls.parse(_metrics([1] * 11 + [2], {}))
    assert stalls.window(beyond) == {"heartbeats": 2, "over_10ms": 1, "at_most_ms": None}
    # a server without the heartbeat (an older trioagg): nothing to say
    assert stalls.parse("# HELP x y\n# TYPE x counter\nx_total 1.0\n") == stalls.Scrape()
    assert stalls.window(stalls.Scrape()) is None


def test_longest_stall_is_the_largest_gauge_over_the_scrapes() -> None:
    histogram = [50, 60, 70, 80, 81] + [81] * 7
    first = stalls.parse(_metrics(histogram, {"11": 0.0125}))
    second = stalls.parse(_metrics(histogram, {"12": 0.0031}))
    again = stalls.parse(_metrics(histogram, {"11": 0.0125}))
    both = stalls.longest([first, again, second], workers=2)
    assert both == {
        "max_ms": 12.5,
        "by_pid_ms": {"11": 12.5, "12": 3.1},
        "all_workers_seen": True,
        "heartbeats": 81,
        "over_10ms": 1,
        "at_most_ms": 20.0,
    }
    one = stalls.longest([second], workers=2)
    assert one is not None and not one["all_workers_seen"] and one["max_ms"] == 3.1
    assert stalls.longest([stalls.Scrape()], workers=2) is None
    # a phase's bound: the lower of its histogram bound and a complete gauge
    assert stalls.bound_ms({"at_most_ms": 20.0}, both) == 12.5
    assert stalls.bound_ms({"at_most_ms": 5.0}, both) == 5.0
    # an incomplete gauge may miss the worker that stalled: the histogram alone
    assert stalls.bound_ms({"at_most_ms": 20.0}, one) == 20.0
    assert stalls.bound_ms({"at_most_ms": None}, both) == 12.5
    assert stalls.bound_ms(None, None) is None


def test_table_shows_the_loop_stall_and_cpu_step_columns() -> None:
    row = bench_row("seed", "writes", "trioagg", 900)
    ours = replace(
        row, loop_stall_ms=12.5, loop_stalls_over_10ms=2, loop_step_cpu_ms=5.0, loop_steps_timed=9
    )
    quiet = replace(
        row,
        key="reads",
        what="reads",
        loop_stall_ms=2.0,
        loop_stalls_over_10ms=0,
        loop_step_cpu_ms=0.0,
        loop_steps_timed=9,
    )
    text = table(
        "header",
        {
            "seed": ScenarioResult(
                "seed", rows=[ours, quiet, bench_row("seed", "reads", "ceiling", 9)]
            )
        },
        [],
        {"ok": True, "checked": 1, "failures": []},
        [],
    )
    assert "loop stall max (ms)" in text and "CPU step (ms)" in text
    lines = text.splitlines()
    assert "12.5, 2 >10ms           5.0" in next(line for line in lines if "writes" in line)
    assert next(line for line in lines if " reads " in line).rstrip().endswith(" 2.0            <1")
    assert next(line for line in lines if "ceiling" in line).rstrip().endswith("-             -")


def test_scaled_sizes() -> None:
    small = scenarios.scaled(scenarios.FULL, 0.1)
    assert small.seed_writes == 3000
    assert small.batch_s == pytest.approx(0.8)
    assert small.scaling_keys == scenarios.FULL.scaling_keys
    assert scenarios.scaled(scenarios.FULL, 1) is scenarios.FULL


# ---------------------------------------------------------------------- --store postgres


def test_postgres_store_runs_seed_and_batch_as_a_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pgstore.ENV_DSN, raising=False)
    options, _ = cli.parse_args(["--store", "postgres"])
    assert options.store == "postgres"
    assert options.scenarios == ("seed", "batch")
    assert (options.pg_writers, options.pg_workers) == ((1, 2, 4), (1, 2))
    assert options.pg_dsn == "postgresql://127.0.0.1:5432/test"
    options, _ = cli.parse_args(
        ["--store", "postgres", "--scenario", "batch", "--pg-writers", "4,1", "--pg-workers", "2"]
    )
    assert options.scenarios == ("batch",)
    assert (options.pg_writers, options.pg_workers) == ((4, 1), (2,))
    assert cli.parse_args([])[0].store == "sqlite"


def test_postgres_dsn_from_flag_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pgstore.ENV_DSN, "postgresql://u@db:6543/x")
    assert cli.parse_args(["--store", "postgres"])[0].pg_dsn == "postgresql://u@db:6543/x"
    options, _ = cli.parse_args(["--store", "postgres", "--pg-dsn", "postgres://h/y"])
    assert options.pg_dsn == "postgres://h/y"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pg-writers", "1,2"], "--pg-writers needs --store postgres"),
        (["--pg-dsn", "postgresql://h/db"], "--pg-dsn needs --store postgres"),
        (["--store", "postgres", "--pg-workers", "0"], "positive integers"),
        (["--store", "postgres", "--pg-writers", ","], "at least one"),
        (["--store", "postgres", "--pg-dsn", "/tmp/x.db"], "not a postgresql:// URL"),
        (["--store", "postgres", "--pg-dsn", "postgresql://h/d?options=-cx%3Dy"], "options="),
        (["--store", "postgres", "--server-arg", "--writers 2"], "use --pg-writers"),
    ],
)
def test_postgres_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_schema_dsn_sets_the_search_path() -> None:
    import psycopg

    dsn = pgstore.schema_dsn("postgresql://127.0.0.1:5432/test", "bench_1_ab")
    assert dsn == "postgresql://127.0.0.1:5432/test?options=-csearch_path%3Dbench_1_ab"
    assert psycopg.conninfo.conninfo_to_dict(dsn)["options"] == "-csearch_path=bench_1_ab"
    with_query = pgstore.schema_dsn("postgresql://h/d?sslmode=disable", "bench_x")
    assert with_query.endswith("?sslmode=disable&options=-csearch_path%3Dbench_x")
    with pytest.raises(ValueError):
        pgstore.schema_dsn("postgresql://h/d", 'x"; DROP TABLE t; --')
    name = pgstore.new_schema_name("07")
    assert name.startswith("bench_") and name.endswith("_07")
    assert name != pgstore.new_schema_name("07")


def test_redact_hides_the_password() -> None:
    assert pgstore.redact("postgresql://u:secret@h:5/d") == "postgresql://u:***@h:5/d"
    assert pgstore.redact("postgresql://h/d") == "postgresql://h/d"


def test_hypercorn_command_on_postgres_takes_the_dsn_and_writers() -> None:
    dsn = "postgresql://127.0.0.1/test?options=-csearch_path%3Dbench_1"
    deployment = Deployment(deploy="hypercorn", workers=2)
    argv, env = command("trioagg", deployment, dsn, ["--writers", "4"])
    assert argv[argv.index("--workers") + 1] == "2"
    assert env == {"TRIOAGG_DB": dsn, "TRIOAGG_WRITERS": "4"}
    argv, _ = command("trioagg", Deployment(), dsn, ["--writers", "2"])
    assert argv[argv.index("--db") + 1] == dsn


@pytest.mark.parametrize("deploy", ["serve", "hypercorn"])
def test_matrix_varies_the_workers_of_the_run_deployment(deploy: str) -> None:
    options, _ = cli.parse_args(
        ["--store", "postgres", "--deploy", deploy, "--workers", "3", "--keep-alive", "30"]
    )

    class FakeBench:
        pass

    bench = FakeBench()
    bench.options = options  # type: ignore[attr-defined]
    deployment = scenarios.matrix_deployment(bench, 1)  # type: ignore[arg-type]
    assert (deployment.deploy, deployment.workers, deployment.keep_alive) == (deploy, 1, 30)
    assert f"{deploy} --workers 1,2 --keep-alive 30" in cli.matrix_deployment_text(options)


def test_cell_keys_round_trip() -> None:
    assert scenarios.cell_key("writes", 2, 4) == "writes workers=2 writers=4"
    assert scenarios.parse_cell_key("writes workers=2 writers=4") == ("writes", 2, 4)
    assert scenarios.parse_cell_key(scenarios.cell_key("json", 1)) == ("json", 1, None)


def _matrix() -> ScenarioResult:
    rows = []
    for workers in (1, 2):
        for writers in (1, 2, 4):
            rate = 1000.0 * workers * (1 + writers / 10)
            row = bench_row("seed", scenarios.cell_key("writes", workers, writers), "trioagg", rate)
            row.db_cpu_1k = 0.25
            rows.append(row)
        rows.append(bench_row("seed", scenarios.cell_key("writes", workers), "ceiling", 4000.0))
    return ScenarioResult("seed", rows=rows, facts={"store": "postgres", "cells": []})


def test_scaling_table_is_relative_to_the_first_cell() -> None:
    lines = report.pg_scaling({"seed": _matrix()})
    text = "\n".join(lines)
    assert lines[0].startswith("POSTGRES SCALING")
    assert "seed writes req/s" in text
    one_writer = next(line for line in lines if line.strip().startswith("1 writer "))
    assert "1,100" in one_writer and "1.00x" in one_writer and "2.00x" in one_writer
    assert "0.75" in one_writer  # server 0.5 + PostgreSQL 0.25 ms CPU per request
    assert "ceiling" in lines[-1] and "4,000" in lines[-1]
    assert (
        report.pg_scaling({"seed": ScenarioResult("seed", rows=[bench_row("seed", "w", "x", 1)])})
        == []
    )
    # the main table compares every cell with the ceiling of its worker count
    full = table("h", {"seed": _matrix()}, [], {"ok": True, "checked": 8, "failures": []}, [])
    assert "0.28" in full  # 1,100 / 4,000
    assert "0.50+0.25/0.05" in full


@pytest.mark.slow
def test_pg_chart_draws(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "pg.png"
    report.pg_chart(path, {"seed": _matrix()}, "title")
    assert path.stat().st_size > 1000


def test_process_tree_cpu_counts_a_process_and_its_children() -> None:
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        tree = loadgen.process_tree_cpu(os.getpid())
        assert set(tree) >= {os.getpid(), child.pid}
    finally:
        child.kill()
        child.wait()
    assert loadgen.process_tree_cpu(None) == {}
    assert loadgen.cpu_since({1: 1.0, 2: 5.0}, {1: 1.5, 3: 0.25}) == pytest.approx(0.75)


def test_store_totals_on_postgres() -> None:
    """Against the local PostgreSQL server when there is one (skipped otherwise)."""
    dsn = pgstore.resolve_dsn(None)
    try:
        pgstore.server_info(dsn)
    except pgstore.PostgresError:
        pytest.skip("no PostgreSQL server at " + pgstore.redact(dsn))
    import psycopg

    schema = pgstore.new_schema_name("test")
    pgstore.create_schema(dsn, schema)
    try:
        with psycopg.connect(pgstore.schema_dsn(dsn, schema), autocommit=True) as conn:
            conn.execute("CREATE TABLE rollups (key TEXT, bucket BIGINT, count BIGINT)")
            conn.execute("INSERT INTO rollups VALUES ('a', 0, 3), ('a', 3600, 4), ('b', 0, 1)")
        assert pgstore.store_totals(dsn, schema) == (8, 3)
    finally:
        pgstore.drop_schema(dsn, schema)
    with pytest.raises(pgstore.PostgresError):
        pgstore.store_totals(dsn, schema)


def test_events_carry_distinct_ids_only_when_asked() -> None:
    rng = random.Random(3)
    template = {"keys": 10, "start": 1_700_000_000, "span": 3600}
    plain = msgspec.json.decode(loadgen.render_event(rng, template))
    assert "distinct_id" not in plain
    sketched = msgspec.json.decode(loadgen.render_event(rng, {**template, "distinct_ids": 5}))
    assert sketched["distinct_id"] in {f"u{i}" for i in range(5)}


def test_sketches_runs_alone() -> None:
    options, _ = cli.parse_args(["--scenario", "sketches"])
    assert options.scenarios == ("sketches",)


def test_the_key_check_is_timed_in_a_real_app() -> None:
    from bench import authcost

    microseconds = authcost.check_microseconds(calls=50)
    assert 0 < microseconds < float("inf")
