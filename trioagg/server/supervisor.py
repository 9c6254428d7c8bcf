"""``trioagg serve --workers N``: N worker processes on one listening socket, kept
running by this process, their supervisor.

The supervisor opens the listening sockets once and starts each worker (a
fresh interpreter, multiprocessing's ``spawn``) with them; the kernel hands
each new connection to one worker. It also makes what the workers share: a
folder for prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
unless the operator set one), so that ``/metrics`` adds up every worker's
counters whichever worker answers; it removes the folder it made when it exits.

* **A worker that dies is replaced**: logged with its exit code or signal, and
  counted in ``trioagg_worker_restarts`` (by the replacement, in the shared
  metrics). A worker that dies again soon after its start waits longer each
  time before it is replaced (:class:`Restarts`).
* **A worker that cannot start** (it exits before it serves) is retried the
  same way; after :data:`START_ATTEMPTS` failures in a row, or at once when it
  exits 2 (it logged a one-line reason, such as settings it refuses), the
  supervisor stops the others and exits non-zero.
* **SIGTERM and SIGINT** are passed on to every worker, which drains (the same
  graceful shutdown as one process) and exits; the supervisor exits once they
  all have: 0 when every one stopped cleanly, 1 otherwise.
* **A worker whose supervisor is gone** (killed with SIGKILL) stops as if it had
  been sent SIGTERM, instead of serving on unsupervised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from hypercorn.config import Sockets

from ..core.settings import Settings

log = logging.getLogger("trioagg.supervisor")

#: A worker that served at least this long before it died is replaced at once.
STABLE_SECONDS = 10.0
#: The first wait before replacing a worker that died soon after its start; it
#: doubles with each such death in a row, up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: Failed starts in a row (exits before serving) after which the supervisor gives up.
START_ATTEMPTS = 5


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@dataclass
class Restarts:
    """When to start the worker of one slot again, after its deaths (pure logic: the
    times are given, never read from a clock)."""

    backoff: float = 0.0
    failed_starts: int = 0

    def died(self, *, lived: float, served: bool) -> float:
        """A worker died after ``lived`` seconds, having ``served`` (been ready) or not:
        how long to wait before starting the next one."""
        self.failed_starts = 0 if served else self.failed_starts + 1
        if served and lived >= STABLE_SECONDS:
            self.backoff = 0.0
        else:
            self.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, self.backoff * 2))
        return self.backoff

    @property
    def gave_up(self) -> bool:
        return self.failed_starts >= START_ATTEMPTS


@dataclass
class _Slot:
    number: int
    process: BaseProcess | None = None
    ready: Connection | None = None
    started_at: float = 0.0
    served: bool = False
    start_at: float = 0.0
    #: How the worker this one replaces ended (None for the first).
    replaces: int | None = None
    restarts: Restarts = field(default_factory=Restarts)


def supervise(settings: Settings, sockets: Sockets, statsd: socket.socket | None = None) -> int:
    """Run ``settings.workers`` worker processes on ``sockets`` (listening) until
    SIGTERM or SIGINT (see the module); the exit code for the supervisor's process. The
    store is checked before (one line and exit 2 when it cannot be opened, see
    :func:`~trioagg.server.process.exit_unless_store_opens`). ``statsd``: the UDP socket of
    ``--statsd``, which worker 0 alone receives on (see :func:`_start`)."""
    context = multiprocessing.get_context("spawn")
    slots = [_Slot(number) for number in range(settings.workers)]
    stopping = False
    code = 0

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping and signum:
            log.info("received %s: stopping the workers", signal.Signals(signum).name)
        stopping = True
        for slot in slots:
            if slot.process is not None:
                _terminate(slot.process)

    with _shared_metrics_folder(), _handling(stop):
        try:
            while not stopping or any(slot.process for slot in slots):
                now = time.monotonic()
                for slot in slots:
                    if not stopping and slot.process is None and now >= slot.start_at:
                        _start(context, slot, settings, sockets, statsd)
                _wait_for_news(slots, stopping)
                for slot in slots:
                    failure = _collect(slot, stopping)
                    if failure is not None:
                        code = code or failure
                if code and not stopping:
                    stop(0, None)
        finally:
            for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                sock.close()
            if statsd is not None:
                statsd.close()
    log.info("trioagg supervisor stopped (exit code %d)", code)
    return code


def _start(
    context: multiprocessing.context.SpawnContext,
    slot: _Slot,
    settings: Settings,
    sockets: Sockets,
    statsd: socket.socket | None = None,
) -> None:
    # StatsD goes to worker 0 alone (and to the worker replacing it), which keeps the
    # gauges' values: spread over workers (SO_REUSEPORT hashes each sender to one of
    # them, and a sender's port changes), a series' +n/-n lines would change values
    # kept apart. While worker 0 is being replaced, datagrams wait in the socket's
    # kernel buffer, which the supervisor holds open.
    if slot.number != 0:
        settings, statsd = dataclasses.replace(settings, statsd=None), None
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(
        target=_work,
        name=f"trioagg-worker-{slot.number}",
        kwargs={
            "settings": settings,
            "sockets": sockets,
            "statsd": statsd,
            "ready": sending,
            "supervisor": os.getpid(),
            "replaces": slot.replaces,
        },
    )
    # The worker starts with SIGTERM and SIGINT blocked, so that neither kills it
    # while it loads; it then ignores both until it serves (see _work). Starting the
    # first process also starts multiprocessing's resource tracker, which unblocks both
    # in this process on its way: start it first.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    sending.close()  # the worker holds the only sending end: EOF when it dies
    slot.process, slot.ready = process, receiving
    slot.started_at, slot.served = time.monotonic(), False
    log.info("worker %d started (pid %d)", slot.number, process.pid)


def _wait_for_news(slots: list[_Slot], stopping: bool) -> None:
    """Until a worker is ready or exits, or the next delayed start is due."""
    waiting: list[Connection | int] = []
    for slot in slots:
        if slot.process is not None:
            waiting.append(slot.process.sentinel)
            if slot.ready is not None:
                waiting.append(slot.ready)
    pending = [slot.start_at for slot in slots if slot.process is None and not stopping]
    timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
    if waiting:
        wait(waiting, timeout)
    elif timeout:
        time.sleep(min(timeout, 0.5))  # a stop signal resumes a sleep (PEP 475): keep it short


def _collect(slot: _Slot, stopping: bool) -> int | None:
    """Take in what ``slot``'s worker said or did: ready, or exited. Returns an exit code
    for the supervisor when this worker's death means giving up."""
    process = slot.process
    if process is None:
        return None
    if slot.ready is not None and slot.ready.poll():
        try:
            slot.ready.recv_bytes()
            slot.served = True
            log.info("worker %d (pid %d) is serving", slot.number, process.pid)
            if stopping:  # the SIGTERM it was sent while it loaded was ignored
                _terminate(process)
        except EOFError:
            pass  # it died before it served: its exit is seen below
        slot.ready.close()
        slot.ready = None
    if process.exitcode is None:
        return None
    process.join()
    if slot.ready is not None:
        slot.ready.close()
        slot.ready = None
    slot.process = None
    exitcode = process.exitcode
    if stopping:
        # One that never served and ended by a stop signal's default action got it
        # before it could listen for it: it had taken no connection.
        stopped_loading = not slot.served and exitcode in (-signal.SIGTERM, -signal.SIGINT)
        if exitcode != 0 and not stopped_loading:
            log.error(
                "worker %d (pid %d) %s while stopping", slot.number, process.pid, _how(exitcode)
            )
            return 1
        return None
    lived = time.monotonic() - slot.started_at
    delay = slot.restarts.died(lived=lived, served=slot.served)
    first = slot.replaces is None
    slot.replaces, slot.start_at = exitcode, time.monotonic() + delay
    if first and not slot.served and exitcode == 2:
        # The first of its slot: the settings are refused. (A replacement's exit 2 may be
        # a store gone for a while: it is retried like any failed start.)
        log.error("worker %d could not start (it logged why): stopping", slot.number)
        return 2
    if slot.restarts.gave_up:
        log.error(
            "worker %d failed to start %d times in a row (last: %s): stopping",
            slot.number,
            START_ATTEMPTS,
            _how(exitcode),
        )
        return 1
    log.error(
        "worker %d (pid %d) %s after %.1fs; starting another in %gs",
        slot.number,
        process.pid,
        _how(exitcode),
        lived,
        delay,
    )
    return None


