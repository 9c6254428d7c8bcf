"""Fixtures: real trioagg servers (hypercorn on loopback) over real SQLite files.

``start_server`` runs the app in this process on hypercorn's trio worker, as
``trioagg serve`` does, and stops it gracefully after the test.
``ServerProcess`` runs ``python -m trioagg serve`` as a child process, for
tests of signals, crashes and restarts.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioagg.app import TrioaggApp, create_app
from trioagg.cli import run_server
from trioagg.settings import Settings


@dataclass
class Server:
    """A running in-process server and a client pointed at it."""

    url: str
    app: TrioaggApp
    client: httpx.AsyncClient
    stop: trio.Event
    stopped: trio.Event

    @property
    def db(self) -> Path:
        return Path(self.app.settings.db)

    async def shutdown(self) -> None:
        """Graceful shutdown, as SIGTERM would do it."""
        self.stop.set()
        await self.stopped.wait()


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    """Start servers with settings given as flag text: ``await start_server(bucket="5m")``."""
    servers: list[Server] = []

    async def start(**settings: str) -> Server:
        values = {"db": str(tmp_path / "trioagg.db"), "port": "0", "log_level": "warning"}
        values.update(settings)
        app = create_app(Settings.from_text(values))
        stop, stopped = trio.Event(), trio.Event()

        async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await run_server(app, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        (url,) = await nursery.start(serve)
        client = httpx.AsyncClient(base_url=url, timeout=30)
        server = Server(url, app, client, stop, stopped)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.client.aclose()
        await server.shutdown()


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    """A server with default settings on a fresh store."""
    return await start_server()


def post(client: httpx.AsyncClient, body: Any, **params: str) -> Awaitable[httpx.Response]:
    """POST /v1/events with a JSON body."""
    return client.post("/v1/events", json=body, params=params)


def stored_counts(db: Path) -> dict[str, int]:
    """Events stored per key, read straight from the SQLite file."""
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT key, sum(count) FROM rollups GROUP BY key").fetchall())


class ServerProcess:
    """``python -m trioagg serve`` in a child process, on a free port."""

    def __init__(self, db: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.db = db
        self.args = ["--db", str(db), "--port", "0", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log: list[str] = []

    def start(self, command: list[str] | None = None) -> ServerProcess:
        """Start and wait until it listens (or exits)."""
        command = command or [sys.executable, "-m", "trioagg", "serve", *self.args]
        self.proc = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"Running on (http://[\d.]+:\d+)", line)
            if match:
                self.url = match[1]
                break
        else:
            self.proc.wait()
        return self

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the exit; the rest of stderr goes to ``log``."""
        assert self.proc is not None and self.proc.stderr is not None
        self.proc.wait(timeout)  # the log is small: the pipe never fills
        self.log.append(self.proc.stderr.read())
        self.proc.stderr.close()
        return self.proc.returncode

    def stop(self) -> int:
        self.send_signal(signal.SIGTERM)
        return self.wait()

    @property
    def output(self) -> str:
        return "".join(self.log)


@pytest.fixture
def server_process(tmp_path: Path) -> Any:
    """A factory of child-process servers, all killed after the test."""
    started: list[ServerProcess] = []

    def make(
        *args: str, db: Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        process = ServerProcess(db or tmp_path / "trioagg.db", *args, env=env)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
        if process.proc is not None and process.proc.stderr is not None:
            process.proc.stderr.close()


@pytest.fixture
def hold_write_lock() -> Any:
    """Hold SQLite's write lock on a store from another connection, so commits wait."""

    class Lock:
        def __init__(self) -> None:
            self.conn: sqlite3.Connection | None = None

        def acquire(self, db: Path) -> None:
            self.conn = sqlite3.connect(db, isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")

        def release(self) -> None:
            if self.conn is not None:
                self.conn.execute("ROLLBACK")
                self.conn.close()
                self.conn = None

    lock = Lock()
    yield lock
    lock.release()
