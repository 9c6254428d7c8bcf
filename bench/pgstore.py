"""PostgreSQL stores for ``just bench --store postgres``: one fresh schema per measurement.

Every measurement of a trioagg server on PostgreSQL gets a schema of its own
(``CREATE SCHEMA bench_...``) and the server a DSN whose ``options`` set the
``search_path`` to it, so trioagg creates its tables there and no two
measurements share a row. After the server has stopped, the schema's
``rollups`` are counted like a SQLite store's (``SELECT sum(count), count(*)
FROM rollups``), then the schema is dropped.

The server to use: ``--pg-dsn``, else ``$TRIOAGG_BENCH_PG``, else
``postgresql://127.0.0.1:5432/test``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_DSN = "postgresql://127.0.0.1:5432/test"
ENV_DSN = "TRIOAGG_BENCH_PG"
SCHEMA_PREFIX = "bench_"
_SCHEMES = ("postgresql", "postgres")
_CONNECT_TIMEOUT_S = 5


class PostgresError(RuntimeError):
    """The PostgreSQL server cannot be used (unreachable, no rights, bad DSN)."""


def resolve_dsn(given: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``--pg-dsn``, else ``$TRIOAGG_BENCH_PG``, else the local default; checked to be a
    ``postgresql://`` URL (trioagg tells its stores apart by that prefix)."""
    environ = os.environ if environ is None else environ
    dsn = given or environ.get(ENV_DSN) or DEFAULT_DSN
    parts = urlsplit(dsn)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"--pg-dsn {dsn!r} is not a postgresql:// URL")
    if any(item.split("=", 1)[0] == "options" for item in parts.query.split("&") if item):
        raise ValueError(
            f"--pg-dsn {redact(dsn)} sets options=, which the harness needs for search_path"
        )
    return dsn


def new_schema_name(label: str = "") -> str:
    """A schema name no other run uses: ``bench_<pid>_<random>[_<label>]``."""
    tail = "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")[:24]
    name = f"{SCHEMA_PREFIX}{os.getpid()}_{secrets.token_hex(3)}"
    return f"{name}_{tail}" if tail else name


def schema_dsn(dsn: str, schema: str) -> str:
    """``dsn`` with ``options=-csearch_path=<schema>`` (URL-encoded), for the server."""
    if not schema.replace("_", "").isalnum():
        raise ValueError(f"unsafe schema name {schema!r}")
    option = "options=" + quote(f"-csearch_path={schema}", safe="-")
    base, _, fragment = dsn.partition("#")
    joined = f"{base}{'&' if '?' in base else '?'}{option}"
    return f"{joined}#{fragment}" if fragment else joined


def redact(dsn: str) -> str:
    """``dsn`` without its password (for logs and the JSON)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _connect(dsn: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
    except psycopg.Error as error:
        raise PostgresError(f"cannot connect to {redact(dsn)}: {error}") from error


def server_info(dsn: str) -> dict[str, Any]:
    """The server's version and the settings that decide what a commit costs; raises
    :class:`PostgresError` when it cannot be reached (checked before any measurement)."""
    with _connect(dsn) as conn:
        info: dict[str, Any] = {"dsn": redact(dsn)}
        info["version"] = conn.execute("SHOW server_version").fetchone()[0]
        for name in ("synchronous_commit", "fsync", "wal_sync_method", "max_connections"):
            info[name] = conn.execute(f"SHOW {name}").fetchone()[0]
        info["user"] = conn.execute("SELECT current_user").fetchone()[0]
        return info


def postmaster_pid(dsn: str) -> int | None:
    """The pid of the server's postmaster when it runs on this machine (the parent of
    our backend), so that its CPU can be counted as the store's; None otherwise."""
    try:
        with _connect(dsn) as conn:
            backend = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
            with open(f"/proc/{backend}/stat", "rb") as handle:
                parent = int(handle.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{parent}/comm", "rb") as handle:
                if not handle.read().startswith(b"postgres"):
                    return None
            return parent
    except (OSError, PostgresError, ValueError):
        return None


def create_schema(dsn: str, schema: str) -> None:
    schema_dsn(dsn, schema)  # validates the name
    with _connect(dsn) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')


def drop_schema(dsn: str, schema: str) -> None:
    schema_dsn(dsn, schema)
    with _connect(dsn) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def store_totals(dsn: str, schema: str) -> tuple[int, int]:
    """(events, rows) of the trioagg store in ``schema``: ``sum(count)`` and ``count(*)``
    of its ``rollups``, read on a connection whose search_path is that schema."""
    import psycopg

    with _connect(schema_dsn(dsn, schema)) as conn:
        try:
            events, rows = conn.execute(
                "SELECT coalesce(sum(count), 0), count(*) FROM rollups"
            ).fetchone()
        except psycopg.Error as error:
            raise PostgresError(f"cannot count the rollups of schema {schema}: {error}") from error
    return int(events), int(rows)
