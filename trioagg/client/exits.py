"""What leaving the process does to the events buffered in sync clients.

Every open :class:`~trioagg.client.Client` is closed at the interpreter's exit:
flushed, for at most its ``close_timeout``. SIGTERM does not go through that exit:
its default action ends the process at once. So a client made in the main thread,
while SIGTERM still has its default action, installs a handler for it: on SIGTERM
it closes every open client, then restores the default action and raises SIGTERM
again, and the process ends as it would have (killed by SIGTERM; no ``finally``
blocks or exit hooks run). A handler the program set, or ``SIG_IGN``, is never
replaced; such a program closes its clients in its own handler. What a close could
not deliver is reported on stderr. SIGKILL cannot be caught: buffered events are lost.

A Python signal handler runs in the main thread between two bytecodes, maybe while
that thread holds a lock the clients' threads need (a client's buffer lock in
``send()``, a logging handler's lock while httpx logs a request): closing in the
handler would wait forever. So the handler only restores SIGTERM's default action
(a second SIGTERM ends the process at once), starts the closing, and returns; one
thread of this module's, started then, waits until every client is closed and
raises SIGTERM again.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from types import FrameType
from typing import Protocol


class Closable(Protocol):
    """What this module needs of a sync client."""

    def close_soon(self) -> None:
        """Start closing and return at once; a no-op when closing already."""

    def wait_closed(self) -> BaseException | None:
        """Wait until closed; the error that closing met, if any."""


_open: set[Closable] = set()
_exit_hooked = False
#: the thread that closes the clients after a SIGTERM, once one came
_closer: threading.Thread | None = None


def watch(client: Closable, *, sigterm: bool) -> None:
    """Close ``client`` at exit and, with ``sigterm`` and where the program lets us,
    on SIGTERM (see the module docstring)."""
    global _exit_hooked
    _open.add(client)
    if not _exit_hooked:
        atexit.register(_close_all, "exit")
        _exit_hooked = True
    if (
        sigterm
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)


def forget(client: Closable) -> None:
    """``client`` is closed: nothing to do for it at exit any more."""
    _open.discard(client)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _closer
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for client in list(_open):
        client.close_soon()
    if _closer is None:  # the thread blocks; this handler must not (see the module)
        _closer = threading.Thread(target=_close_then_die, name="trioagg-sigterm")
        _closer.start()


def await_the_end() -> None:
    """In a thread that may not go on once SIGTERM came (a ``send()`` on a client the
    SIGTERM closed): wait while the clients close and the process ends, as the
    default action would have ended it at once. Returns at once if no SIGTERM came."""
    if _closer is not None:
        _closer.join()


def _close_then_die() -> None:
    _close_all("SIGTERM")
    os.kill(os.getpid(), signal.SIGTERM)  # the default action again: killed by SIGTERM


def _close_all(why: str) -> None:
    clients = list(_open)
    for client in clients:
        client.close_soon()
    for client in clients:
        failure = client.wait_closed()
        forget(client)
        if failure is not None:
            with contextlib.suppress(OSError, ValueError):  # stderr may be gone
                print(f"trioagg.client at {why}: {failure}", file=sys.stderr, flush=True)
