"""One measurement = a fresh server + a load generator process + a verified store.

:meth:`Bench.measure` starts the server (fresh SQLite file), hands the load
generator its phases, reads the server's peak RSS, stops it with SIGTERM,
counts the store and checks it against the acknowledged events. It returns a
:class:`Measurement`; the scenarios turn those into table rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trioagg.core.settings import Settings
from trioagg.keys.admin import create_key
from trioagg.store import make_backend

from . import godesign, pgstore, stalls, verify
from .server import Deployment, Server, command, http_get

_ROOT = Path(__file__).resolve().parent.parent

#: A client spending this share of the server's CPU per request may be what limits the rate.
CLIENT_CPU_SHARE_LIMIT = 0.5
#: A client process using this share of one core is saturated.
CLIENT_UTIL_LIMIT = 0.9
#: Other processes (not server, not client) using this share of a core disturb a phase.
OTHER_UTIL_LIMIT = 0.25
#: where trioagg exports its metrics (the event-loop stalls among them)
METRICS_PATH = "/metrics"


class BenchError(RuntimeError):
    """A measurement could not be made (server or load generator failed)."""


@dataclass
class Options:
    quick: bool = False
    scenarios: tuple[str, ...] = ()
    deployment: Deployment = field(default_factory=Deployment)
    connections: int = 64
    out: Path = _ROOT / "bench" / "results"
    workdir: Path | None = None
    chart: bool = True
    baselines: bool = True
    keep_stores: bool = False
    #: where trioagg servers keep their roll-ups: ``sqlite`` (a fresh file per
    #: measurement) or ``postgres`` (a fresh schema per measurement on ``pg_dsn``).
    store: str = "sqlite"
    pg_dsn: str = pgstore.DEFAULT_DSN
    #: the PostgreSQL matrix: writers per server x worker processes.
    pg_writers: tuple[int, ...] = (1, 2, 4)
    pg_workers: tuple[int, ...] = (1, 2)


@dataclass
class Measurement:
    label: str
    app: str
    phases: dict[str, dict[str, Any]]
    server: dict[str, Any]
    store: dict[str, int] | None
    verdict: dict[str, Any]

    def stream_class(self, phase: str, stream: str, cls: str) -> dict[str, Any]:
        return dict(self.phases[phase]["streams"][stream]["classes"][cls])

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "app": self.app,
            "server": self.server,
            "store": self.store,
            "verdict": self.verdict,
            "phases": self.phases,
        }


class Progress:
    """One status line on stderr: rewritten in place on a terminal, printed per step otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.step = ""
        self._lock = threading.Lock()
        self._width = 0

    def set(self, step: str) -> None:
        self.step = step
        self._write("")
        if not self.tty:
            self.stream.write(self._line("") + "\n")
            self.stream.flush()

    def update(self, detail: str) -> None:
        self._write(detail)

    def _line(self, detail: str) -> str:
        elapsed = time.perf_counter() - self.started
        text = f"[{int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {self.step}"
        return f"{text}  {detail}" if detail else text

    def _write(self, detail: str) -> None:
        if not self.tty:
            return
        with self._lock:
            line = self._line(detail)
            padding = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * padding)
            self.stream.flush()
            self._width = len(line)

    def clear(self) -> None:
        if self.tty and self._width:
            with self._lock:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    def note(self, text: str) -> None:
        """A line that stays (warnings)."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()


class Bench:
    """The state of one harness run: options, work directory, everything measured."""

    def __init__(self, options: Options, progress: Progress | None = None) -> None:
        self.options = options
        self.progress = progress or Progress()
        self.workdir = (
            options.workdir
            or Path(os.environ.get("TMPDIR", "/tmp")) / f"trioagg-bench-{os.getpid()}"
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        #: Start of the day of data every scenario writes: 24 whole hours before this hour.
        self.day_start = int(now // 3600 * 3600 - 86400)
        self.measurements: list[Measurement] = []
        self.warnings: list[str] = []
        self.cache: dict[str, Any] = {}
        self._counter = 0
        #: the local PostgreSQL server's postmaster (its CPU is measured), if any
        self.postmaster_pid: int | None = None
        if options.store == "postgres":
            self.postmaster_pid = pgstore.postmaster_pid(options.pg_dsn)

    def go_binary(self) -> Path | None:
        """The Go design built for this run (once), or None with its skip line printed."""
        if "go binary" not in self.cache:
            self.progress.set("building the Go design (bench/goseed)")
            try:
                self.cache["go binary"] = godesign.build(self.workdir)
            except godesign.GoUnavailable as error:
                self.cache["go binary"] = None
                self.warn(str(error))
        binary: Path | None = self.cache["go binary"]
        return binary

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)
            self.progress.note(f"WARNING: {text}")

    # ------------------------------------------------------------------ measuring

    def measure(
        self,
        label: str,
        app: str,
        phases: list[dict[str, Any]],
        *,
        server_flags: Iterable[str] = (),
        allowed_statuses: frozenset[int] = frozenset(),
        deployment: Deployment | None = None,
        api_key: str | None = None,
    ) -> Measurement:
        """Run ``phases`` against a fresh ``app`` server and verify its store.
        ``deployment`` replaces the run's own (the PostgreSQL matrix varies workers);
        ``api_key`` is stored (admin scope) in the fresh store before the server starts."""
        deployment = deployment or self.options.deployment
        self._counter += 1
        stem = f"{self._counter:02d}-{label.replace('/', '-').replace(' ', '_')}-{app}"
        db = self.workdir / f"{stem}.db"
        verify.remove_store(db)
        # trioagg on PostgreSQL: a fresh schema (the baselines keep their SQLite files)
        schema = None
        target: Path | str = db
        if app == "trioagg" and self.options.store == "postgres":
            schema = pgstore.new_schema_name(f"{self._counter:02d}")
            try:
                pgstore.create_schema(self.options.pg_dsn, schema)
            except pgstore.PostgresError as error:
                raise BenchError(f"{label}: {error}") from error
            target = pgstore.schema_dsn(self.options.pg_dsn, schema)
        if api_key is not None:
            create_key(make_backend(Settings(db=str(target))), "bench", ("admin",), secret=api_key)
        try:
            return self._measure(
                label,
                app,
                phases,
                stem=stem,
                db=db,
                target=target,
                schema=schema,
                server_flags=server_flags,
                allowed_statuses=allowed_statuses,
                deployment=deployment,
            )
        finally:
            if schema is not None and not self.options.keep_stores:
                try:
                    pgstore.drop_schema(self.options.pg_dsn, schema)
                except pgstore.PostgresError as error:
                    self.warn(f"schema {schema} not dropped: {error}")

    def _measure(
        self,
        label: str,
        app: str,
        phases: list[dict[str, Any]],
        *,
        stem: str,
        db: Path,
        target: Path | str,
        schema: str | None,
        server_flags: Iterable[str],
        allowed_statuses: frozenset[int],
        deployment: Deployment,
    ) -> Measurement:
        go_binary = self.go_binary() if app == godesign.APP else None
        argv, env = command(app, deployment, target, list(server_flags), go_binary)
        prom_dir = self.workdir / f"{stem}.prom"
        if app == "trioagg":
            # an empty folder of its own: the stall histogram summed over workers
            shutil.rmtree(prom_dir, ignore_errors=True)
            prom_dir.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
        server = Server(
            app,
            argv,
            env,
            self.workdir / f"{stem}.log",
            workers=deployment.workers_of(app),
            trioagg_src=deployment.trioagg_src,
        )
        self.progress.set(f"{label}: {app} starting")
        try:
            server.start()
            self.progress.set(f"{label}: {app}")
            spec = {
                "host": "127.0.0.1",
                "port": server.port,
                "server_pids": server.pids,
                # PostgreSQL's CPU is the store's, not another tenant's (BUSY MACHINE)
                "db_pid": self.postmaster_pid if schema else None,
                "seed": 7,
                "phases": phases,
                # trioagg's event-loop stalls per phase (the baselines have no heartbeat)
                "metrics": METRICS_PATH if app == "trioagg" else None,
            }
            result = self._loadgen(spec)
            rss = server.peak_rss_bytes()
            loop_stalls = None
            if app == "trioagg":
                loop_stalls = stalls.longest(
                    scrape_stalls(server, deployment.workers), deployment.workers
                )
            exit_code = server.stop()
        except BaseException:
            server.kill()
            raise
        stored: tuple[int, int] | None = None
        if app != "ceiling":
            try:
                if schema is not None:
                    stored = pgstore.store_totals(self.options.pg_dsn, schema)
                else:
                    stored = verify.store_totals(db)
            except Exception as error:  # a missing or broken store fails the check
                where = f"schema {schema}" if schema else str(db)
                raise BenchError(f"{label}: cannot read the store {where}: {error}") from error
        totals = verify.acknowledged(result)
        unexpected = verify.unexpected_statuses(result, allowed_statuses)
        timed_out = any(phase["timed_out"] for phase in result["phases"])
        verdict = verify.verdict(
            acked=totals["acked_events"],
            stored=None if stored is None else stored[0],
            duplicates=totals["duplicate_events"],
            exit_code=exit_code,
            errors=totals["errors"],
            unexpected=unexpected,
            timed_out=timed_out,
        )
        verdict.update(sent_events=totals["sent_events"], unknown_events=totals["unknown_events"])
        # The ceiling stores nothing: every event sent must have been answered as accepted.
        if app == "ceiling" and totals["acked_events"] != totals["sent_events"]:
            verdict["ok"] = False
            verdict["problems"].append(
                f"{totals['sent_events']} events sent, {totals['acked_events']} accepted"
            )
        if totals["accepted_mismatches"]:
            verdict["ok"] = False
            verdict["problems"].append(
                f"{totals['accepted_mismatches']} answers accepted a different number of events"
            )
        measurement = Measurement(
            label=label,
            app=app,
            phases={phase["name"]: phase for phase in result["phases"]},
            server={
                "argv": [_redacted(arg) for arg in argv],
                "env": {name: _redacted(value) for name, value in env.items()},
                "deploy": "one Go process" if app == godesign.APP else deployment.describe(),
                "workers": deployment.workers_of(app),
                "store": "postgres" if schema else ("none" if app == "ceiling" else "sqlite"),
                "schema": schema,
                "pids": len(server.pids),
                "start_s": round(server.started_s, 3),
                "stop_s": round(server.stopped_s, 3),
                "peak_rss_bytes": rss,
                "loop_stalls": loop_stalls,
                "exit_code": exit_code,
            },
            store=None if stored is None else {"events": stored[0], "rows": stored[1]},
            verdict=verdict,
        )
        self.record(measurement, db, f"{label} ({app})")
        if not self.options.keep_stores:
            shutil.rmtree(prom_dir, ignore_errors=True)
        self._check_client(label, app, measurement)
        return measurement

    def record(self, measurement: Measurement, db: Path, what: str) -> None:
        """Keep ``measurement``, say so when its verification failed, and delete its
        SQLite store ``db`` unless --keep-stores."""
        self.measurements.append(measurement)
        if not measurement.verdict["ok"]:
            problems = "; ".join(measurement.verdict["problems"])
            self.progress.note(f"VERIFY FAILED {what}: {problems}")
        if not self.options.keep_stores:
            verify.remove_store(db)

    def _check_client(self, label: str, app: str, measurement: Measurement) -> None:
        for name, phase in measurement.phases.items():
            share = client_share(phase)
            if share is not None and share >= CLIENT_CPU_SHARE_LIMIT:
                self.warn(
                    f"CLIENT MAY BE THE LIMIT in {label} / {app} / {name}: the load generator "
                    f"spent {share:.0%} of the server's CPU per request"
                )
            elapsed = phase.get("elapsed_s") or 0.0
            other = phase["cpu"].get("other_s") or 0.0
            if elapsed > 0.5 and other / elapsed >= OTHER_UTIL_LIMIT:
                self.warn(
                    f"BUSY MACHINE during {label} / {app} / {name}: other processes used "
                    f"{other / elapsed:.0%} of a core; its figures are pessimistic"
                )
            util = phase["cpu"].get("client_util") or 0.0
            if util >= CLIENT_UTIL_LIMIT:
                self.warn(
                    f"CLIENT IS THE LIMIT in {label} / {app} / {name}: the load generator "
                    f"used {util:.0%} of a core"
                )

    def _loadgen(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=_ROOT,
            env=env,
        )
        errors: list[str] = []

        def follow() -> None:
            assert process.stderr is not None
            for raw in process.stderr:
                try:
                    line = json.loads(raw)
                except ValueError:
                    errors.append(raw.decode(errors="replace").rstrip())
                    continue
                if "stalled" in line:
                    self.progress.note(
                        f"STALLED: no answer for {line['stalled']} s in {line['phase']}; "
                        "stopping this phase"
                    )
                    continue
                total = f"/{line['total']:,}" if line.get("total") else ""
                self.progress.update(
                    f"{line['phase']}: {line['done']:,}{total} requests, {line['elapsed']:.0f}s"
                )

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        # stderr belongs to the reader thread alone (communicate() would read it too)
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(json.dumps(spec).encode())
            process.stdin.close()
            out = process.stdout.read()
            process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        reader.join(5)
        if process.returncode != 0:
            detail = out.decode(errors="replace").strip() or "\n".join(errors[-20:])
            raise BenchError(f"the load generator failed ({process.returncode}): {detail}")
        result: dict[str, Any] = json.loads(out)
        return result


def scrape_stalls(server: Server, workers: int, tries: int = 12) -> list[stalls.Scrape]:
    """Up to ``tries`` scrapes of ``/metrics``, each on a connection of its own (any
    worker may answer one), until every worker's longest-stall gauge has been read."""
    scrapes: list[stalls.Scrape] = []
    seen: set[str] = set()
    for _ in range(tries):
        try:
            status, body = http_get("127.0.0.1", server.port, METRICS_PATH)
        except OSError:
            continue
        if status != 200:
            break
        scrape = stalls.parse(body.decode())
        scrapes.append(scrape)
        seen.update(scrape.longest)
        if len(seen) >= workers or "" in seen:  # "" = one process, no pid label
            break
    return scrapes


def _redacted(value: str) -> str:
    return pgstore.redact(value) if value.startswith(("postgresql://", "postgres://")) else value


def client_share(phase: Mapping[str, Any]) -> float | None:
    """Client CPU as a share of server CPU over a phase (None if the server used none)."""
    cpu = phase["cpu"]
    if not cpu.get("server_s"):
        return None
    return float(cpu["client_s"]) / float(cpu["server_s"])


def db_cpu_per_1k(phase: Mapping[str, Any]) -> float | None:
    """Database (PostgreSQL) CPU seconds per 1,000 requests of a phase, if measured."""
    db = phase["cpu"].get("db_s")
    if db is None or not phase["requests"]:
        return None
    return round(float(db) / int(phase["requests"]) * 1000, 4)


def cpu_per_1k(phase: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Server and client CPU seconds per 1,000 requests of a phase."""
    requests = phase["requests"]
    if not requests:
        return None, None
    cpu = phase["cpu"]
    return (
        round(cpu["server_s"] / requests * 1000, 4),
        round(cpu["client_s"] / requests * 1000, 4),
    )
