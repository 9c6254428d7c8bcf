"""The apps trioagg is measured against, on the same stack (Quart-Trio on hypercorn's trio worker).

* **ceiling**: ``POST /v1/events`` reads the body, decodes it with msgspec and answers
  ``{"accepted": N}`` without storing anything; ``GET /v1/aggregates`` answers a
  document of the same shape and size as trioagg's answer for one key's day of
  hourly buckets, without reading anything. trioagg / ceiling is what the
  ingest and query paths cost on top of HTTP.
* **naive**: the design trioagg replaces. Each event of a request is its own
  transaction (one UPSERT, one COMMIT) on one SQLite connection, run with
  ``trio.to_thread``, before the answer: no channel, no batching. Validation is
  trioagg's own, so the difference is the write path. trioagg / naive is what
  the writer design buys.

Run one: ``python -m bench.baselines ceiling|naive --db PATH --port 0 [--sync full]``
(hypercorn.trio.serve in this process, SIGTERM drains), or with hypercorn's CLI, as
the harness does for several workers (they have no supervisor like ``trioagg serve``):
``BENCH_DB=PATH hypercorn --worker-class trio --workers 2 'bench.baselines:naive_app()'``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import time
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from trioagg.ingest.decode import Limits, decode_events

MAX_BODY = 10 * 1024 * 1024
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonlines"}
_ANY_JSON = msgspec.json.Decoder()

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollups (
    key TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    tags TEXT NOT NULL,
    count INTEGER NOT NULL,
    shift REAL NOT NULL,
    s1 REAL NOT NULL,
    s2 REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    PRIMARY KEY (key, bucket, tags)
) WITHOUT ROWID
"""

# One event: count 1, shift = value, s1 = s2 = 0; merged with the shifted-moment algebra.
UPSERT = """
INSERT INTO rollups (key, bucket, tags, count, shift, s1, s2, min, max)
VALUES (?, ?, ?, 1, ?, 0.0, 0.0, ?, ?)
ON CONFLICT (key, bucket, tags) DO UPDATE SET
    s2 = s2 + excluded.count * (excluded.shift - shift) * (excluded.shift - shift),
    s1 = s1 + excluded.count * (excluded.shift - shift),
    count = count + excluded.count,
    min = min(min, excluded.min),
    max = max(max, excluded.max)
"""

BUCKET = 3600


def _json(document: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(document), status, content_type="application/json")


def _is_durable() -> bool:
    return request.args.get("wait", "true").lower() not in ("false", "0", "no")


def fake_answer(key: str, start: int, end: int, granularity: str = "hour") -> dict[str, Any]:
    """A document shaped like trioagg's answer for ``key`` with full hourly buckets."""
    buckets = []
    for number, bucket in enumerate(range(start, end, BUCKET)):
        count = 40 + number % 7
        total = count * 50.125 + number
        buckets.append(
            {
                "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bucket)),
                "count": count,
                "sum": total,
                "min": 0.731 + number / 100,
                "max": 99.417 - number / 100,
                "avg": total / count,
            }
        )
    return {
        "from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end)),
        "granularity": granularity,
        "tz": "UTC",
        "results": [{"key": key, "tags": {}, "buckets": buckets}],
    }


