"""Fault injection on the journal: processes killed (SIGKILL) while their heads hold
batches that are journalled but not flushed, alone or beside another process sharing the
store. Each scenario runs real ``trioagg serve`` processes over real files (SQLite) or
a real PostgreSQL, kills one at a moment it has journal rows (checked, so that every
test exercises a replay), and ends by checking the store against what clients were
told: every acknowledged event stored once, the journal empty, no dead owner's lease
left. The faults of a flush itself (disk full, a locked database, a PostgreSQL restart)
are in test_faults_store.py and test_faults_postgres.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import (
    Ledger,
    assert_store_holds,
    durable_load,
    process_metric,
    resend_unacknowledged,
    sql,
    stored_counts,
)
from .test_supervisor import _gone, _serving_pids

pytestmark = [
    pytest.mark.slow,
    # Requests cut off by the kill leave httpx's body iterators unfinished.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

#: Long enough that no window ends before the kill: the head and the journal are full.
WINDOW = "5s"
REPLAYED = "trioagg_journal_replayed_events_total"


def journal(db: str | Path) -> dict[str, tuple[int, int]]:
    """Rows and events of the journal, per owner."""
    query = "SELECT owner, count(*), sum(events) FROM journal GROUP BY owner"
    return {owner: (int(rows), int(events)) for owner, rows, events in sql(db, query)}


def lease_files(db: str | Path) -> list[str]:
    """The lease files of a SQLite store's journal owners."""
    folder = Path(f"{db}-owners")
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def lease_owner(pid: int) -> str:
    """The journal owner whose lease (a lock file it holds open) process ``pid`` holds."""
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(descriptor)
        except OSError:
            continue  # closed meanwhile
        if target.endswith(".lock") and "-owners/" in target:
            process, _, shard = Path(target).stem.rpartition("-")
            return f"{process}/{shard}"
    raise AssertionError(f"process {pid} holds no journal lease")


async def polled(predicate: Any, timeout: float) -> None:
    """Until ``predicate`` holds, asked in a thread every 50 ms (it reads the store: on
    the event loop, it would hold up the clients of the load meanwhile)."""
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(0.05)


async def acknowledged_at_least(ledger: Ledger, requests: int) -> None:
    with trio.fail_after(30):  # a busy machine takes longer
        while len(ledger.acknowledged) < requests:
            await trio.sleep(0.02)


async def test_kill_9_with_a_full_head_then_a_restart_stores_each_acknowledged_event_once(
    server_process: Any,
) -> None:
    # Clients with ids, and clients without: a request of theirs may not be sent again.
    ledgers = {"ids": Ledger(size=10), "plain": Ledger(size=10, ids=False)}
    server = server_process("--flush-window", WINDOW).start()
    async with trio.open_nursery() as nursery:
        for key, ledger in ledgers.items():
            nursery.start_soon(durable_load, server.url, ledger, 4, 30, key)
        for ledger in ledgers.values():
            await acknowledged_at_least(ledger, 25)
        server.send_signal(signal.SIGKILL)
    server.wait()

    at_kill = stored_counts(server.db)
    (dead,) = journal(server.db).values()
    assert dead[0] > 0, "the kill must find batches journalled and not flushed"
    for ledger in ledgers.values():
        acknowledged = ledger.counts(ledger.acknowledged)
        in_flight = ledger.counts(ledger.unacknowledged())  # one request per client at most
        for key in acknowledged.keys() | in_flight.keys():
            # Lost: none. Counted beyond the 200s: only requests cut off by the kill.
            low = acknowledged.get(key, 0)
            assert low <= at_kill.get(key, 0) <= low + in_flight.get(key, 0), key
    assert set(at_kill) <= {key for ledger in ledgers.values() for key in ledger.expected()}

    restarted = server_process(db=server.db).start()  # it replays before it listens
    assert journal(server.db) == {}
    assert stored_counts(server.db) == at_kill, "the replay stored each journal row once"
    assert process_metric(restarted.url, REPLAYED) == dead[1]
    assert len(lease_files(server.db)) == 1, "the dead owner's lease went with its journal"
    # Every request with ids the kill cut off is sent again: then exactly what was sent.
    await resend_unacknowledged(restarted.url, ledgers["ids"])
    assert restarted.stop() == 0, restarted.output
    assert journal(server.db) == {}
    assert lease_files(server.db) == []
    plain = {key: count for key, count in at_kill.items() if key.startswith("plain")}
    assert_store_holds(server.db, ledgers["ids"].expected() | plain)


