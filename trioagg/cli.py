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
from .core.errors import ConfigError
from .core.settings import Settings, env_name, flag_name


class _Commands(click.Group):
    """The group, whose client and key commands load when one is asked for or listed.

    ``trioagg serve`` then never imports them, nor httpx and the client under them
    (about 0.1 s of each server process's start, of which a test suite starts
    hundreds), and ``trioagg --version`` loads neither them nor trio.
    """

    loaded = False

    def load(self) -> None:
        """Add the client and key commands (ingest, query, series, top; keys), once."""
        if self.loaded:
            return
        from .client.tools import COMMANDS as client_commands
        from .keys.commands import COMMANDS as key_commands

        for command in (*client_commands, *key_commands):
            self.add_command(command)
        self.loaded = True

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self.load()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load()
        return super().list_commands(ctx)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="trioagg")
def main() -> None:
    """trioagg: events in over HTTP, exact roll-ups out."""


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
