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

The sockets may come from a supervisor (``trioagg serve --workers N``, see
:mod:`trioagg.supervisor`) or be made here from the config's ``bind``.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from .app import TrioaggApp
from .metrics import Metrics

log = logging.getLogger("trioagg.serving")

#: At most one traceback of a contained connection failure is logged per this many
#: seconds; a client that can trigger one cannot flood the log with them.
REPORT_INTERVAL = 10.0


class OneSender(trio.abc.HalfCloseableStream):
    """A stream whose ``send_all`` waits for a ``send_eof`` under way on it (instead of
    raising ``BusyResourceError``) and whose ``send_eof`` raises ``BusyResourceError``
    at once while a ``send_all`` is under way, as trio's own does. Every other
    attribute is the wrapped stream's (hypercorn reads ``socket``, ``do_handshake`` and
    ``selected_alpn_protocol`` where they exist)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._sending = trio.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self.stream.send_all(data)

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
        await self.stream.aclose()


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
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.state = state
        self.metrics = metrics
        self.clock = clock
        self._reported_at = -math.inf
        self._unreported = 0

    async def __call__(self, stream: trio.abc.Stream) -> None:
        try:
            await TCPServer(
                self.app,
                self.config,
                self.context,
                ConnectionState(self.state.copy()),
                OneSender(stream),  # type: ignore[arg-type]
            )
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
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ASGI ``app`` until ``shutdown_trigger`` returns (``hypercorn.trio.serve``
    with contained connections, see the module). ``task_status`` gets the bound URLs."""
    framework = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(framework, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

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
            handler = Connections(framework, config, context, lifespan_state, metrics)
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
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` as its settings say until ``shutdown_trigger`` returns (default:
    one of ``stop_signals`` arrives), then shut down gracefully. ``task_status``
    receives the bound URLs."""
    if shutdown_trigger is None:
        with trio.open_signal_receiver(*stop_signals) as signals:

            async def until_signal() -> None:
                async for signum in signals:
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    return

            await run_server(
                app, sockets=sockets, shutdown_trigger=until_signal, task_status=task_status
            )
        return
    config = Config()
    config.bind = [f"{app.settings.host}:{app.settings.port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.keep_alive_timeout = app.settings.keep_alive_timeout
    config.certfile = app.settings.certfile
    config.keyfile = app.settings.keyfile
    # Requests in flight may wait for their commit, and the drain must end by itself
    # (drain_timeout) before the lifespan would be cancelled.
    config.graceful_timeout = app.settings.drain_timeout
    config.shutdown_timeout = app.settings.drain_timeout + _SHUTDOWN_MARGIN_SECONDS
    await serve(
        app,
        config,
        app.metrics,
        sockets=sockets,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