async def test_a_killed_worker_s_journal_is_replayed_once_by_the_other_or_its_replacement(
    server_process: Any, tmp_path: Path
) -> None:
    server = server_process(
        "--workers", "2", "--flush-window", WINDOW, env={"TMPDIR": str(tmp_path)}
    ).start()
    server.wait_for("is serving", count=2)
    owners = {pid: lease_owner(pid) for pid in _serving_pids(server.output)}
    ledger = Ledger(size=10)
    async with trio.open_nursery() as nursery:
        # Eight connections: the kernel hands them to either worker.
        nursery.start_soon(durable_load, server.url, ledger, 8, 30)
        await acknowledged_at_least(ledger, 50)
        victim = next(pid for pid, owner in owners.items() if owner in journal(server.db))
        os.kill(victim, signal.SIGKILL)
        await polled(lambda: _gone(victim), 10)
        dead_owner = owners[victim]
        dead_rows, dead_events = journal(server.db)[dead_owner]
        assert dead_rows > 0, "the kill must find batches journalled and not flushed"
        await trio.sleep(0.3)  # the other worker's clients go on meanwhile
        nursery.cancel_scope.cancel()

    # The other worker replays it within REPLAY_EVERY, or the replacement at its start;
    # then the dead owner's lease goes too.
    dead_lease = dead_owner.replace("/", "-") + ".lock"

    def replayed() -> bool:
        return dead_owner not in journal(server.db) and dead_lease not in lease_files(server.db)

    await polled(replayed, 10)
    await polled(lambda: process_metric(server.url, REPLAYED) >= dead_events, 5)
    await resend_unacknowledged(server.url, ledger)
    assert process_metric(server.url, REPLAYED) == dead_events, "replayed once, by one process"
    assert server.stop() == 0, server.output
    assert journal(server.db) == {}
    assert lease_files(server.db) == []
    assert_store_holds(server.db, ledger.expected())


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_serve_killed_on_a_shared_postgresql_is_replayed_once_by_the_other(
    server_process: Any, db_url: str
) -> None:
    ledger = Ledger(size=10)
    first = server_process("--flush-window", WINDOW, db=db_url).start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(durable_load, first.url, ledger, 4, 30)
        await acknowledged_at_least(ledger, 20)
        (first_owner,) = journal(db_url)
        # The second looks for dead owners' journals as it starts: the first's is not one.
        second = server_process("--flush-window", WINDOW, db=db_url)
        await trio.to_thread.run_sync(second.start)
        assert process_metric(second.url, REPLAYED) == 0, "it replayed a live process's journal"
        nursery.start_soon(durable_load, second.url, ledger, 4, 30)
        await acknowledged_at_least(ledger, len(ledger.acknowledged) + 20)
        first.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(first.wait)
        dead_rows, dead_events = journal(db_url)[first_owner]
        assert dead_rows > 0, "the kill must find batches journalled and not flushed"

        # The second's next look, REPLAY_EVERY (5 s) after its start, replays it.
        await polled(lambda: first_owner not in journal(db_url), 10)
        nursery.cancel_scope.cancel()
    await polled(lambda: process_metric(second.url, REPLAYED) >= dead_events, 5)
    await resend_unacknowledged(second.url, ledger)
    assert process_metric(second.url, REPLAYED) == dead_events, "replayed once"
    assert second.stop() == 0, second.output
    assert journal(db_url) == {}
    assert_store_holds(db_url, ledger.expected())