def _terminate(process: BaseProcess) -> None:
    """SIGTERM, unless it was already reaped (its pid may be another process's now)."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


@contextlib.contextmanager
def _shared_metrics_folder() -> Iterator[None]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the workers: the operator's, or one made here
    for this run and removed after it. The folders of supervisors that were killed
    (SIGKILL leaves theirs) are removed first: each names its supervisor's pid."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    _remove_orphaned_metrics_folders()
    folder = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(folder, ignore_errors=True)


_METRICS_PREFIX = "trioagg-metrics-"


def _remove_orphaned_metrics_folders() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = folder.name.removeprefix(_METRICS_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _handling(stop: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _work(
    settings: Settings,
    sockets: Sockets,
    statsd: socket.socket | None,
    ready: Connection,
    supervisor: int,
    replaces: int | None,
) -> None:
    """A worker process: serve on the supervisor's sockets until SIGTERM or the
    supervisor's end, telling it on ``ready`` once it serves. SIGINT is the
    supervisor's alone (a terminal's Ctrl-C reaches every process of the group; the
    supervisor passes it on as SIGTERM). SIGTERM is ignored until the service listens
    for it and after it stopped: one that came while the worker loaded is sent again
    once it serves."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    from .serving import run_process  # in the worker: loads the app there

    code = run_process(
        settings,
        sockets=sockets,
        statsd=statsd,
        on_serving=lambda: ready.send_bytes(b"ready"),
        supervisor=supervisor,
        replaces=replaces,
        stop_signals=(signal.SIGTERM,),
    )
    raise SystemExit(code)
