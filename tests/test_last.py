"""``last``, the latest event's value, end to end: over HTTP into a real server on
SQLite and PostgreSQL, events sent out of order in separate requests, flushed and not,
and on a store made before its columns existed."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

import httpx
import trio
from click.testing import CliRunner

from trioagg.cli import main
from trioagg.client import AsyncClient

from .conftest import StartServer, post

HOUR = 3600
T0 = 1_790_000_000 // HOUR * HOUR - 30 * 86400  # a recent hour, inside the default window


async def lasts(client: httpx.AsyncClient, granularity: str, **params: Any) -> list[Any]:
    answer = await client.get(
        "/v1/aggregates",
        params={
            "key": "seats",
            "from": T0,
            "to": T0 + 3 * HOUR,
            "granularity": granularity,
            "stats": "count,last",
            **params,
        },
    )
    assert answer.status_code == 200, answer.text
    return [
        (result["tags"], [(b["count"], b["last"]) for b in result["buckets"]])
        for result in answer.json()["results"]
    ]


async def test_last_is_the_latest_event_whatever_order_requests_arrive_in(
    start_server: StartServer,
) -> None:
    server = await start_server(max_age="none", flush_window="0")
    sent = [  # (seconds into the range, value, plan): sent in this order
        (HOUR + 50, 12.0, "pro"),
        (10, 3.0, "free"),
        (HOUR + 80, 11.0, "pro"),  # the latest of hour 1
        (HOUR + 20, 30.0, "free"),
        (5, 8.0, "pro"),
        (10, 4.0, "pro"),  # a tie at +10 s: the larger value, 4.0, is the last of hour 0
    ]
    for offset, value, plan in sent:
        response = await post(
            server.client,
            {"key": "seats", "ts": T0 + offset, "value": value, "tags": {"plan": plan}},
        )
        assert response.status_code == 200, response.text
    assert await lasts(server.client, "hour") == [({}, [(3, 4.0), (3, 11.0)])]
    assert await lasts(server.client, "all") == [({}, [(6, 11.0)])]
    assert await lasts(server.client, "hour", group_by="plan") == [
        ({"plan": "free"}, [(1, 3.0), (1, 30.0)]),
        ({"plan": "pro"}, [(2, 4.0), (2, 11.0)]),
    ]
    # an earlier event arriving late changes nothing; a later one does
    for offset, value in ((HOUR + 79, 99.0), (HOUR + 81, 7.0)):
        await post(server.client, {"key": "seats", "ts": T0 + offset, "value": value})
    assert await lasts(server.client, "all") == [({}, [(8, 7.0)])]


def drop_last_columns(db: str) -> None:
    """Make a store look as trioagg made it before ``last``: no columns for it."""
    statements = [
        f"ALTER TABLE {table} DROP COLUMN {column}"
        for table in ("rollups", "refused_rollups")
        for column in ("last_value", "last_ts")
    ]
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
        return
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for statement in statements:
            conn.execute(statement)


async def test_a_store_made_before_last_answers_null_for_its_old_buckets(
    start_server: StartServer,
) -> None:
    old = await start_server(max_age="none", flush_window="0")
    await post(old.client, {"key": "seats", "ts": T0 + 100, "value": 5.0})
    await old.client.aclose()
    await old.shutdown()
    await old.stopped.wait()
    drop_last_columns(old.db)

    server = await start_server(max_age="none", flush_window="0")
    await post(server.client, {"key": "seats", "ts": T0 + 200, "value": 6.0})  # the old bucket
    await post(server.client, {"key": "seats", "ts": T0 + HOUR, "value": 2.0})
    # the old event's time is unknown: 6.0 may not be its bucket's last
    assert await lasts(server.client, "hour") == [({}, [(2, None), (1, 2.0)])]
    assert await lasts(server.client, "all") == [({}, [(3, 2.0)])]


async def test_the_client_and_the_cli_ask_for_last(start_server: StartServer) -> None:
    server = await start_server(max_age="none")
    for offset, value in ((20, 5.0), (10, 9.0)):  # the later event comes first
        await post(server.client, {"key": "seats", "ts": T0 + offset, "value": value})
    async with AsyncClient(server.url) as client:
        answer = await client.aggregates(
            "seats", start=T0, end=T0 + HOUR, granularity="all", stats="count,last"
        )
    assert [(b.count, b.last) for b in answer.results[0].buckets] == [(2, 5.0)]
    args = ["query", "seats", "--from", str(T0), "--to", str(T0 + HOUR), "--granularity", "all"]
    printed = await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(
            main, [*args, "--stats", "last", "--format", "csv", "--url", server.url]
        )
    )
    assert printed.exit_code == 0, printed.output
    assert printed.output.splitlines()[-1].endswith(",5.0")
