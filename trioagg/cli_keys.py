"""``trioagg keys create|list|revoke``: API keys, managed on the store itself.

The commands open the store named by ``--db`` (``TRIOAGG_DB``) directly, SQLite file
or PostgreSQL URL, only if it exists (a server creates it), and may run while servers
use it: a new key works at once, and a
revoked one stops working within a few seconds on every server (their key cache's
lifetime, :data:`trioagg.auth.CACHE_SECONDS`). See :mod:`trioagg.auth`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any, Final

import click

from . import auth
from .errors import ConfigError
from .ingest import TAG_VALUE_BYTES, TENANT_TAG, tag_value_problem
from .settings import Settings, parse_duration
from .store import Backend
from .store import make_backend as _make_backend

_db = click.option(
    "--db",
    envvar="TRIOAGG_DB",
    default="trioagg.db",
    show_default=True,
    help="The store: a SQLite file or a postgresql:// URL. [env: TRIOAGG_DB]",
)


class _Refused(click.ClickException):
    """A command that cannot be done as asked: exit 2 with one line (no usage text)."""

    exit_code = 2


def _existing(backend: Backend, db: str) -> Backend:
    """``backend`` once it is known to hold a store; else exit 2 with one line. The key
    commands never create a store: a mistyped --db would get a new, empty one."""
    try:
        conn = backend.connect(write=False)  # read-only: opening creates nothing
        try:
            backend.ping(conn)  # the store's meta table
        finally:
            backend.close(conn)
    except ConfigError:
        raise
    except Exception as error:
        raise _Refused(
            f"no trioagg store at {db} ({error}): check --db, or start the server once "
            f"(trioagg serve --db {db}) to create the store"
        ) from None
    return backend


def _on_store(db: str, action: Callable[[Backend], Any]) -> Any:
    """``action`` on the backend of ``db``, an existing store; a store that cannot do it
    is one clean line."""
    try:
        return action(_existing(_make_backend(Settings(db=db)), db))
    except click.ClickException:
        raise
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the driver's own words: a path or host the user gave
        raise click.ClickException(f"the store {db} cannot be used: {error}") from None


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group()
def keys() -> None:
    """API keys: create, list, revoke (on the store, while servers run)."""


@keys.command()
@click.option("--name", required=True, help="A unique name, to list and revoke the key by.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="ingest (POST /v1/events), read (queries, the dashboard's data) or admin "
    "(everything, /metrics too); repeat or comma-separate for several.",
)
@click.option(
    "--tenant",
    help=f"Stamp {TENANT_TAG}=VALUE on every event sent, read only those; a tag value "
    f"(1-{TAG_VALUE_BYTES} bytes).",
)
@click.option("--expires", help="Lifetime, e.g. 90d, 12h [default: never].")
@_db
def create(
    name: str, scopes: Sequence[str], tenant: str | None, expires: str | None, db: str
) -> None:
    """Create a key and print its secret, once: only its SHA-256 digest is stored."""
    try:
        chosen = auth.parse_scopes(scopes)
        lifetime = None if expires is None else parse_duration(expires)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    problem = None if tenant is None else tag_value_problem(tenant)
    if problem is not None:
        raise _Refused(
            f"--tenant must be a tag value, 1-{TAG_VALUE_BYTES} bytes of UTF-8, as the key "
            f"stamps {TENANT_TAG}=VALUE on every event it sends ({problem})"
        )
    secret = _on_store(
        db, lambda backend: auth.create_key(backend, name, chosen, tenant=tenant, lifetime=lifetime)
    )
    click.echo(secret)
    click.echo(
        f"key {name!r} created ({','.join(chosen)}"
        + (f", tenant {tenant}" if tenant else "")
        + "); the secret above is shown only now: send it as 'Authorization: Bearer <key>'",
        err=True,
    )


@keys.command("list")
@_db
def list_(db: str) -> None:
    """Every key: name, scopes, tenant, created, last used, expiry, state; never a secret."""
    from rich.console import Console
    from rich.table import Table

    found: list[auth.ApiKey] = _on_store(db, auth.list_keys)
    table = Table()
    for column in ("name", "scopes", "tenant", "created", "last used", "expires", "state"):
        table.add_column(column)
    for key in found:
        table.add_row(
            key.name,
            ",".join(key.scopes),
            key.tenant or "",
            _when(key.created),
            _when(key.last_used),
            _when(key.expires),
            key.state(datetime.datetime.now(datetime.UTC).timestamp()),
        )
    Console(width=200).print(table)


@keys.command()
@click.argument("name")
@_db
def revoke(name: str, db: str) -> None:
    """Revoke the key NAME: every server refuses it within a few seconds."""
    _on_store(db, lambda backend: auth.revoke_key(backend, name))
    click.echo(f"key {name!r} revoked; servers refuse it within {auth.CACHE_SECONDS:g} s", err=True)


COMMANDS: Final = (keys,)
