"""The ``trioagg`` command line: ``serve``, and the client and key commands.

``trioagg serve`` runs the service in this process (:mod:`trioagg.server.serving`), or
with ``--workers N`` in N worker processes under a supervisor
(:mod:`trioagg.server.supervisor`). Each flag comes from a field of
:class:`~trioagg.core.settings.Settings` and can also be set with its ``TRIOAGG_*``
variable. SIGTERM and SIGINT start a graceful shutdown: no new connections,
idle ones closed, requests under way answered, then the writers drain their
channels and commit; the exit code is 0.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click

from . import __version__
from .client.tools import COMMANDS as _CLIENT_COMMANDS
from .core.errors import ConfigError
from .core.settings import Settings, env_name, flag_name
from .keys.commands import COMMANDS as _KEY_COMMANDS


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
            metavar=field.metadata["metavar"],
            help=f"{field.metadata['help']} [default: {field.metadata['text']}; "
            f"env: {env_name(field.name)}]",
        )(command)
    return command


@main.command()
@_setting_options
def serve(**values: str | None) -> None:
    """Start the service: on a SQLite file (created if missing) or a PostgreSQL URL."""
    try:
        settings = Settings.from_text({k: v for k, v in values.items() if v is not None})
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    # The server's modules load here, not with the client commands.
    from .ingest.statsd import open_socket
    from .server.process import exit_for_config, exit_unless_store_opens
    from .server.serving import open_sockets, run_process
    from .server.supervisor import supervise

    try:
        # Listening first: a taken port is one line, before the store is made or opened.
        sockets = open_sockets(settings)
        statsd = None if settings.statsd is None else open_socket(settings.statsd)
    except ConfigError as error:
        exit_for_config(error)
    settings = exit_unless_store_opens(settings, listening=True)
    if settings.workers > 1:
        sys.exit(supervise(settings, sockets, statsd))
    sys.exit(run_process(settings, sockets=sockets, statsd=statsd))
