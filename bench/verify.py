"""Checking what a measurement claims against what the server stored.

Every measurement against a store ends with the server stopped (SIGTERM, exit
0) and the store opened read-only: ``SELECT sum(count) FROM rollups`` must equal
the events the load generator saw acknowledged (200 or 202, counted from the
``accepted`` of each answer). A mismatch either way fails the run: fewer means
acknowledged events were lost, more means events were stored but not
acknowledged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def store_files(db: Path) -> list[Path]:
    """The SQLite files of the store whose main file is ``db``: it and its shard files
    (``<db>-shard1`` ..., made by ``--writers N``), not their WAL files."""
    shards = [found for found in db.parent.glob(f"{db.name}-shard*") if found.name[-1].isdigit()]
    return [db, *sorted(shards)]


def remove_store(db: Path) -> None:
    """Delete the store at ``db``: every file of it, with its WAL and shared memory."""
    for path in store_files(db):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def store_totals(db: Path) -> tuple[int, int]:
    """(events, rows) of a store: ``sum(count)`` and ``count(*)`` of its rollups, over
    its shard files too."""
    events = rows = 0
    for path in store_files(db):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT coalesce(sum(count), 0), count(*) FROM rollups").fetchone()
        finally:
            conn.close()
        events, rows = events + int(found[0]), rows + int(found[1])
    return events, rows


def acknowledged(loadgen_result: Mapping[str, Any]) -> dict[str, int]:
    """Totals over every phase, stream and class of a load generator result."""
    totals = {
        "sent_events": 0,
        "acked_events": 0,
        "duplicate_events": 0,
        "unknown_events": 0,
        "errors": 0,
        "accepted_mismatches": 0,
    }
    for phase in loadgen_result["phases"]:
        for stream in phase["streams"].values():
            for cls in stream["classes"].values():
                for name in totals:
                    totals[name] += int(cls.get(name, 0))
    return totals


def unexpected_statuses(
    loadgen_result: Mapping[str, Any], allowed: frozenset[int] = frozenset()
) -> dict[str, int]:
    """Counts of answers that are neither 2xx nor in ``allowed`` (e.g. 503 under overload)."""
    found: dict[str, int] = {}
    for phase in loadgen_result["phases"]:
        for stream in phase["streams"].values():
            for cls in stream["classes"].values():
                for status, count in cls["statuses"].items():
                    if not 200 <= int(status) < 300 and int(status) not in allowed:
                        found[status] = found.get(status, 0) + count
    return found


def verdict(
    *,
    acked: int,
    stored: int | None,
    duplicates: int = 0,
    exit_code: int | None,
    errors: int = 0,
    unexpected: Mapping[str, int] | None = None,
    timed_out: bool = False,
) -> dict[str, Any]:
    """Whether a measurement holds up; ``stored`` is None for apps that store nothing.
    ``duplicates`` are acknowledged events the server said it had already stored."""
    problems = []
    expected = acked - duplicates
    if stored is not None and stored != expected:
        lost = expected - stored
        what = f"{lost} acknowledged events lost" if lost > 0 else f"{-lost} unacknowledged stored"
        dup = f" ({duplicates} of them duplicates)" if duplicates else ""
        problems.append(f"store has {stored} events, {acked} acknowledged{dup}: {what}")
    if exit_code != 0:
        problems.append(f"server exit code {exit_code} after SIGTERM (expected 0)")
    if errors:
        problems.append(f"{errors} requests failed at the connection level")
    if unexpected:
        listed = ", ".join(f"{n} x {status}" for status, n in sorted(unexpected.items()))
        problems.append(f"unexpected answers: {listed}")
    if timed_out:
        problems.append("the load generator hit its time limit")
    return {
        "ok": not problems,
        "acked_events": acked,
        "duplicate_events": duplicates,
        "stored_events": stored,
        "exit_code": exit_code,
        "problems": problems,
    }
