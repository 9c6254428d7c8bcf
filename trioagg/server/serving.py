"""Serving the app over HTTP, one contained task per connection.

:func:`serve` does what ``hypercorn.trio.serve`` does, with hypercorn's own
parts (its ``Lifespan``, ``WorkerContext`` and ``TCPServer``, which speak
HTTP/1.1 and HTTP/2), except in how a connection may fail:

* **A connection's failure is that connection's.** hypercorn runs every
  connection's task in the nursery that holds the listeners, so an exception
  escaping one connection cancels all the others and ends the server. Here
  each connection runs in :class:`Connections`, which logs what escapes it with
  its traceback (at most one traceback per :data:`REPORT_INTERVAL`; the rest
  are counted in the next report), counts it in
  ``trioagg_contained_failures{where="connection"}``, closes that connection and
  goes on serving.
* **An end of file waits for a send under way.** hypercorn 0.18 ends a
  connection with ``send_eof`` while another of its tasks may be sending an
  error answer on the same stream (a client that closes after an early
  answer): trio refuses the second sender with ``BusyResourceError``, which is
  the failure above. :class:`OneSender` makes the two take turns.
* **Shutdown closes idle connections only.** hypercorn's keep-alive task closes
  a connection once the server stops, even when a request has just arrived on
  it (both wake at once): the request then ran, and could be stored, with no
  one left to answer (HTTP/2: a shutdown while a new stream's app starts).
  :class:`ConnectionServer` closes it only while no request is under way; one
  that is gets its answer, then the close.

The sockets may come from a supervisor (``trioagg serve --workers N``, see
:mod:`trioagg.server.supervisor`) or be made here from the config's ``bind``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import trio
from hypercorn.config import Config, Sockets
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import (
    LifespanFailureError,
    ShutdownError,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)

from ..app import create_app
from ..core.errors import ConfigError
from ..core.settings import Settings
from ..http.app import TrioaggApp, WriterCrashed
from ..service.metrics import Metrics

log = logging.getLogger("trioagg.serving")

#: The unit of progress of :class:`OneSender`'s send deadline.
SEND_CHUNK = 64 * 1024

#: At most one traceback of a contained connection failure is logged per this many
#: seconds; a client that can trigger one cannot flood the log with them.
REPORT_INTERVAL = 10.0


class OneSender(trio.abc.HalfCloseableStream):
    """A stream whose ``send_all`` waits for a ``send_eof`` under way on it (instead of
    raising ``BusyResourceError``) and whose ``send_eof`` raises ``BusyResourceError``
    at once while a ``send_all`` is under way, as trio's own does. Every other
    attribute is the wrapped stream's (hypercorn reads ``socket``, ``do_handshake`` and
    ``selected_alpn_protocol`` where they exist).

    A client that takes none of :data:`SEND_CHUNK` bytes of an answer for
    ``send_timeout`` seconds has its connection closed (``BrokenResourceError`` to the
    sender): hypercorn's sends are shielded and have no deadline of their own, so a
    client that asks for a large answer and never reads it would hold the answer's
    memory and the connection for ever."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        send_timeout: float = math.inf,
        closed: Callable[[], object] = lambda: None,
    ) -> None:
        self.stream = stream
        self.send_timeout = send_timeout
        #: Called once the stream is closed (by hypercorn, when the connection ends).
        self.closed = closed
        self._sending = trio.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            view = memoryview(data)
            for start in range(0, max(len(view), 1), SEND_CHUNK):
                with trio.move_on_after(self.send_timeout) as waiting:
                    await self.stream.send_all(view[start : start + SEND_CHUNK])
                if not waiting.cancelled_caught:
                    continue
                # A send cut short leaves the stream in no known state: close it.
                await trio.aclose_forcefully(self)
                raise trio.BrokenResourceError(
                    f"the client took no data for {self.send_timeout:g}s (send_timeout)"
                )

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        try:
            self._sending.acquire_nowait()
        except trio.WouldBlock:
            raise trio.BusyResourceError("another task is sending on this stream") from None
        try:
            await self.stream.send_eof()  # type: ignore[attr-defined]
        finally:
            self._sending.release()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self.closed()


