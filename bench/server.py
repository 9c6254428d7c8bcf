"""Starting, watching and stopping one server process for one measurement.

A server is trioagg or a baseline app (``bench.baselines``), deployed as
:class:`Deployment` says: by default trioagg's recommended deployment,
``trioagg serve --workers 2`` (a supervisor and one worker process per core of
a 2-core machine), or every app under hypercorn's CLI (``--worker-class trio``,
``--workers N``). It always binds 127.0.0.1 on a free port, logs to a file in
the work directory, and is stopped with SIGTERM, which must end it with exit
code 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import godesign
from .loadgen import parse_head

APPS = ("trioagg", "ceiling", "naive", godesign.APP)
DEPLOYS = ("serve", "hypercorn")
#: What ``just bench`` measures unless told otherwise: trioagg's recommended
#: deployment (docs/deploying.md), one worker process per core of a 2-core machine.
DEFAULT_DEPLOY = "serve"
DEFAULT_WORKERS = 2
_RUNNING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
_ROOT = Path(__file__).resolve().parent.parent


class ServerError(RuntimeError):
    """The server did not start, did not answer, or did not stop cleanly."""


@dataclass(frozen=True)
class Deployment:
    """How every server of a run is deployed, and the flags passed through to it.

    ``serve``: trioagg as ``trioagg serve --workers N``. The Quart baselines have no
    supervisor of their own: with one worker they run in one process on
    hypercorn.trio.serve, as ``trioagg serve`` does; with several, the way a plain
    quart-trio app is run on several cores, the hypercorn CLI with ``--workers N``.
    ``hypercorn``: every app on the hypercorn CLI with ``--workers N``.
    """

    deploy: str = DEFAULT_DEPLOY
    workers: int = DEFAULT_WORKERS
    #: seconds an idle keep-alive connection stays open (trioagg serve's
    #: ``--keep-alive-timeout``, hypercorn's ``--keep-alive``); None: each one's default
    keep_alive: float | None = None
    #: ``trioagg serve`` flags (``--sync normal``); TRIOAGG_* variables with hypercorn.
    server_args: tuple[str, ...] = ()
    #: extra hypercorn CLI arguments (``--deploy hypercorn`` only).
    hypercorn_args: tuple[str, ...] = ()
    #: a directory holding the ``trioagg`` package to run instead of the installed one.
    trioagg_src: str | None = None

    def __post_init__(self) -> None:
        if self.deploy not in DEPLOYS:
            raise ValueError(f"--deploy must be one of {', '.join(DEPLOYS)}")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.keep_alive is not None and self.keep_alive < 0:
            raise ValueError("--keep-alive must not be negative")
        if self.deploy == "serve" and self.hypercorn_args:
            raise ValueError("--hypercorn-arg needs --deploy hypercorn")
        # parses every flag (a typo fails now, not minutes into a run); one worker count
        if flag_value(self.server_args, "--workers") is not None:
            raise ValueError("give the worker count with --workers, not --server-arg --workers")

    def on_hypercorn_cli(self, app: str) -> bool:
        """Whether ``app`` (trioagg or a Quart baseline) runs on the hypercorn CLI."""
        return self.deploy == "hypercorn" or (app != "trioagg" and self.workers > 1)

    def workers_of(self, app: str) -> int:
        """Worker processes serving ``app``: the Go design is one whatever the deployment."""
        return 1 if app == godesign.APP else self.workers

    def describe(self) -> str:
        text = f"{self.deploy} --workers {self.workers}"
        if self.keep_alive is not None:
            text += f" --keep-alive {self.keep_alive:g}"
        if self.hypercorn_args:
            text += " " + shlex.join(self.hypercorn_args)
        if self.server_args:
            text += " [" + shlex.join(self.server_args) + "]"
        if self.deploy == "serve" and self.on_hypercorn_cli("ceiling"):
            text += " (Quart baselines: hypercorn CLI)"
        if self.trioagg_src:
            text += f" (trioagg from {self.trioagg_src})"
        return text


def split_args(values: Sequence[str]) -> tuple[str, ...]:
    """``--server-arg`` values, each split like a shell would (``"--sync normal"``)."""
    return tuple(token for value in values for token in shlex.split(value))


def flags_to_env(args: Sequence[str]) -> dict[str, str]:
    """``trioagg serve`` flags as the TRIOAGG_* variables hypercorn's factory reads:
    ``["--batch-size", "500", "--sync=normal"]`` -> ``{"TRIOAGG_BATCH_SIZE": "500", ...}``."""
    env: dict[str, str] = {}
    tokens = list(args)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) < 3:
            raise ValueError(f"expected a --flag, got {token!r}")
        if "=" in token:
            name, value = token[2:].split("=", 1)
        else:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ValueError(f"{token} needs a value")
            name, value = token[2:], tokens[index + 1]
            index += 1
        env["TRIOAGG_" + name.upper().replace("-", "_")] = value
        index += 1
    return env


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given for ``flag`` in a list of ``--flag value`` / ``--flag=value``."""
    name = "TRIOAGG_" + flag.lstrip("-").upper().replace("-", "_")
    return flags_to_env(args).get(name)