def _range() -> tuple[int, int]:
    end = int(float(request.args.get("to", time.time())) // BUCKET * BUCKET)
    start = int(float(request.args.get("from", end - 86400)) // BUCKET * BUCKET)
    return start, end


def ceiling_app() -> QuartTrio:
    """Parse and answer; store nothing."""
    app = QuartTrio("bench-ceiling")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.post("/v1/events")
    async def post_events() -> Response:
        body = await request.get_data(False, False, False)
        if request.mimetype in _NDJSON_TYPES:
            count = len(_ANY_JSON.decode_lines(body))
        else:
            decoded = _ANY_JSON.decode(body)
            count = len(decoded) if isinstance(decoded, list) else 1
        if _is_durable():
            return _json({"accepted": count, "duplicates": 0})
        return _json({"accepted": count}, 202)

    @app.get("/v1/aggregates")
    async def aggregates() -> Response:
        start, end = _range()
        key = request.args.get("key", "")
        return _json(fake_answer(key, start, end, request.args.get("granularity", "hour")))

    @app.get("/readyz")
    async def readyz() -> Response:
        return _json({"status": "ready"})

    return app


def naive_app(db: str | None = None, sync: str | None = None) -> QuartTrio:
    """One transaction per event, committed before the answer."""
    db = db or os.environ.get("BENCH_DB", "naive.db")
    sync = (sync or os.environ.get("BENCH_SYNC", "full")).upper()
    app = QuartTrio("bench-naive")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    limits = Limits(max_batch=10000, max_future=3600.0, max_age=None)
    state: dict[str, Any] = {}

    @app.before_serving
    async def open_db() -> None:
        def connect() -> tuple[sqlite3.Connection, sqlite3.Connection]:
            writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=10)
            writer.execute("PRAGMA journal_mode=WAL")
            writer.execute(f"PRAGMA synchronous={sync}")
            writer.execute(SCHEMA)
            reader = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=10)
            return writer, reader

        state["writer"], state["reader"] = await trio.to_thread.run_sync(connect)
        state["write_lock"] = trio.CapacityLimiter(1)
        state["read_lock"] = trio.CapacityLimiter(1)

    @app.after_serving
    async def close_db() -> None:
        state["writer"].close()
        state["reader"].close()

    def commit_one(key: str, ts: float, value: float, tags: str) -> None:
        conn = state["writer"]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(UPSERT, (key, int(ts // BUCKET) * BUCKET, tags, value, value, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @app.post("/v1/events")
    async def post_events() -> Response:
        body = await request.get_data(False, False, False)
        points = decode_events(
            body, ndjson=request.mimetype in _NDJSON_TYPES, limits=limits, now=time.time()
        )
        for point in points:
            key, ts, value, tags = point[:4]
            await trio.to_thread.run_sync(
                commit_one, key, ts, value, tags, limiter=state["write_lock"]
            )
        return _json({"accepted": len(points), "duplicates": 0})

    def fetch(key: str, start: int, end: int) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = (
            state["reader"]
            .execute(
                "SELECT bucket, sum(count), sum(count * shift + s1), min(min), max(max) "
                "FROM rollups WHERE key = ? AND bucket >= ? AND bucket < ? GROUP BY bucket",
                (key, start, end),
            )
            .fetchall()
        )
        return rows

    @app.get("/v1/aggregates")
    async def aggregates() -> Response:
        start, end = _range()
        key = request.args.get("key", "")
        rows = await trio.to_thread.run_sync(fetch, key, start, end, limiter=state["read_lock"])
        buckets = [
            {
                "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bucket)),
                "count": count,
                "sum": total,
                "min": low,
                "max": high,
                "avg": total / count,
            }
            for bucket, count, total, low, high in rows
        ]
        return _json(
            {
                "from": start,
                "to": end,
                "granularity": "hour",
                "tz": "UTC",
                "results": [{"key": key, "tags": {}, "buckets": buckets}],
            }
        )

    @app.get("/readyz")
    async def readyz() -> Response:
        return _json({"status": "ready"})

    return app


async def _serve(app: QuartTrio, host: str, port: int, keep_alive: float | None) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    if keep_alive is not None:
        config.keep_alive_timeout = keep_alive
    config.accesslog = None
    config.errorlog = "-"
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def until_signal() -> None:
            async for _ in signals:
                return

        await serve(app, config, shutdown_trigger=until_signal)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__)
    parser.add_argument("app", choices=["ceiling", "naive"])
    parser.add_argument("--db", default="naive.db", help="SQLite file of the naive app")
    parser.add_argument("--sync", default="full", choices=["full", "normal"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--keep-alive", type=float, default=None, help="idle keep-alive seconds (hypercorn's: 5)"
    )
    args = parser.parse_args(argv)
    app = ceiling_app() if args.app == "ceiling" else naive_app(args.db, args.sync)
    trio.run(_serve, app, args.host, args.port, args.keep_alive)


if __name__ == "__main__":
    main()