class ConnectionServer(TCPServer):
    """hypercorn's ``TCPServer``, whose closing of a keep-alive connection (at the
    keep-alive timeout, or at once when the server stops) leaves alone a connection
    whose next request has started."""

    async def _idle_timeout(self) -> None:
        with trio.move_on_after(self.config.keep_alive_timeout):
            await self.context.terminated.wait()
        with trio.CancelScope(shield=True):
            # The reader that took a request may have run between the wake-up and
            # now; it stops this task, but only at this task's next checkpoint.
            if not _between_requests(self.protocol.protocol):
                return
            await self._initiate_server_close()


def _between_requests(protocol: object) -> bool:
    """Whether a connection has no request under way: HTTP/1.1's request is in h11's
    hands, HTTP/2's streams are all done (hypercorn's own ``idle``; it marks a new
    stream busy only after the stream's app has started)."""
    if isinstance(protocol, H11Protocol):
        return protocol.connection.their_state is h11.IDLE
    if isinstance(protocol, H2Protocol):
        return protocol.idle
    return True


class Connections:
    """The handler of every accepted connection: hypercorn's protocol on the stream,
    contained (see the module)."""

    def __init__(
        self,
        app: Any,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        metrics: Metrics,
        *,
        send_timeout: float = math.inf,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.app = app
        self.send_timeout = send_timeout
        self.config = config
        self.context = context
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self._reported_at = -math.inf
        self._unreported = 0

    async def __call__(self, stream: trio.abc.Stream) -> None:
        try:
            # Once hypercorn has closed the stream, what is left of the connection's
            # tasks can neither read nor answer anything: end them. (hypercorn 0.18
            # leaves a reader waiting for ever when the next request on a keep-alive
            # connection arrived before the connection was closed at shutdown.)
            with trio.CancelScope() as connection:
                server = ConnectionServer(
                    self.app,
                    self.config,
                    self.context,
                    ConnectionState(self.state.copy()),
                    OneSender(  # type: ignore[arg-type]
                        stream, send_timeout=self.send_timeout, closed=connection.cancel
                    ),
                )
                await server.run()
        except* Exception as failure:
            self.contained(failure)
        finally:
            await trio.aclose_forcefully(stream)

    def contained(self, failure: BaseException) -> None:
        """Count a failure that ended one connection, and log it (see the module)."""
        self.metrics.count_contained("connection")
        now = self.clock()
        if now - self._reported_at < REPORT_INTERVAL:
            self._unreported += 1
            return
        more = f" ({self._unreported} more since the last report)" if self._unreported else ""
        self._reported_at, self._unreported = now, 0
        log.error(
            "a connection failed and was closed; the server goes on%s",
            more,
            exc_info=failure,
        )


async def serve(
    app: Any,
    config: Config,
    metrics: Metrics,
    *,
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    send_timeout: float = math.inf,
    started: Callable[[], bool] = lambda: True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` until ``shutdown_trigger`` returns (``hypercorn.trio.serve``
    with contained connections, see the module). ``task_status`` gets the bound URLs.
    ``started()`` says whether the app's start-up succeeded: hypercorn's lifespan lets
    its waiter go on before a failed start-up's error reaches this task, and nothing
    may listen (nor be reported serving) for an app that did not start."""
    framework = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(framework, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        if not started():
            await trio.sleep_forever()  # until the start-up's failure cancels this

        async with trio.open_nursery() as connections_nursery:
            if sockets is None:
                sockets = config.create_sockets()
                for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
                    sock.listen(config.backlog)
            listeners: list[trio.abc.Listener[Any]] = []
            binds = []
            ssl_context = config.create_ssl_context()
            for sock in sockets.secure_sockets:
                assert ssl_context is not None, "secure sockets come with a certificate"
                plain = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                listeners.append(trio.SSLListener(plain, ssl_context, https_compatible=True))
                binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
            for sock in sockets.insecure_sockets:
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            for bind in binds:
                await config.log.info(f"Running on {bind} (CTRL + C to quit)")
            handler = Connections(
                framework, config, context, lifespan_state, metrics, send_timeout=send_timeout
            )
            task_status.started(binds)
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    if shutdown_trigger is not None:
                        nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        functools.partial(
                            trio.serve_listeners,
                            handler,
                            listeners,
                            handler_nursery=connections_nursery,
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                # Idle keep-alive connections close at once; the others finish their
                # request first, for at most graceful_timeout.
                await context.terminated.set()
                connections_nursery.cancel_scope.deadline = (
                    trio.current_time() + config.graceful_timeout
                )

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


# Room between the end of the drain and the cancelling of the lifespan.
_SHUTDOWN_MARGIN_SECONDS = 10


async def run_server(
    app: TrioaggApp,
    *,
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    supervisor: int | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` as its settings say until ``shutdown_trigger`` returns (default:
    one of ``stop_signals`` arrives, or the process ``supervisor`` is no longer this
    one's parent), then shut down gracefully. ``task_status`` receives the bound URLs."""
    if shutdown_trigger is None:
        with trio.open_signal_receiver(*stop_signals) as signals:
            await run_server(
                app,
                sockets=sockets,
                shutdown_trigger=functools.partial(_until_stopped, signals, supervisor),
                task_status=task_status,
            )
        return
    config = hypercorn_config(app.settings)

    async def until_shutdown() -> None:
        await shutdown_trigger()
        app.stopping = True

    await serve(
        app,
        config,
        app.metrics,
        sockets=sockets,
        shutdown_trigger=until_shutdown,
        send_timeout=app.settings.send_timeout,
        started=lambda: app.serving,
        task_status=task_status,
    )


def hypercorn_config(settings: Settings) -> Config:
    """The hypercorn settings that trioagg's own serving follows."""
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    # Requests in flight may wait for their commit, and the drain must end by itself
    # (drain_timeout) before the lifespan would be cancelled.
    config.graceful_timeout = settings.drain_timeout
    config.shutdown_timeout = settings.drain_timeout + _SHUTDOWN_MARGIN_SECONDS
    return config


def open_sockets(settings: Settings) -> Sockets:
    """The listening sockets of ``--host`` and ``--port``, made before anything else
    starts; :class:`~trioagg.core.errors.ConfigError` when the address cannot be listened on
    (taken, not this machine's, a privileged port) or the certificate cannot be used."""
    config = hypercorn_config(settings)
    try:
        config.create_ssl_context()  # loads --certfile and --keyfile, when given
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"cannot use the certificate {settings.certfile} with the key "
            f"{settings.keyfile}: {error.strerror or error} (--certfile, --keyfile)"
        ) from None
    try:
        sockets = config.create_sockets()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {reason} (--host, --port)"
        ) from None
    for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
        sock.listen(config.backlog)
    return sockets


async def _until_stopped(signals: AsyncIterator[int], supervisor: int | None) -> None:
    """Return at the first of ``signals``, or once ``supervisor`` is gone (this process
    then has another parent)."""
    async with trio.open_nursery() as nursery:

        async def signalled() -> None:
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()

        async def orphaned(parent: int) -> None:
            while os.getppid() == parent:
                await trio.sleep(ORPHAN_CHECK_SECONDS)
            log.warning("the supervisor (pid %d) is gone: stopping", parent)
            nursery.cancel_scope.cancel()

        nursery.start_soon(signalled)
        if supervisor is not None:
            nursery.start_soon(orphaned, supervisor)


#: How often a worker of ``trioagg serve --workers N`` checks that its supervisor runs.
ORPHAN_CHECK_SECONDS = 1.0


def run_process(
    settings: Settings,
    *,
    sockets: Sockets | None = None,
    statsd: socket.socket | None = None,
    on_serving: Callable[[], object] | None = None,
    supervisor: int | None = None,
    replaces: int | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Serve ``settings`` in this process until stopped (see :func:`run_server`); calls
    ``on_serving`` once it listens; with ``--statsd``, receives StatsD on ``statsd``
    (bound before, else the service binds one). ``replaces``: how the worker this process replaces
    ended (counted in ``trioagg_worker_restarts``). Returns the exit code: 0 after a
    graceful stop, 1 when the service crashed, 2 when it could not start (both logged)."""
    app = create_app(settings)
    app.statsd_socket = statsd
    if replaces is not None:
        app.metrics.worker_restarts.inc()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    run_server,
                    app,
                    sockets=sockets,
                    supervisor=supervisor,
                    stop_signals=stop_signals,
                )
            )
            if on_serving is not None:
                on_serving()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        if group.subgroup(WriterCrashed) is not None:
            return 1  # logged; the supervisor should start another process
        if group.subgroup(LifespanFailureError) is None:
            raise
        return 2  # the app has logged why it could not start
    return 0
