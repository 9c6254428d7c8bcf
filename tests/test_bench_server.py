"""The bench's default deployment run for real: ``trioagg serve --workers 2`` started
the way the harness starts it (``bench.server``), over loopback, on a SQLite file.

The deployment's pure rules (commands, flags) are tested in ``test_bench.py``.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from bench import stalls, verify
from bench.runner import scrape_stalls
from bench.server import Deployment, Server, ServerError, command, http_get

#: One worker of two: it says it runs, and answers every request 200.
ONE_OF_TWO = """
import socket
listener = socket.create_server(("127.0.0.1", 0))
print(f"Running on http://127.0.0.1:{listener.getsockname()[1]} (1 of 2)", flush=True)
while True:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 0\\r\\n\\r\\n")
"""


@pytest.mark.slow
def test_a_server_has_started_only_once_every_worker_runs(tmp_path: Path) -> None:
    """Load must not start on one worker of two (nor RSS and CPU miss the other)."""
    server = Server("fake", [sys.executable, "-c", ONE_OF_TWO], {}, tmp_path / "a.log", workers=2)
    with pytest.raises(ServerError, match="did not start"):
        server.start(timeout=1.0)
    assert server.process is not None and server.process.poll() is not None
    alone = Server("fake", [sys.executable, "-c", ONE_OF_TWO], {}, tmp_path / "b.log", workers=1)
    alone.start()
    alone.kill()
    assert alone.port > 0


@pytest.mark.slow
def test_the_default_deployment_starts_every_worker_answers_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    deployment = Deployment()
    db = tmp_path / "trioagg.db"
    argv, env = command("trioagg", deployment, db)
    server = Server("trioagg", argv, env, tmp_path / "server.log", workers=deployment.workers)
    server.start()
    try:
        assert server.process is not None
        workers = psutil.Process(server.process.pid).children()
        # the supervisor and every worker it started count for CPU and RSS
        assert len(workers) >= 2
        assert {server.process.pid, *(worker.pid for worker in workers)} <= set(server.pids)
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/v1/events",
            data=b'{"key":"a","value":1}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.loads(answer.read())["accepted"] == 1
        status, _ = http_get("127.0.0.1", server.port, "/readyz")
        assert status == 200
        # each scrape reaches one worker; every worker's longest stall is read
        longest = stalls.longest(scrape_stalls(server, deployment.workers, tries=50), 2)
        assert longest is not None and longest["all_workers_seen"]
        assert len(longest["by_pid_ms"]) == 2
        assert set(longest["by_pid_ms"]) <= {str(worker.pid) for worker in workers}
        rss = server.peak_rss_bytes()
        assert rss["sum"] > rss["max"] > 0
    finally:
        exit_code = server.stop()
    assert exit_code == 0
    assert verify.store_totals(db)[0] == 1
