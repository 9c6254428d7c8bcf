"""``trioagg keys create|list|revoke``: API keys, managed on the store itself.

The commands open the store named by ``--db`` (``TRIOAGG_DB``) directly, SQLite file
or PostgreSQL URL, and may run while servers use it: a new key works at once, and a
revoked one stops working within a few seconds on every server (their key cache's
lifetime, :data:`trioagg.keys.auth.CACHE_SECONDS`). See :mod:`trioagg.keys.admin`.

Only ``keys create --create-store`` creates a store (and a SQLite file's folder), and
only where ``--db`` names none: a mistyped ``--db`` must not get a new, empty store, and
an existing store keeps its settings. It creates it as a server starting on it would,
with the settings a store records when it is made (``--bucket``, and ``--writers``:
SQLite's shard files), so that the first command on a bare machine can be this one and
the server started next, with the same settings, opens the store.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import click
import trio

from ..core.errors import ConfigError
from ..core.events import TAG_VALUE_BYTES, TENANT_TAG
from ..core.settings import BUCKET_NAMES, Settings, env_name, flag_name, parse_duration
from ..ingest.decode import tag_value_problem

if TYPE_CHECKING:
    from ..store import Backend

# The store and auth modules (and the server's web framework, which auth imports) load
# in the commands that use them: every trioagg command imports this module, and they
# took trioagg ingest, query and the others 0.4 s to start.

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


def _store(db: str, new: Settings | None = None) -> Backend:
    """The backend of the store ``db`` names, once it is known to hold one; else exit 2
    with one line naming the command that makes it. ``new``: the settings to create it
    with (a SQLite file's folder too) where there is none; an existing store is used as
    it is (a server checks its own settings against the store's when it starts)."""
    from ..store import is_postgres, make_backend, open_store

    try:
        backend = make_backend(new or Settings(db=db))
    except ConfigError as error:  # settings no store can have (too many shard files)
        raise _Refused(str(error)) from None
    if backend.exists():
        return backend
    if new is None:
        raise _Refused(
            f"no trioagg store at {db}: check --db, or create it with its first key "
            f"(trioagg keys create --name NAME --scope admin --db {db} --create-store, with "
            "the --bucket and --writers the server runs with where not the defaults)"
        )
    if not is_postgres(db):
        folder = os.path.dirname(os.path.abspath(db))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            raise _Refused(f"cannot create the folder {folder} of {db}: {error.strerror}") from None

    async def open_and_close() -> None:  # as a server starting on it would
        await (await open_store(new)).aclose()

    try:
        trio.run(open_and_close)
    except ConfigError as error:
        raise _Refused(str(error)) from None
    shards = f", {backend.shards} shard files" if backend.shards > 1 else ""
    click.echo(f"store {db} created ({BUCKET_NAMES[new.bucket]} buckets{shards})", err=True)
    return backend


def _on_store(db: str, action: Callable[[Backend], Any], new: Settings | None = None) -> Any:
    """``action`` on the backend of ``db``, an existing store, or one made with the
    settings ``new`` (see :func:`_store`); a store that cannot do it is one clean line."""
    try:
        return action(_store(db, new))
    except click.ClickException:
        raise
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    except Exception as error:  # the driver's own words: a path or host the user gave
        raise click.ClickException(f"the store {db} cannot be used: {error}") from None


def _creation_option(name: str, help: str) -> Callable[[Any], Any]:
    """An option of ``keys create``: a setting that a store records when it is made, as
    the server's flag of the same name and variable (and its default) give it."""
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    default = field.metadata["text"]
    return click.option(
        flag_name(name),
        name,
        envvar=env_name(name),
        default=default,
        help=f"{help} [default: {default}; env: {env_name(name)}]",
    )


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
@click.option(
    "--create-store",
    is_flag=True,
    help="Create the store if --db names none (a SQLite file's folder too), with "
    "--bucket and --writers; an existing store is used as it is.",
)
@_creation_option("bucket", "Bucket width of the store --create-store makes: 1m, 5m, 15m or 1h.")
@_creation_option(
    "writers", "Writers of the store --create-store makes (on SQLite, its shard files)."
)
def create(
    name: str,
    scopes: Sequence[str],
    tenant: str | None,
    expires: str | None,
    db: str,
    create_store: bool,
    bucket: str,
    writers: str,
) -> None:
    """Create a key and print its secret, once: only its SHA-256 digest is stored."""
    from . import admin as api_keys

    try:
        chosen = api_keys.parse_scopes(scopes)
        lifetime = None if expires is None else parse_duration(expires)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    new = None
    if create_store:
        try:
            new = Settings.from_text({"db": db, "bucket": bucket, "writers": writers})
        except ConfigError as error:
            raise _Refused(str(error)) from None
    problem = None if tenant is None else tag_value_problem(tenant)
    if problem is not None:
        raise _Refused(
            f"--tenant must be a tag value, 1-{TAG_VALUE_BYTES} bytes of UTF-8, as the key "
            f"stamps {TENANT_TAG}=VALUE on every event it sends ({problem})"
        )
    secret = _on_store(
        db,
        lambda backend: api_keys.create_key(
            backend, name, chosen, tenant=tenant, lifetime=lifetime
        ),
        new,
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

    from . import admin as api_keys

    found: list[api_keys.ApiKey] = _on_store(db, api_keys.list_keys)
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
    from . import admin as api_keys
    from . import auth

    _on_store(db, lambda backend: api_keys.revoke_key(backend, name))
    click.echo(f"key {name!r} revoked; servers refuse it within {auth.CACHE_SECONDS:g} s", err=True)


COMMANDS: Final = (keys,)
