"""What only a process that is about to serve may do: log to stderr, take the settings
from the environment, check the store once before anything listens, exit with code 2
when it cannot start, and, as a hypercorn worker, leave SIGTERM to its own drain.

The app (:func:`trioagg.http.app.build_app`) does none of this; the entry points do it
before they build the app: ``trioagg serve`` (:mod:`trioagg.cli`), and
:func:`trioagg.app.create_app` for a worker that hypercorn's command line starts
(:func:`hypercorn_worker_settings`).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from typing import NoReturn

import trio

from ..core.errors import ConfigError
from ..core.settings import Settings
from ..keys.auth import key_required_to_start, settle_mode
from ..store import open_store, store_exists

log = logging.getLogger("trioagg")


def configure_logging(level: str) -> None:
    """trioagg's log lines on stderr, at ``level`` and above, once per process."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def exit_for_config(error: ConfigError) -> NoReturn:
    """End a process that cannot start: one line saying why, exit code 2."""
    configure_logging("info")
    log.error("trioagg cannot start: %s", error)
    sys.exit(2)


def exit_unless_store_opens(settings: Settings, *, listening: bool = False) -> Settings:
    """Open (creating if needed) and close the store once, before anything listens: if
    it cannot be opened, log one line naming it and why, and exit with code 2. Call it
    where no trio run is going on (a command line, a worker loading the app).

    With ``listening`` (``trioagg serve``, which knows the address it binds), return the
    settings with ``--auth auto`` settled for that address (:func:`~trioagg.keys.auth.settle_mode`),
    exiting the same way when a non-loopback address has no key to require: then a store
    that did not exist is not created (a server that cannot start leaves nothing behind)."""

    async def open_and_close() -> tuple[bool, bool]:
        """(whether the store exists, whether it holds a key)."""
        if listening and key_required_to_start(settings) and not await store_exists(settings):
            return False, False  # refused below, before anything is created
        store = await open_store(settings)
        try:
            return True, await store.any_api_key()
        finally:
            await store.aclose()

    configure_logging(settings.log_level)
    try:
        found, keys_exist = trio.run(open_and_close)
        if not listening:
            return settings
        return settle_mode(settings, keys_exist=keys_exist, store_exists=found)
    except ConfigError as error:
        exit_for_config(error)


def hypercorn_worker_settings() -> Settings:
    """The settings of a worker that hypercorn's command line starts with
    ``'trioagg.app:create_app()'``: from the ``TRIOAGG_*`` variables, after the store
    check; a bad variable or a store that cannot be opened ends the process at once
    with one line and exit code 2."""
    configure_logging("info")
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        exit_for_config(error)
    exit_unless_store_opens(settings)
    if multiprocessing.parent_process() is not None:
        # A hypercorn worker: its main process stops it through a shared event, and
        # SIGTERMs the workers still running as soon as one has exited, which would
        # kill this one in the middle of its drain. The drain has its own deadline.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return settings
