"""``trioagg serve``: run the app on hypercorn's trio worker, in this process.

Each flag comes from a field of :class:`~trioagg.settings.Settings` and can
also be set with its ``TRIOAGG_*`` variable. SIGTERM and SIGINT start a
graceful shutdown: hypercorn stops accepting and finishes in-flight
requests, then the writer drains its channel and commits; the exit code is 0.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
import trio
from hypercorn.utils import LifespanFailureError

from . import __version__
from .app import WriterCrashed, create_app, exit_unless_store_opens
from .cli_keys import COMMANDS as _KEY_COMMANDS
from .cli_tools import COMMANDS as _CLIENT_COMMANDS
from .errors import ConfigError
from .serving import run_server
from .settings import Settings, env_name, flag_name


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
