"""``trioagg serve --workers N``: real worker processes under a real supervisor."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from trioagg.server.supervisor import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    STABLE_SECONDS,
    START_ATTEMPTS,
    Restarts,
)

from .conftest import stored_counts


def test_a_worker_that_served_long_is_replaced_at_once() -> None:
    restarts = Restarts()
    assert restarts.died(lived=STABLE_SECONDS, served=True) == 0
    assert not restarts.gave_up


def test_deaths_soon_after_start_back_off_doubling_up_to_the_most() -> None:
    restarts = Restarts()
    delays = [restarts.died(lived=1, served=True) for _ in range(10)]
    assert delays[:4] == [FIRST_BACKOFF, FIRST_BACKOFF * 2, FIRST_BACKOFF * 4, FIRST_BACKOFF * 8]
    assert delays[-1] == MAX_BACKOFF and max(delays) == MAX_BACKOFF
    assert not restarts.gave_up  # it served each time: a crash loop, not a failed start
    assert restarts.died(lived=STABLE_SECONDS + 1, served=True) == 0  # stable again


def test_failed_starts_in_a_row_give_up_and_a_served_one_resets_them() -> None:
    restarts = Restarts()
    for _ in range(START_ATTEMPTS - 1):
        restarts.died(lived=0.1, served=False)
    assert not restarts.gave_up
    restarts.died(lived=30, served=True)
    for _ in range(START_ATTEMPTS - 1):
        restarts.died(lived=0.1, served=False)
    assert not restarts.gave_up
    restarts.died(lived=0.1, served=False)
    assert restarts.gave_up


def _serving_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\) is serving", output)]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie: ended, not reaped yet


def _wait(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_sigterm_drains_them_all(
    server_process: Any, tmp_path: Path
) -> None:
    server = server_process("--workers", "2", env={"TMPDIR": str(tmp_path)})
    server.start()
    server.wait_for("is serving", count=2)
    (metrics_folder,) = tmp_path.glob("trioagg-metrics-*")
    first, second = _serving_pids(server.output)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v1/events", json={"key": "before"}).status_code == 200
        os.kill(first, signal.SIGKILL)
        server.wait_for("is serving", count=3)
        assert f"(pid {first}) was killed by SIGKILL" in server.output
        replacement = _serving_pids(server.output)[-1]
        assert replacement not in (first, second)
        for _ in range(20):  # new connections reach either worker
            with httpx.Client(base_url=server.url, timeout=30) as fresh:
                assert fresh.post("/v1/events", json={"key": "after"}).status_code == 200
        scrape = client.get("/metrics").text
    assert "trioagg_worker_restarts_total 1.0" in scrape
    assert "trioagg_events_committed_total 21.0" in scrape  # every worker's, the dead one's too
    assert server.stop() == 0, server.output
    assert _gone(replacement) and _gone(second)
    assert server.output.count("trioagg stopped:") == 2  # the killed worker never said it
    assert stored_counts(server.db) == {"before": 1, "after": 20}
    assert not metrics_folder.exists()


@pytest.mark.slow
def test_workers_stop_when_their_supervisor_is_killed(server_process: Any, tmp_path: Path) -> None:
    """And the metrics folder a killed supervisor leaves is removed by the next one."""
    env = {"TMPDIR": str(tmp_path)}
    server = server_process("--workers", "2", env=env).start()
    server.wait_for("is serving", count=2)
    workers = _serving_pids(server.output)
    (left,) = tmp_path.glob("trioagg-metrics-*")
    server.proc.kill()
    server.proc.wait()  # reaped, as its own supervisor (systemd) would
    _wait(lambda: all(_gone(pid) for pid in workers))
    assert server.output.count("is gone: stopping") == 2
    assert server.output.count("trioagg stopped:") == 2
    assert left.exists()
    next_one = server_process("--workers", "2", env=env).start()
    assert not left.exists()
    assert next_one.stop() == 0


def test_an_unopenable_store_is_one_line_and_exit_2(server_process: Any, tmp_path: Path) -> None:
    server = server_process("--workers", "2", db=tmp_path / "missing" / "trioagg.db")
    server.start()  # returns when it exits: it never listens
    assert server.wait() == 2
    (line,) = server.output.strip().splitlines()
    assert "trioagg cannot start" in line and "missing" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_and_exit_2(
    server_process: Any, tmp_path: Path, workers: str
) -> None:
    """Before, `serve` started the service, then ~50 lines of nested ExceptionGroup
    ending in OSError: [Errno 98], exit 1 (issue 21, item 4)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        server = server_process("--workers", workers)
        server.args[server.args.index("--port") + 1] = port
        server.start()
        assert server.wait() == 2
    (line,) = server.output.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
    assert not (tmp_path / "trioagg.db").exists()  # nothing made before it knew


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "signum"),
    [("loading", signal.SIGTERM), ("serving", signal.SIGTERM), ("serving", signal.SIGINT)],
)
def test_a_stop_signal_to_the_whole_group_stops_every_worker_cleanly(
    tmp_path: Path, when: str, signum: signal.Signals
) -> None:
    """Ctrl-C in a terminal, `timeout` or `kill -- -PGID` signal every process of the
    group: the workers too, while they load or as they serve. Before, workers died of
    the supervisor's SIGTERM (their own stop signal came first) and it exited 1."""
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "trioagg", "serve", "--workers", "2", "--port", "0"]
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*command, "--db", str(tmp_path / "trioagg.db")],
            stderr=sink,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        text = "worker 1 started" if when == "loading" else "is serving"
        count = 1 if when == "loading" else 2
        _wait(lambda: log.read_text().count(text) >= count or proc.poll() is not None, 60)
        os.killpg(proc.pid, signum)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert "Traceback" not in output and "ERROR" not in output, output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_certificate_that_cannot_be_loaded_is_one_line_and_exit_2(
    server_process: Any, tmp_path: Path, workers: str
) -> None:
    """Before: a traceback from the worker's TLS set-up (and, with workers, a restart
    loop of workers that could never serve)."""
    missing = tmp_path / "missing.pem"
    server = server_process(
        "--workers", workers, "--certfile", str(missing), "--keyfile", str(missing)
    ).start()
    assert server.wait() == 2
    (line,) = server.output.strip().splitlines()
    assert f"cannot use the certificate {missing}" in line


@pytest.mark.slow
def test_a_replacement_that_cannot_open_the_store_never_serves_and_is_retried(
    server_process: Any, tmp_path: Path
) -> None:
    """Found by attack: a replacement whose store had gone reported itself serving (and
    listened) before its start-up failure ended it. And found in review: a replacement's
    exit 2 stopped the whole service, where a store gone for a while (a PostgreSQL
    restart) should be waited for. Now it never serves and is retried with a back-off,
    while the other worker goes on; once the store is back, a replacement serves."""
    folder = tmp_path / "store"
    folder.mkdir()
    server = server_process("--workers", "2", db=folder / "trioagg.db").start()
    server.wait_for("is serving", count=2)
    first = _serving_pids(server.output)[0]
    folder.rename(tmp_path / "away")
    os.kill(first, signal.SIGKILL)
    server.wait_for("exited with code 2", count=2)  # two replacements failed, and retried
    assert len(_serving_pids(server.output)) == 2  # neither of them said it serves
    assert server.proc.poll() is None  # the supervisor and the other worker go on
    (tmp_path / "away").rename(folder)
    server.wait_for("is serving", count=3)
    assert server.stop() == 0, server.output
