"""Fault injection on a SQLite file shared by processes: two hypercorn workers and a
``trioagg serve`` writing at once, and many processes opening one fresh file together."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioagg.core.settings import Settings
from trioagg.store import open_store

from .conftest import Ledger, assert_store_holds, shard_files

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("writers", [1, 2])
async def test_two_hypercorn_workers_and_a_serve_on_one_store_count_every_event_once(
    server_process: Any, tmp_path: Path, writers: int
) -> None:
    db = tmp_path / "shared.db"
    serve = server_process("--writers", str(writers), db=db).start()
    environment = {"TRIOAGG_DB": str(db), "TRIOAGG_WRITERS": str(writers)}
    workers = server_process(db=db, env=environment).start(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "--worker-class",
            "trio",
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "trioagg.app:create_app()",
        ]
    )
    assert serve.url and workers.url, serve.output + workers.output
    ledger = Ledger(hours=2)

    async def client_loop(url: str, key: str, requests: int) -> None:
        # A connection per client: the kernel spreads them over both workers.
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for _ in range(requests):
                request = ledger.new(key)
                while (response := await ledger.send(client, request)).status_code != 200:
                    assert response.status_code == 503, response.text  # then retry: ids

    async with trio.open_nursery() as nursery:
        for number in range(6):
            nursery.start_soon(client_loop, serve.url, f"serve{number}", 25)
            nursery.start_soon(client_loop, workers.url, f"workers{number}", 25)
    assert workers.stop() == 0, workers.output
    assert serve.stop() == 0, serve.output
    assert len(ledger.acknowledged) == len(ledger.bodies) == 300
    assert_store_holds(db, ledger.expected())


ROUNDS = 50
PROCESSES = 8


def open_fresh_stores(folder: str, writers: int, barrier: Any, failures: Any) -> None:
    """In a forked child: every round, open the round's fresh store with the others."""

    async def open_and_close(db: str) -> None:
        settings = {"db": db, "busy_timeout": "10s", "writers": str(writers)}
        store = await open_store(Settings.from_text(settings))
        await store.aclose()

    for round_number in range(ROUNDS):
        barrier.wait()
        try:
            trio.run(open_and_close, f"{folder}/round{round_number}.db")
        except BaseException as error:
            failures.put(f"round {round_number}: {type(error).__name__}: {error}")


@pytest.mark.parametrize("writers", [1, 2])
def test_processes_opening_one_fresh_store_at_once_all_succeed(
    tmp_path: Path, writers: int
) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(PROCESSES)
    failures = context.SimpleQueue()
    arguments = (str(tmp_path), writers, barrier, failures)
    children = [context.Process(target=open_fresh_stores, args=arguments) for _ in range(PROCESSES)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0] * PROCESSES
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert found == []
    for round_number in range(ROUNDS):
        assert_store_holds(tmp_path / f"round{round_number}.db", {})
        assert len(shard_files(tmp_path / f"round{round_number}.db")) == writers
