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
that thread holds a client's buffer lock in ``send()``. Closing then would wait
forever for the client's thread, which needs that lock; so while the main thread is
in ``send()``, SIGTERM only starts the closing, and the process ends (the same way)
as soon as ``send()`` returns.
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
#: the thread the SIGTERM handler runs in (the main one), once installed
_handler_thread: int | None = None
#: how deep the main thread is in send(); SIGTERM waits until it is 0 again
_sending = 0
_deferred = False


def watch(client: Closable, *, sigterm: bool) -> None:
    """Close ``client`` at exit and, with ``sigterm`` and where the program lets us,
    on SIGTERM (see the module docstring)."""
    global _exit_hooked, _handler_thread
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
        _handler_thread = threading.get_ident()


def forget(client: Closable) -> None:
    """``client`` is closed: nothing to do for it at exit any more."""
    _open.discard(client)


def enter_send() -> bool:
    """A send() begins; True in the thread the SIGTERM handler runs in (then call
    :func:`leave_send` when it is over)."""
    global _sending
    if threading.get_ident() != _handler_thread:
        return False
    _sending += 1
    return True


def leave_send() -> None:
    """The main thread's send() is over: a SIGTERM that came meanwhile takes effect."""
    global _sending
    _sending -= 1
    if _deferred and not _sending:
        os.kill(os.getpid(), signal.SIGTERM)  # handled again, now that no lock is held


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _deferred
    for client in list(_open):
        client.close_soon()
    if _sending:
        _deferred = True
        return
    _close_all("SIGTERM")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


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
