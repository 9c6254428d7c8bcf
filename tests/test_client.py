"""trioagg.client against real servers: batching, retries, the full-buffer policy, threads."""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Unpack

import httpx
import msgspec
import pytest
import trio
import trio.testing

from trioagg.client import (
    AsyncClient,
    Client,
    ClientError,
    ClientOptions,
    Counters,
    Rejected,
    ServerError,
    Timeout,
    TransportError,
    Undelivered,
    uuid7,
)
from trioagg.client.answers import Aggregates, Bucket, Ranked, Series, Top, as_sent
from trioagg.core.answers import KeyInfo
from trioagg.core.stats import STATS

from .conftest import Server, StartServer, metric, stored_counts, wait_until

TS = 1795514400
TS_TEXT = "2026-11-24T10:00:00Z"


def test_uuid7_is_time_ordered_and_versioned() -> None:
    ids = [uuid7() for _ in range(50)]
    assert all(i[14] == "7" and i[19] in "89ab" for i in ids)
    assert len(set(ids)) == 50
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # the millisecond prefix


async def test_a_full_batch_goes_at_once_and_the_rest_on_flush(server: Server) -> None:
    async with AsyncClient(server.url, batch_events=10, max_delay=3600) as client:
        for i in range(35):
            await client.send("size", i, ts=TS)
        await wait_until(lambda: client.counters.acknowledged == 30)
        assert client.counters.buffered == 5  # too few for a batch, too young to go
        assert await metric(server, "trioagg_events_accepted_total") == 30
        await client.flush()
        assert client.counters.acknowledged == 35
    assert stored_counts(server.db) == {"size": 35}


async def test_batches_go_by_bytes_and_by_age(server: Server) -> None:
    async with AsyncClient(server.url, batch_bytes=1000, max_delay=3600) as client:
        for _ in range(20):  # about 90 bytes each
            await client.send("bytes", ts=TS, tags={"pad": "x" * 30})
        await wait_until(lambda: client.counters.acknowledged >= 10)
        assert client.counters.buffered > 0
    async with AsyncClient(server.url, max_delay=0.05) as client:
        await client.send("age", ts=TS)
        await wait_until(lambda: client.counters.acknowledged == 1)  # no flush, no close
    assert stored_counts(server.db) == {"bytes": 20, "age": 1}


async def test_gzip_by_default_falls_back_when_the_server_refuses_it(server: Server) -> None:
    async with AsyncClient(server.url, batch_events=100) as client:
        for _ in range(500):
            await client.send("zipped", ts=TS)
    assert client.counters.acknowledged == 500
    assert client.counters.failed == 0
    assert client.gzip is not None  # decided by the server's first answer
    assert stored_counts(server.db) == {"zipped": 500}


async def test_close_flushes_and_ids_make_a_resend_count_once(server: Server) -> None:
    async with AsyncClient(server.url) as client:
        for i in range(10):
            await client.send("once", ts=TS, id=f"event-{i}")
    async with AsyncClient(server.url, wait=False) as again:
        for i in range(10):
            await again.send("once", ts=TS, id=f"event-{i}")
    assert again.counters.acknowledged == 10  # 202: queued; duplicates known only durably
    await wait_until(lambda: server.app.service.writers.queued() == 0)
    async with AsyncClient(server.url) as third:
        for i in range(10):
            await third.send("once", ts=TS, id=f"event-{i}")
    assert (third.counters.acknowledged, third.counters.duplicates) == (10, 10)
    assert stored_counts(server.db) == {"once": 10}


async def test_refused_events_reach_the_caller_and_the_rest_is_stored(server: Server) -> None:
    refused: list[Rejected] = []
    async with AsyncClient(server.url, on_error=refused.append) as client:
        await client.send("good", ts=TS)
        await client.send("bad\x01key", ts=TS)
        await client.send("good", ts=TS)
        await client.send("bad", ts=TS, tags={"no spaces": "x"})
    (rejected,) = refused
    assert rejected.error.status == 422 and rejected.error.code == "invalid_events"
    assert [b'"bad\\u0001key"' in rejected.events[0], b'"bad"' in rejected.events[1]] == [True] * 2
    assert {(p["index"], p["field"]) for p in rejected.problems} == {(0, "key"), (1, "tags")}
    assert client.counters.failed == 2 and client.counters.retried == 0
    assert client.counters.acknowledged == 2
    assert stored_counts(server.db) == {"good": 2}