def command(
    app: str,
    deployment: Deployment,
    db: Path | str | None,
    extra_args: Sequence[str] = (),
    go_binary: Path | str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment that start ``app``. ``db`` is a SQLite path or
    a ``postgresql://`` DSN (trioagg only). ``extra_args`` are the scenario's own
    ``trioagg serve`` flags; the user's ``--server-arg`` come after them and so win.
    The Go design (``go_binary``, built by ``bench.godesign``) is one process whatever
    the deployment, and like the naive app follows ``--sync`` only."""
    if app not in APPS:
        raise ValueError(f"unknown app {app!r}")
    python = sys.executable
    flags = [*extra_args, *deployment.server_args]
    env: dict[str, str] = {}
    sync = flag_value(flags, "--sync") or "full"
    if app == godesign.APP:
        if go_binary is None:
            raise ValueError("the Go design needs its built binary")
        return godesign.command(go_binary, str(db), sync), env
    keep_alive = None if deployment.keep_alive is None else f"{deployment.keep_alive:g}"
    if not deployment.on_hypercorn_cli(app):
        if app == "trioagg":
            argv = [python, "-m", "trioagg", "serve", "--db", str(db)]
            argv += ["--host", "127.0.0.1", "--port", "0"]
            if deployment.workers > 1:  # one process runs any trioagg (--trioagg-ref)
                argv += ["--workers", str(deployment.workers)]
            if keep_alive is not None:
                argv += ["--keep-alive-timeout", keep_alive]
            argv += flags
        else:
            argv = [python, "-m", "bench.baselines", app, "--port", "0"]
            if keep_alive is not None:
                argv += ["--keep-alive", keep_alive]
            if app == "naive":
                argv += ["--db", str(db), "--sync", sync]
        return argv, env
    argv = [python, "-m", "hypercorn", "--worker-class", "trio", "--bind", "127.0.0.1:0"]
    argv += ["--workers", str(deployment.workers)]
    if keep_alive is not None:
        argv += ["--keep-alive", keep_alive]
    argv += list(deployment.hypercorn_args)
    if app == "trioagg":
        env.update(flags_to_env(flags))
        env["TRIOAGG_DB"] = str(db)
        argv.append("trioagg.app:create_app()")
    else:
        env["BENCH_DB"] = str(db)
        env["BENCH_SYNC"] = sync
        argv.append(f"bench.baselines:{app}_app()")
    return argv, env


@dataclass
class Server:
    """One running server process (and its worker processes)."""

    app: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    #: worker processes, each of which logs "Running on": the server has started
    #: when all have (so the load meets every worker, and ``pids`` holds them all)
    workers: int = 1
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    pids: list[int] = field(default_factory=list)
    started_s: float = 0.0
    #: seconds from SIGTERM to exit: the drain of whatever was still queued
    stopped_s: float = 0.0
    exit_code: int | None = None
    trioagg_src: str | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = python_path(self.trioagg_src, env.get("PYTHONPATH"))
        begun = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=_ROOT,
                start_new_session=True,
            )
        deadline = begun + timeout
        while self.port == 0:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.app} exited with {self.process.returncode}: {self.tail()}"
                )
            if time.perf_counter() > deadline:
                self.kill()
                raise ServerError(f"{self.app} did not start in {timeout:g}s: {self.tail()}")
            ports = _RUNNING.findall(self.log_path.read_bytes())
            if len(ports) >= self.workers:
                self.port = int(ports[0])
            else:
                time.sleep(0.05)
        while not self._ready():
            if self.process.poll() is not None or time.perf_counter() > deadline:
                self.kill()
                raise ServerError(f"{self.app} never answered /readyz: {self.tail()}")
            time.sleep(0.05)
        self.started_s = time.perf_counter() - begun
        parent = psutil.Process(self.process.pid)
        self.pids = [parent.pid, *(child.pid for child in parent.children(recursive=True))]

    def _ready(self) -> bool:
        try:
            status, _ = http_get("127.0.0.1", self.port, "/readyz")
        except OSError:
            return False
        return status == 200

    def peak_rss_bytes(self) -> dict[str, int]:
        """Peak resident memory (VmHWM) of the server's processes: the largest one and the sum."""
        peaks = [vm_hwm(pid) for pid in self.pids]
        return {"max": max(peaks, default=0), "sum": sum(peaks)}

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, and return the exit code (graceful shutdown must give 0)."""
        assert self.process is not None
        if self.process.poll() is None:
            begun = time.perf_counter()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
                self.stopped_s = time.perf_counter() - begun
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerError(
                    f"{self.app} did not stop within {timeout:g}s of SIGTERM: {self.tail()}"
                ) from None
        self.exit_code = self.process.returncode
        return self.exit_code

    def kill(self) -> None:
        """Last resort: SIGKILL the server's process group (it has its own session)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n  " + "\n  ".join(text.splitlines()[-lines:])


def python_path(trioagg_src: str | None, existing: str | None) -> str:
    """PYTHONPATH for servers: the trioagg source asked for (if any), then this
    repository (for ``bench.baselines``), then whatever was there."""
    return os.pathsep.join(filter(None, [trioagg_src, str(_ROOT), existing]))


def vm_hwm(pid: int) -> int:
    """A process's peak resident set size in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A blocking one-shot GET (for readiness checks, not for load)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, length, _ = parse_head(head)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            body += chunk
    return status, body
