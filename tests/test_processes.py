"""Whole processes: signals, crashes, restarts, store checks and the hypercorn factory."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from . import clock
from .conftest import stored_counts

EVENT = {"key": "proc", "value": 1.0}


def test_sigterm_drains_every_queued_202_and_exits_0(
    server_process: Any, hold_write_lock: Any
) -> None:
    server = server_process("--busy-timeout", "60s").start()
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/events", json={"key": "warmup"}).status_code == 200
        hold_write_lock.acquire(server.db)  # commits now wait: requests stay queued
        accepted = 0
        for i in range(40):
            response = client.post(
                "/v1/events", json=[EVENT] * (i % 5 + 1), params={"wait": "false"}
            )
            assert response.status_code == 202
            accepted += response.json()["accepted"]
    server.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None, "it must wait for the queued events, not exit"
    hold_write_lock.release()
    assert server.wait() == 0, server.output
    assert stored_counts(server.db) == {"warmup": 1, "proc": accepted}
    assert "trioagg stopped" in server.output


def test_sigint_is_a_graceful_shutdown_too(server_process: Any) -> None:
    server = server_process().start()
    with httpx.Client(base_url=server.url) as client:
        client.post("/v1/events", json=[EVENT] * 3, params={"wait": "false"})
    server.send_signal(signal.SIGINT)
    assert server.wait() == 0, server.output
    assert stored_counts(server.db) == {"proc": 3}


# Requests cut off by the kill leave httpx's body iterators unfinished.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_sigkill_during_durable_load_loses_no_acknowledged_event(
    server_process: Any,
) -> None:
    server = server_process().start()
    clients = 16
    acknowledged = [0] * clients
    sent = [0] * clients

    async def load(client_number: int, client: httpx.AsyncClient) -> None:
        while True:
            sent[client_number] += 1
            try:
                response = await client.post("/v1/events", json={"key": f"c{client_number}"})
            except httpx.TransportError:
                return
            assert response.status_code == 200
            acknowledged[client_number] += 1

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        trio.open_nursery() as nursery,
    ):
        for number in range(clients):
            nursery.start_soon(load, number, client)
        # Killed under load: once it has acknowledged some (a busy machine takes longer).
        with trio.fail_after(60):
            while sum(acknowledged) <= 100:
                await trio.sleep(0.05)
        server.send_signal(signal.SIGKILL)
    server.wait()

    restarted = server_process(db=server.db).start()
    with httpx.Client(base_url=restarted.url) as reader:
        keys = [f"c{n}" for n in range(clients)]
        doc = reader.get(
            "/v1/aggregates", params={"key": keys, "granularity": "all", "stats": "count"}
        ).json()
    stored = {r["key"]: sum(b["count"] for b in r["buckets"]) for r in doc["results"]}
    for number in range(clients):
        assert acknowledged[number] <= stored[f"c{number}"] <= sent[number]
    assert restarted.stop() == 0


def test_data_survives_a_restart(server_process: Any) -> None:
    first = server_process().start()
    with httpx.Client(base_url=first.url) as client:
        client.post("/v1/events", json=[{"key": "keep", "value": v} for v in (1, 2, 3)])
    assert first.stop() == 0
    second = server_process().start()
    with httpx.Client(base_url=second.url) as client:
        doc = client.get("/v1/aggregates", params={"key": "keep", "granularity": "all"}).json()
    assert doc["results"][0]["buckets"][0]["sum"] == 6.0
    assert second.stop() == 0


def test_a_different_bucket_on_an_existing_store_fails_clearly(server_process: Any) -> None:
    first = server_process("--bucket", "5m").start()
    assert first.stop() == 0
    second = server_process("--bucket", "1h").start()
    assert second.wait() == 2
    assert "trioagg cannot start: the store at" in second.output
    assert "was created with 5m buckets, but --bucket is 1h" in second.output
    assert "Traceback" not in second.output


def test_bad_flag_values_fail_clearly(server_process: Any) -> None:
    server = server_process("--batch-size", "lots").start()
    assert server.wait() == 2
    assert "--batch-size / TRIOAGG_BATCH_SIZE" in server.output


def test_hypercorn_factory_works_with_environment_variables_alone(
    server_process: Any, tmp_path: Path
) -> None:
    db = tmp_path / "factory.db"
    env = {"TRIOAGG_DB": str(db), "TRIOAGG_BUCKET": "15m", "TRIOAGG_MAX_BATCH": "3"}
    server = server_process(env=env).start(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "--worker-class",
            "trio",
            "--bind",
            "127.0.0.1:0",
            "trioagg.app:create_app()",
        ]
    )
    assert server.url, server.output
    day = clock.whole_days_ago(1)
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/events", json=[EVENT] * 4).status_code == 413
        response = client.post(
            "/v1/events", json=[{"key": "f", "ts": day + 60}, {"key": "f", "ts": day + 960}]
        )
        assert response.status_code == 200
        doc = client.get(
            "/v1/aggregates",
            params={"key": "f", "granularity": "bucket", "from": day, "to": day + 3600},
        ).json()
        assert [b["start"][11:16] for b in doc["results"][0]["buckets"]] == ["00:00", "00:15"]
    assert server.stop() == 0, server.output
    assert stored_counts(db) == {"f": 2}


def test_ids_count_once_across_a_restart_and_a_killed_process(server_process: Any) -> None:
    batch = [{"key": "once", "id": f"evt-{i}"} for i in range(20)]
    first = server_process().start()
    with httpx.Client(base_url=first.url) as client:
        assert client.post("/v1/events", json=batch).json() == {"accepted": 20, "duplicates": 0}
    assert first.stop() == 0

    second = server_process().start()
    with httpx.Client(base_url=second.url) as client:
        assert client.post("/v1/events", json=batch).json()["duplicates"] == 20
        more = [{"key": "once", "id": f"evt-{i}"} for i in range(20, 30)]
        assert client.post("/v1/events", json=more).json()["duplicates"] == 0
    second.send_signal(signal.SIGKILL)
    second.wait()

    third = server_process().start()
    with httpx.Client(base_url=third.url) as client:
        retry = batch + more
        assert client.post("/v1/events", json=retry).json() == {"accepted": 30, "duplicates": 30}
    assert third.stop() == 0
    assert stored_counts(third.db) == {"once": 30}


def test_metrics_are_totals_across_hypercorn_workers(server_process: Any, tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, whichever worker takes the scrape reads the same
    totals, so Prometheus never sees a counter go backwards."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {"TRIOAGG_DB": str(tmp_path / "workers.db"), "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    workers = ["--worker-class", "trio", "--workers", "2", "--bind", "127.0.0.1:0"]
    server = server_process(env=env).start(
        [sys.executable, "-m", "hypercorn", *workers, "trioagg.app:create_app()"]
    )
    assert server.url, server.output
    for _ in range(40):  # a connection each, so that both workers take some
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/v1/events", json={"key": "w"}).status_code == 200
    pids = set()
    for _ in range(400):  # stops once both workers answered; under load one may win long
        with httpx.Client(base_url=server.url) as client:
            families = list(text_string_to_metric_families(client.get("/metrics").text))
            assert client.get("/v1/status").json()["events_committed"] == 40  # the dashboard's
        values = {s.name: s for family in families for s in family.samples}
        assert values["trioagg_events_committed_total"].value == 40
        pids.add(values["trioagg_build_info"].labels["pid"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, "every scrape reached the same worker"
    assert server.stop() == 0, server.output