@pytest.mark.slow
async def test_forced_503s_are_retried_to_exact_totals(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    server = await start_server(busy_timeout="100ms")
    hold_write_lock.acquire(server.db)
    async with AsyncClient(server.url, batch_events=50, max_delay=0.01) as client:
        for i in range(200):
            await client.send(f"k{i % 3}", ts=TS)
        await wait_until(lambda: client.counters.retried >= 3)
        assert client.counters.acknowledged == 0
        hold_write_lock.release()
        await client.flush()
    assert (client.counters.acknowledged, client.counters.failed) == (200, 0)
    assert sum(stored_counts(server.db).values()) == 200


def _ids(lines: list[bytes]) -> list[str]:
    return sorted(json.loads(line)["id"] for line in lines)


@pytest.mark.slow
async def test_close_gives_up_at_close_timeout_and_hands_back_what_was_not_sent(
    start_server: StartServer, hold_write_lock: Any
) -> None:
    """A server answering 503 held close() for (batches / concurrency) x retry_timeout:
    12.8 s for 20,000 events at retry_timeout=2, tens of minutes at the defaults."""
    server = await start_server(busy_timeout="100ms")
    hold_write_lock.acquire(server.db)
    refused: list[Rejected] = []
    sent = [f"held-{i}" for i in range(20_000)]

    def run() -> tuple[float, Undelivered, Counters]:
        client = Client(server.url, close_timeout=1, on_error=refused.append)
        for id in sent:
            client.send("held", ts=TS, id=id)
        give_up = time.monotonic() + 30
        while client.counters.retried < 2:  # 503s are being retried
            assert time.monotonic() < give_up, "no 503 came"
            time.sleep(0.01)
        began = time.monotonic()
        with pytest.raises(Undelivered) as raised:
            client.close()
        return time.monotonic() - began, raised.value, client.counters

    elapsed, undelivered, counters = await trio.to_thread.run_sync(run)
    assert elapsed < 1 + 2  # close_timeout, and a margin for a loaded machine
    assert _ids(undelivered.events) == sorted(sent)
    assert "20,000 events not delivered within close_timeout (1 s)" in str(undelivered)
    assert undelivered.last_error is not None and undelivered.last_error.status == 503
    assert (counters.acknowledged, counters.failed, counters.buffered) == (0, 20_000, 0)
    assert {r.error.code for r in refused} == {"close_timeout"}
    assert _ids([line for r in refused for line in r.events]) == sorted(sent)
    hold_write_lock.release()
    async with AsyncClient(server.url) as again:  # what a caller saved, sent again
        for line in undelivered.events:
            await again.send_encoded(line)
    assert stored_counts(server.db) == {"held": 20_000}


async def test_close_timeout_bounds_every_retry_under_way(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under a mock clock: what is under way when close() begins (a connection attempt,
    a pause of up to 30 s between two) ends at its deadline."""
    client = AsyncClient(
        _dead_url(), batch_events=10, gzip=False, retry_timeout=3600, close_timeout=5
    )
    with pytest.raises(Undelivered) as raised:
        async with client:
            for i in range(100):
                await client.send("late", id=f"late-{i}")
            await trio.sleep(60)  # the backoff has grown to pauses of many seconds
            began = trio.current_time()
    assert trio.current_time() - began <= 5
    assert _ids(raised.value.events) == sorted(f"late-{i}" for i in range(100))
    assert (client.counters.failed, client.counters.buffered) == (100, 0)
    assert isinstance(raised.value, ClientError) and raised.value.code == "close_timeout"
    assert type(raised.value.last_error) is TransportError  # why the events were waiting


async def test_retries_go_on_past_a_thousand_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """0.1 * 2**attempt overflowed a float at attempt 1,024 and crashed the client."""
    client = AsyncClient(
        _dead_url(), batch_events=1, gzip=False, retry_timeout=10**9, close_timeout=0
    )
    with pytest.raises(Undelivered):
        async with client:
            await client.send("patient")
            while client.counters.retried < 1_100:
                await trio.sleep(60)
    assert (client.counters.failed, client.counters.buffered) == (1, 0)


async def test_undelivered_does_not_hide_the_error_leaving_the_block(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(KeyError) as raised:
        async with AsyncClient(_dead_url(), close_timeout=0) as client:
            await client.send("lost")
            raise KeyError("the program's own")
    assert raised.value.__notes__ == ["1 events not delivered within close_timeout (0 s)"]

    def sync() -> None:
        with Client(_dead_url(), close_timeout=0) as client:
            client.send("lost")
            raise KeyError("the program's own")

    with pytest.raises(KeyError) as raised:
        await trio.to_thread.run_sync(sync)
    assert raised.value.__notes__ == ["1 events not delivered within close_timeout (0 s)"]


async def test_a_send_waiting_for_room_when_close_gives_up_is_refused_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = AsyncClient(
        _dead_url(), buffer=10, batch_events=5, concurrency=1, retry_timeout=3600, close_timeout=1
    )
    accepted = 0
    refusals: list[RuntimeError] = []

    async def fill() -> None:
        nonlocal accepted
        try:
            for _ in range(100):
                await client.send("full")
                accepted += 1
        except RuntimeError as error:
            refusals.append(error)

    async with trio.open_nursery() as nursery:
        with pytest.raises(Undelivered) as raised:
            async with client:
                nursery.start_soon(fill)
                # the buffer, one batch waiting for the sender, one being retried
                await wait_until(lambda: client.counters.buffered == 20)
    assert len(refusals) == 1  # the send waiting for room at the end was told
    assert accepted >= 20 and len(raised.value.events) == accepted  # each one reported
    assert (client.counters.failed, client.counters.buffered) == (accepted, 0)


async def test_a_request_too_large_for_the_server_is_split(start_server: StartServer) -> None:
    server = await start_server(max_batch="7")
    async with AsyncClient(server.url, batch_events=100) as client:
        for _ in range(30):
            await client.send("split", ts=TS)
    assert (client.counters.acknowledged, client.counters.failed) == (30, 0)
    assert stored_counts(server.db) == {"split": 30}


def _dead_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


async def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    async with AsyncClient(
        _dead_url(),
        buffer=10,
        batch_events=5,
        concurrency=1,
        retry_timeout=0.3,
        policy="drop_oldest",
    ) as client:
        for i in range(100):
            await client.send("lost", i)
        counters = client.counters
        # held: the buffer, one batch waiting for the sender, one being retried
        assert counters.buffered <= 10 + 2 * 5
        assert counters.dropped + counters.buffered == 100
    assert counters.buffered == 0
    assert counters.dropped + counters.failed == 100


async def test_a_full_buffer_blocks_send_under_the_block_policy() -> None:
    sent = 0
    async with AsyncClient(_dead_url(), buffer=10, batch_events=5, concurrency=1) as client:
        with trio.move_on_after(0.5):
            for _ in range(100):
                await client.send("held")
                sent += 1
        # the buffer, one batch waiting for the sender, one being retried; nothing dropped
        assert (sent, client.counters.buffered, client.counters.dropped) == (20, 20, 0)
        client.retry_timeout = 0  # give up now
    assert client.counters.failed == 20


async def test_send_encoded_many_fills_batches_and_waits_for_room(server: Server) -> None:
    lines = [b'{"key":"many","ts":%d,"id":"many-%d"}\n' % (TS, i) for i in range(1000)]
    async with AsyncClient(server.url, batch_events=100, buffer=250) as client:
        await client.send_encoded_many(lines[:10])  # too few for a batch: sent by age
        await wait_until(lambda: client.counters.acknowledged == 10)
        await client.send_encoded_many(lines)  # 4 times the buffer: waits for room
        # the buffer, a batch for each of the 2 senders and one waiting for them
        assert client.counters.buffered <= 250 + 3 * 100
    assert client.counters.acknowledged == 1010 and client.counters.duplicates == 10
    assert stored_counts(server.db) == {"many": 1000}


async def test_send_encoded_many_holds_to_the_buffer_policy() -> None:
    lines = [b'{"key":"held","id":"held-%d"}\n' % i for i in range(100)]
    async with AsyncClient(_dead_url(), buffer=10, batch_events=5, concurrency=1) as client:
        with trio.move_on_after(0.5):
            await client.send_encoded_many(lines)
        # the buffer, one batch waiting for the sender, one being retried; nothing dropped
        assert (client.counters.buffered, client.counters.dropped) == (20, 0)
        client.retry_timeout = 0  # give up now
    assert client.counters.failed == 20
    async with AsyncClient(
        _dead_url(), buffer=10, batch_events=5, concurrency=1, policy="drop_oldest"
    ) as client:
        await client.send_encoded_many(lines)
        assert client.counters.dropped + client.counters.buffered == 100
        assert client.counters.buffered <= 10 + 2 * 5
        client.retry_timeout = 0
    assert client.counters.dropped + client.counters.failed == 100


async def test_the_sync_client_is_safe_from_many_threads(server: Server) -> None:
    def run() -> Client:
        with Client(server.url, batch_events=100) as client:

            def worker(n: int) -> None:
                for i in range(500):
                    client.send(f"thread{n % 2}", i, ts=TS)

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            client.flush()
            assert client.counters.acknowledged == 4000
            assert len(client.keys("thread")) == 2
        return client

    client = await trio.to_thread.run_sync(run)
    assert (client.counters.sent, client.counters.duplicates) == (4000, 0)
    assert stored_counts(server.db) == {"thread0": 2000, "thread1": 2000}


@pytest.mark.slow
async def test_the_sync_client_flushes_at_interpreter_exit(server: Server) -> None:
    script = (
        "from trioagg.client import Client\n"
        f"client = Client({server.url!r}, max_delay=3600)\n"
        f"for _ in range(7): client.send('exit', ts={TS})\n"
    )
    await trio.run_process([sys.executable, "-c", script], capture_stderr=True)
    assert stored_counts(server.db) == {"exit": 7}


class Program:
    """A Python program using the client, in a child process: its output line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.read = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(60):
            while b"\n" not in self.read:
                chunk = await self.process.stdout.receive_some()
                assert chunk, f"the program ended: {self.read!r}"
                self.read += chunk
        line, self.read = self.read.split(b"\n", 1)
        return line.decode()

    async def exit(self, signum: signal.Signals | None = None) -> tuple[int, str]:
        """Send ``signum``; the exit status (negative: killed by that signal) and stderr,
        once the program has ended (what is left of its output is then in ``read``)."""
        if signum is not None:
            self.process.send_signal(signum)
        assert self.process.stdout is not None and self.process.stderr is not None
        errors = b""
        with trio.fail_after(60):
            while chunk := await self.process.stderr.receive_some():
                errors += chunk
            while chunk := await self.process.stdout.receive_some():
                self.read += chunk
            return await self.process.wait(), errors.decode()


StartProgram = Callable[..., Awaitable[Program]]


@pytest.fixture
async def start_program() -> AsyncIterator[StartProgram]:
    """Start ``python -c SOURCE ARGS...``; what is left running is killed afterwards."""
    started: list[trio.Process] = []

    async def start(source: str, *args: str) -> Program:
        command = [sys.executable, "-c", source, *args]
        pipe = subprocess.PIPE
        started.append(await trio.lowlevel.open_process(command, stdout=pipe, stderr=pipe))
        return Program(started[-1])

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            await process.wait()


async def _count(server: Server, key: str) -> tuple[int, float]:
    """Count and sum of ``key``'s events, over GET /v1/aggregates."""
    query: dict[str, Any] = {"key": key, "from": TS, "to": TS + 3600, "granularity": "all"}
    answer = (await server.client.get("/v1/aggregates", params=query)).json()
    buckets = [bucket for series in answer["results"] for bucket in series["buckets"]]
    return sum(b["count"] for b in buckets), sum(b["sum"] for b in buckets)


async def test_sigterm_flushes_the_sync_client_and_ends_the_process_as_sigterm(
    server: Server, start_program: StartProgram
) -> None:
    """SIGTERM's default action ended the process with 20,000 of 50,000 events unsent."""
    program = await start_program(
        "import sys, time\n"
        "from trioagg.client import Client\n"
        "client = Client(sys.argv[1], max_delay=3600)\n"
        f"for i in range(50_000): client.send('term', i, ts={TS})\n"
        "print('sent', flush=True)\n"
        "time.sleep(3600)\n",
        server.url,
    )
    assert await program.line() == "sent"
    assert await program.exit(signal.SIGTERM) == (-signal.SIGTERM, "")
    assert await _count(server, "term") == (50_000, sum(range(50_000)))


async def test_sigterm_while_send_waits_for_room_flushes_once_send_is_over(
    start_server: StartServer, hold_write_lock: Any, start_program: StartProgram
) -> None:
    """The main thread is inside send() (it waits for room, the server answering 503):
    the handler only starts the closing, and the process ends when send() returns."""
    server = await start_server(busy_timeout="100ms")
    hold_write_lock.acquire(server.db)
    program = await start_program(
        "import sys\n"
        "from trioagg.client import Client\n"
        "client = Client(sys.argv[1], buffer=1000, batch_events=100, concurrency=1)\n"
        "i = 0\n"
        "while True:\n"
        f"    client.send('room', i, ts={TS})\n"
        "    i += 1\n"
        "    if i % 100 == 0: print(i, flush=True)\n",
        server.url,
    )
    while await program.line() != "1200":  # the buffer, a batch waiting, one being sent
        pass
    # Nothing is committed while the lock is held: the 1,201st send() waits for room.
    program.process.send_signal(signal.SIGTERM)
    hold_write_lock.release()
    assert await program.exit() == (-signal.SIGTERM, "")
    count, total = await _count(server, "room")
    assert count in (1200, 1201)  # 1201: the send that waited for room got it
    assert total == sum(range(count))  # every event once, and no other


@pytest.mark.parametrize("held", ["buffer", "logging"])
async def test_sigterm_while_the_main_thread_holds_a_lock_the_client_needs(
    start_program: StartProgram, held: str
) -> None:
    """The handler runs in the main thread, maybe while it holds a lock the client's
    thread needs: the client's buffer lock inside send(), or a logging handler's lock
    (httpx logs each request from the client's thread). A handler that closed the
    clients there waited forever (the logging case hung until SIGKILL)."""
    lock = (
        "client._async._buffer.lock" if held == "buffer" else "logging.getLogger().handlers[0].lock"
    )
    program = await start_program(
        "import logging, os, signal, sys, time\n"
        "from trioagg.client import Client\n"
        "logging.basicConfig(level=logging.INFO, stream=open(os.devnull, 'w'))\n"
        "client = Client(sys.argv[1], close_timeout=0)\n"
        "client.send('held')\n"
        f"with {lock}:\n"
        "    print('signalling, the lock held', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.5)\n"
        "time.sleep(3600)\n",
        _dead_url(),
    )
    assert await program.line() == "signalling, the lock held"
    report = "trioagg.client at SIGTERM: 1 events not delivered within close_timeout (0 s)\n"
    assert await program.exit() == (-signal.SIGTERM, report)


async def test_sigterm_handlers_of_the_program_are_kept(start_program: StartProgram) -> None:
    program = await start_program(
        "import signal, sys\n"
        "from trioagg.client import Client\n"
        "def own(signum, frame): pass\n"
        "kept = []\n"
        "for setting in (own, signal.SIG_IGN):\n"
        "    signal.signal(signal.SIGTERM, setting)\n"
        "    with Client(sys.argv[1]):\n"
        "        kept.append(signal.getsignal(signal.SIGTERM) is setting)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "with Client(sys.argv[1], flush_on_sigterm=False):\n"
        "    kept.append(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n"
        "with Client(sys.argv[1]):\n"
        "    kept.append(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)\n"
        "print(kept, flush=True)\n",
        _dead_url(),
    )
    assert await program.line() == str([True] * 4)
    assert await program.exit() == (0, "")


async def test_what_the_exit_could_not_deliver_is_reported_on_stderr(
    start_program: StartProgram,
) -> None:
    program = await start_program(
        "import sys\n"
        "from trioagg.client import Client\n"
        "Client(sys.argv[1], close_timeout=0).send('lost')\n",
        _dead_url(),
    )
    report = "trioagg.client at exit: 1 events not delivered within close_timeout (0 s)\n"
    assert await program.exit() == (0, report)


async def test_queries_answer_typed_results_and_errors_carry_the_envelope(server: Server) -> None:
    async with AsyncClient(server.url) as client:
        for i in range(5):
            await client.send("typed", i, ts=TS + i * 3600, tags={"r": "eu" if i % 2 else "us"})
        await client.flush()
        answer = await client.aggregates(
            "typed", start=TS, end=TS + 86400, granularity="all", group_by="r", stats=["count"]
        )
        assert {s.tags["r"]: s.buckets[0].count for s in answer.results} == {"eu": 2, "us": 3}
        eu = await client.aggregates("typed", start=TS, end=TS + 86400, tags={"r": "eu"})
        assert [b.sum for b in eu.results[0].buckets] == [1.0, 3.0]
        top = await client.top(start=TS, end=TS + 86400, stat="sum")
        assert top.results == [Ranked("typed", sum=10.0)]
        with pytest.raises(ServerError) as raised:
            await client.aggregates("typed", stats=["bogus"])
    assert raised.value.status == 422 and raised.value.code == "invalid_query"
    assert raised.value.details[0]["parameter"] == "stats"
    assert isinstance(raised.value, ClientError)


async def test_answers_are_typed_all_the_way_down(start_server: StartServer) -> None:
    """Buckets and top's results were plain dicts inside the structs."""
    server = await start_server(quantiles="*")
    async with AsyncClient(server.url) as client:
        for value, who in ((1, "u1"), (2, "u2"), (3, "u1")):
            await client.send("deep", value, ts=TS, distinct_id=who)
        await client.send("deep", 10, ts=TS + 2 * 3600)
        await client.send("deep.less", ts=TS)
        await client.flush()
        query: dict[str, Any] = {
            "start": TS,
            "end": TS + 3 * 3600,
            "fill": "null",
            "stats": "count,sum,avg,stddev,distinct,p50,p99.9",
        }
        answer = await client.aggregates("deep", **query)
        plain = await client.aggregates("deep", start=TS, end=TS + 3600)
        top = await client.top(start=TS, end=TS + 3600)
    assert isinstance(answer, Aggregates) and isinstance(answer.results[0], Series)
    full, empty, last = answer.results[0].buckets
    assert all(isinstance(b, Bucket) for b in (full, empty, last))
    assert (full.count, full.sum, full.avg, full.distinct) == (3, 6.0, 2.0, 2)
    assert full.min is msgspec.UNSET  # not asked for; None is the server's null
    assert full.percentiles.keys() == {"p50", "p99.9"}
    assert (empty.count, empty.sum, empty.distinct, empty.percentiles["p50"]) == (
        0,
        None,
        None,
        None,
    )
    assert last.distinct is None  # no event of the bucket had a distinct_id
    assert list(full.stats()) == ["count", "sum", "avg", "stddev", "distinct", "p50", "p99.9"]
    assert repr(plain.results[0].buckets[0]) == (
        f"Bucket(start='{TS_TEXT}', count=3, sum=6.0, min=1.0, max=3.0, avg=2.0)"
    )
    # nothing is lost on the way: as sent, it is the server's answer
    params: dict[str, Any] = {"key": "deep", "from": TS, "to": TS + 3 * 3600, "fill": "null"}
    sent = await server.client.get("/v1/aggregates", params={**params, "stats": query["stats"]})
    assert msgspec.to_builtins(as_sent(answer)) == sent.json()
    assert isinstance(top, Top)
    assert top.results == [Ranked("deep", count=3), Ranked("deep.less", count=1)]
    assert top.results[0].sum is msgspec.UNSET
    sent = await server.client.get("/v1/top", params={"from": TS, "to": TS + 3600})
    assert msgspec.to_builtins(top) == sent.json()
    assert set(STATS) <= set(Bucket.__struct_fields__)  # a stat the server adds has a field


async def test_stats_take_a_comma_list_a_list_or_a_tuple_and_nothing_else(
    server: Server,
) -> None:
    """``stats="count,sum"`` was sent as ``c,o,u,n,t,,,s,u,m``: a str is a sequence."""
    async with AsyncClient(server.url) as client:
        await client.send("listed", 2, ts=TS)
        await client.flush()
        for stats in ("count,sum", "count, sum", ["count", "sum"], ("count", "sum")):
            answer = await client.aggregates(
                ["listed"], start=TS, end=TS + 3600, granularity="all", stats=stats
            )
            assert answer.results[0].buckets[0] == Bucket(TS_TEXT, count=1, sum=2.0)
        wrong: list[tuple[dict[str, Any], str]] = [
            ({"stats": {"count", "sum"}}, "stats takes a str or a list or tuple of str, not a set"),
            ({"stats": b"count"}, "not a bytes"),
            ({"stats": ["count", 5, None]}, "not a list holding NoneType, int"),
            ({"group_by": ["region"]}, "group_by takes one tag name, a str, not list"),
        ]
    async with AsyncClient(_dead_url()) as offline:  # refused before any request is made
        for query, message in wrong:
            with pytest.raises(TypeError, match=re.escape(message)):
                await offline.aggregates("listed", **query)
        with pytest.raises(TypeError, match=re.escape("key takes a str or a list or tuple")):
            await offline.aggregates({"listed"})  # type: ignore[arg-type]  # the wrong type is the test


async def test_a_server_error_says_the_servers_reasons(server: Server) -> None:
    """Its text was "422 invalid_query: the query is invalid", the reason only in details."""
    refused: list[Rejected] = []
    async with AsyncClient(server.url, on_error=refused.append) as client:
        with pytest.raises(ServerError) as raised:
            await client.aggregates("typed", stats="count,bogus", group_by="no spaces")
        for i in range(5):
            await client.send(f"bad\x01{i}", ts=TS)
    error = raised.value
    assert (error.status, error.code) == (422, "invalid_query")
    assert error.message == "the query is invalid"
    assert [d["parameter"] for d in error.details] == ["group_by", "stats"]
    assert str(error) == (
        "422 invalid_query: the query is invalid: "
        f"group_by: {error.details[0]['message']}; stats: {error.details[1]['message']}"
    )
    assert "unknown or too many stat(s) bogus" in str(error)
    (rejected,) = refused
    assert len(rejected.error.details) == 5  # an answer may have thousands: three are said
    first = rejected.error.details[0]
    assert str(rejected.error) == (
        f"422 invalid_events: {rejected.error.message}: event 0, key: {first['message']}; "
        f"event 1, key: {rejected.error.details[1]['message']}; "
        f"event 2, key: {rejected.error.details[2]['message']}; 2 more in .details"
    )


async def _fixed_server(nursery: trio.Nursery, answer: bytes | None) -> str:
    """A server on loopback that reads a request, then sends ``answer`` and closes the
    connection, or with None never answers: what a hung or a foreign service does."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            seen = b""
            while b"\r\n\r\n" not in seen:
                data = await stream.receive_some()
                if not data:
                    return
                seen += data
            if answer is None:
                await trio.sleep_forever()
            await stream.send_all(answer)

    serve = functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
    listeners: list[trio.SocketListener] = await nursery.start(serve)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def _answer(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
    return head.encode() + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body


async def test_a_query_without_an_answer_raises_a_transport_error_or_a_timeout(
    nursery: trio.Nursery,
) -> None:
    """httpx.TransportError went through a query, where sending wrapped it."""
    silent = await _fixed_server(nursery, None)
    async with AsyncClient(_dead_url()) as client:
        with pytest.raises(TransportError) as refused:
            await client.top()
    async with AsyncClient(silent, timeout=0.2) as client:
        with pytest.raises(Timeout) as waited:
            await client.aggregates("hung")
    assert type(refused.value) is TransportError  # a refused connection is no timeout
    assert isinstance(refused.value, ClientError)
    assert isinstance(refused.value.__cause__, httpx.ConnectError)
    assert (refused.value.status, refused.value.code, refused.value.details) == (
        0,
        "connection_error",
        [],
    )
    assert str(refused.value).startswith("connection_error: ConnectError: ")
    assert isinstance(waited.value, TransportError)
    assert isinstance(waited.value.__cause__, httpx.ReadTimeout)
    assert (waited.value.status, waited.value.code) == (0, "timeout")

    def sync() -> tuple[ClientError, ClientError]:
        with Client(_dead_url()) as client, pytest.raises(TransportError) as refused:
            client.keys()
        with Client(silent, timeout=0.2) as client, pytest.raises(Timeout) as waited:
            client.top(start=TS, end=TS + 3600)
        return refused.value, waited.value

    refused_sync, waited_sync = await trio.to_thread.run_sync(sync)
    assert type(refused_sync) is TransportError and type(waited_sync) is Timeout


async def test_an_answer_that_is_not_trioaggs_raises_a_server_error(
    nursery: trio.Nursery,
) -> None:
    """A proxy's page, another service on the port: msgspec's DecodeError went through."""
    page = await _fixed_server(nursery, _answer("200 OK", "text/html", b"<html>hi</html>"))
    proxy = await _fixed_server(nursery, _answer("502 Bad Gateway", "text/plain", b"no upstream"))
    async with AsyncClient(page) as client:
        with pytest.raises(ServerError) as foreign:
            await client.aggregates("elsewhere")
    async with AsyncClient(proxy) as client:
        with pytest.raises(ServerError) as failed:
            await client.keys()
    refused: list[Rejected] = []
    async with AsyncClient(page, gzip=False, on_error=refused.append) as client:
        await client.send("elsewhere")  # its answer crashed the client's sender
    assert (foreign.value.status, foreign.value.code) == (200, "invalid_answer")
    assert "not an answer of trioagg to GET /v1/aggregates" in foreign.value.message
    assert isinstance(foreign.value.__cause__, msgspec.DecodeError)
    (rejected,) = refused  # not retried: the same server would answer the same
    assert isinstance(rejected.error, ServerError) and rejected.error.code == "invalid_answer"
    assert "not an answer of trioagg to POST /v1/events" in rejected.error.message
    assert (client.counters.failed, client.counters.retried, client.counters.buffered) == (1, 0, 0)
    assert (failed.value.status, failed.value.code, failed.value.message) == (
        502,
        "http_error",
        "no upstream",
    )


async def test_sending_to_a_silent_server_gives_up_with_its_timeout(
    nursery: trio.Nursery,
) -> None:
    silent = await _fixed_server(nursery, None)
    refused: list[Rejected] = []
    client = AsyncClient(silent, timeout=0.1, retry_timeout=1, on_error=refused.append)
    async with client:
        await client.send("unheard", ts=TS)
    (rejected,) = refused
    assert type(rejected.error) is Timeout and rejected.error.code == "timeout"
    assert client.counters.failed == 1
    assert client.counters.retried >= 1  # each timeout was retried until retry_timeout ran out


def test_every_public_name_of_the_client_is_in_all() -> None:
    """As httpx's: the client's public surface changes only on purpose."""
    import trioagg.client
    import trioagg.client.clients as module

    ours = ("trioagg.client.clients", "trioagg.client.errors")
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) in ours
    }
    constants = {"DEFAULT_URL", "SERVER_MAX_BYTES", "SERVER_MAX_EVENTS", "Policy"}  # no __module__
    assert public == set(module.__all__) - constants
    assert all(hasattr(module, name) for name in module.__all__)
    # The package is the path users import from: it offers the same names.
    assert trioagg.client.__all__ == module.__all__
    assert all(getattr(trioagg.client, name) is getattr(module, name) for name in module.__all__)


def test_the_sync_client_takes_the_options_of_the_async_one() -> None:
    """``Client(url, **options: Any)`` left its callers without a type check."""
    options = typing.get_type_hints(AsyncClient.__init__)
    del options["url"], options["return"]
    assert typing.get_type_hints(ClientOptions) == options
    assert typing.get_type_hints(Client.__init__)["options"] == Unpack[ClientOptions]


async def test_the_sync_client_queries_with_every_parameter_of_the_async_one(
    server: Server,
) -> None:
    async with AsyncClient(server.url) as client:
        for i in range(6):
            tags = {"r": "eu" if i % 2 else "us"}
            await client.send(f"twin.{i % 3}", i, ts=TS + i * 3600, tags=tags, distinct_id=f"u{i}")
        await client.flush()
        grouped = await client.aggregates(
            ["twin.0", "twin.1"],
            start=TS,
            end=TS + 86400,
            granularity="day",
            tz="Europe/Paris",
            fill="zero",
            group_by="r",
            stats=("count", "sum", "distinct"),
        )
        filtered = await client.aggregates("twin.1", start=TS, end=TS + 86400, tags={"r": "eu"})
        top = await client.top(start=TS, end=TS + 86400, stat="sum", prefix="twin.", limit=2)
        keys = await client.keys("twin.", page=1)
    refused: list[Rejected] = []

    def sync() -> tuple[Aggregates, Aggregates, Top, list[KeyInfo], Counters]:
        with Client(
            server.url,
            flush_on_sigterm=False,
            api_key=None,
            batch_events=10,
            batch_bytes=4096,
            max_delay=0.05,
            buffer=100,
            policy="drop_oldest",
            wait=True,
            gzip=False,
            concurrency=1,
            retry_timeout=5,
            close_timeout=5,
            timeout=10,
            on_error=refused.append,
        ) as client:
            client.send("twin.refused\x01")
            client.flush()
            return (
                client.aggregates(
                    ["twin.0", "twin.1"],
                    start=TS,
                    end=TS + 86400,
                    granularity="day",
                    tz="Europe/Paris",
                    fill="zero",
                    group_by="r",
                    stats=("count", "sum", "distinct"),
                ),
                client.aggregates("twin.1", start=TS, end=TS + 86400, tags={"r": "eu"}),
                client.top(start=TS, end=TS + 86400, stat="sum", prefix="twin.", limit=2),
                client.keys("twin.", page=1),
                client.counters,
            )

    *answers, counters = await trio.to_thread.run_sync(sync)
    assert answers == [grouped, filtered, top, keys]
    assert [s.tags for s in grouped.results] == [{"r": "eu"}, {"r": "us"}] * 2
    assert grouped.tz == "Europe/Paris" and grouped.results[0].buckets[0].distinct is not None
    assert [r.key for r in top.results] == ["twin.2", "twin.1"] and len(keys) == 3
    assert (counters.failed, len(refused)) == (1, 1)  # on_error reached the async client


@pytest.mark.slow
def test_mypy_checks_the_sync_clients_callers(tmp_path: Path) -> None:
    """What a user's type checker says of wrong calls of the sync client: it said
    nothing when the client took ``**options: Any`` and ``**query: Any``."""
    program = tmp_path / "calls.py"
    program.write_text(
        "from trioagg.client import Client\n"
        "client = Client('http://127.0.0.1:8000', batch_events='many', bogus=1)\n"
        "client.aggregates('k', start=[1], granularity=None)\n"
        "client.top(limit='ten')\n"
        "client.keys(pages=2)\n"
        "reveal_type(client.aggregates('k').results[0].buckets)\n"
    )
    # The cache `just lint` keeps (.ci/run lints first): a cold run checks every module
    # trioagg.client imports, and what they import (~30 s here); a warm one ~2 s. The
    # cache keys each module by its source and the options, so calls.py, new each time,
    # is always checked afresh, and a changed client is checked again.
    cache = ["--cache-dir", str(Path(__file__).resolve().parent.parent / ".mypy_cache")]
    ran = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", *cache, "--no-error-summary", str(program)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Each error's line and code: mypy's wording is not this test's.
    said = re.findall(r"calls\.py:(\d+): error: .*\[([a-z-]+)\]$", ran.stdout, re.MULTILINE)
    assert said == [
        ("2", "call-arg"),  # bogus=
        ("2", "arg-type"),  # batch_events: a str
        ("3", "arg-type"),  # start: a list
        ("4", "arg-type"),  # limit: a str
        ("5", "call-arg"),  # pages=
    ], ran.stdout + ran.stderr
    assert 'calls.py:6: note: Revealed type is "list[trioagg.client.answers.Bucket]"' in ran.stdout


async def test_keys_follows_every_page(server: Server) -> None:
    async with AsyncClient(server.url) as client:
        for i in range(25):
            await client.send(f"page.{i:02d}", ts=TS)
        await client.flush()
        found = await client.keys("page.", page=10)
    assert [k.key for k in found] == [f"page.{i:02d}" for i in range(25)]


@pytest.mark.slow
def test_retries_through_a_server_restart_count_every_event_once(
    server_process: Any, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    # An idle keep-alive connection of the client holds a graceful stop for drain_timeout.
    first = server_process("--port", port, "--drain-timeout", "1").start()
    with Client(first.url, batch_events=100, max_delay=0.01, retry_timeout=60) as client:
        for i in range(500):
            client.send("restart", i, ts=TS)
        client.flush()
        assert first.stop() == 0
        for i in range(500):
            client.send("restart", i, ts=TS)
        second = server_process("--port", port)
        threading.Timer(0.5, second.start).start()  # the client retries meanwhile
        client.flush()
    assert (client.counters.acknowledged, client.counters.failed) == (1000, 0)
    assert client.counters.retried > 0
    assert stored_counts(tmp_path / "trioagg.db") == {"restart": 1000}
    second.stop()


async def test_the_async_client_runs_under_asyncio_too(server: Server) -> None:
    import asyncio

    async def under_asyncio() -> Any:
        async with AsyncClient(server.url, batch_events=100) as client:
            await asyncio.gather(*(client.send("aio", i, ts=TS) for i in range(300)))
            await client.flush()
            answer = await client.aggregates("aio", start=TS, end=TS + 3600, granularity="all")
        return client.counters, answer.results[0].buckets[0].count

    counters, count = await trio.to_thread.run_sync(asyncio.run, under_asyncio())
    assert (counters.acknowledged, count) == (300, 300)
    assert stored_counts(server.db) == {"aio": 300}
