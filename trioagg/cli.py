"""``trioagg serve``: run the app on hypercorn's trio worker, in this process.

Each flag comes from a field of :class:`~trioagg.settings.Settings` and can
also be set with its ``TRIOAGG_*`` variable. SIGTERM and SIGINT start a
graceful shutdown: hypercorn stops accepting and finishes in-flight
requests, then the writer drains its channel and commits; the exit code is 0.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.utils import LifespanFailureError

from . import __version__
from .app import TrioaggApp, WriterCrashed, create_app, exit_unless_store_opens, log
from .cli_keys import COMMANDS as _KEY_COMMANDS
from .cli_tools import COMMANDS as _CLIENT_COMMANDS
from .errors import ConfigError
from .settings import Settings, env_name, flag_name

# Room between the end of the drain and hypercorn's cancelling of the lifespan.
_SHUTDOWN_MARGIN_SECONDS = 10


@click.group()
@click.version_option(__version__, prog_name="trioagg")
def main() -> None:
    """trioagg: events in over HTTP, exact roll-ups out."""


for _command in (*_CLIENT_COMMANDS, *_KEY_COMMANDS):  # ingest, query, series, top; keys
    main.add_command(_command)


def _setting_options(command: Any) -> Any:
    for field in reversed(dataclasses.fields(Settings)):
        command = click.option(
            flag_name(field.name),
            field.name,
            envvar=env_name(field.name),
            default=None,
            metavar="TEXT",
            help=f"{field.metadata['help']} [default: {field.metadata['text']}; "
            f"env: {env_name(field.name)}]",
        )(command)
    return command


@main.command()
@_setting_options
def serve(**values: str | None) -> None:
    """Start the service (hypercorn, trio worker) on the embedded SQLite store."""
    try:
        settings = Settings.from_text({k: v for k, v in values.items() if v is not None})
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    settings = exit_unless_store_opens(settings, listening=True)
    try:
        trio.run(run_server, create_app(settings))
    except BaseExceptionGroup as group:
        if group.subgroup(WriterCrashed) is not None:
            sys.exit(1)  # logged; a supervisor should restart the service
        if group.subgroup(LifespanFailureError) is None:
            raise
        sys.exit(2)  # the app has logged why it could not start


async def run_server(
    app: TrioaggApp,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (default: SIGTERM or SIGINT), then
    shut down gracefully. ``task_status`` receives the bound URLs."""
    config = Config()
    config.bind = [f"{app.settings.host}:{app.settings.port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.keep_alive_timeout = app.settings.keep_alive_timeout
    config.certfile = app.settings.certfile
    config.keyfile = app.settings.keyfile
    # Requests in flight may wait for their commit, and the drain must end by itself
    # (drain_timeout) before hypercorn would cancel it.
    config.graceful_timeout = app.settings.drain_timeout
    config.shutdown_timeout = app.settings.drain_timeout + _SHUTDOWN_MARGIN_SECONDS
    if shutdown_trigger is not None:
        await hypercorn_serve(
            app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
        )
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def until_signal() -> None:
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                return

        await hypercorn_serve(app, config, shutdown_trigger=until_signal, task_status=task_status)
