"""A new machine's first commands: the deployment blocks (README, docs/deploying.md) work
as written from a machine without the store or its folder, ``keys create --create-store``
makes the store a server then opens, and what refuses (a key command without a store, a server that
needs a key) says so in one line naming the next command, and creates nothing."""

from __future__ import annotations

import contextlib
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from click.testing import CliRunner

from trioagg.cli import main
from trioagg.core.settings import Settings
from trioagg.store import open_store, store_exists

from .conftest import SHARDED, fresh_schema, sql

ROOT = Path(__file__).parent.parent
#: The documents whose first block after this heading is the deployment's commands.
DEPLOYING = {"README.md": "## Deploying", "docs/deploying.md": "# Deploying"}


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def running_it_commands(document: str) -> list[tuple[int, list[str]]]:
    """(line, words) of each command of a document's deployment block, in order."""
    lines = (ROOT / document).read_text().splitlines()
    start = lines.index(DEPLOYING[document])
    opening = lines.index("```sh", start)
    commands = []
    for number in range(opening + 1, lines.index("```", opening + 1)):
        text = lines[number].strip()
        if text and not text.startswith("#"):
            assert not text.endswith("\\"), f"line {number + 1}: one line per command"
            commands.append((number + 1, shlex.split(text)))
    return commands


def _on_this_machine(words: list[str], root: Path) -> list[str]:
    """A documented command as this test runs it: the trioagg under test, absolute paths
    under ``root`` (the bare machine's /), and a free port instead of 8000."""
    words = [str(root / word.lstrip("/")) if word.startswith("/") else word for word in words]
    if words[1] == "serve":
        if "--port" in words:
            words[words.index("--port") + 1] = "0"
        else:
            words += ["--port", "0"]
    return [sys.executable, "-m", "trioagg", *words[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("document", DEPLOYING)
def test_the_deployment_block_works_as_written_on_a_bare_machine(
    server_process: Any, tmp_path: Path, document: str
) -> None:
    root = tmp_path / "machine"  # not even /var/lib/trioagg exists
    commands = running_it_commands(document)
    first, *servers = [words[:2] for _, words in commands]
    assert first == ["trioagg", "keys"]
    assert servers and all(words == ["trioagg", "serve"] for words in servers)
    secret = ""
    for line, words in commands:
        command = _on_this_machine(words, root)
        if words[1] == "keys":
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{document} line {line}: {done.stderr}"
            secret = done.stdout.strip()
            continue
        server = server_process(db=root / "var/lib/trioagg/events.db").start(command)
        assert server.url, f"{document} line {line}: {server.output}"
        local = re.sub(r"//[\d.]+:", "//127.0.0.1:", server.url)
        with httpx.Client(base_url=local, timeout=30) as client:
            assert client.get("/v1/keys").status_code == 401, f"{document} line {line}"
            assert client.get("/v1/keys", headers=_bearer(secret)).status_code == 200
        assert server.stop() == 0, f"{document} line {line}: {server.output}"


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["missing", "present"])
def test_a_start_refused_for_want_of_a_key_creates_nothing_and_names_what_does(
    server_process: Any, tmp_path: Path, folder: str
) -> None:
    db = tmp_path / "new" / "events.db"
    if folder == "present":
        db.parent.mkdir()
    flags = ("--host", "0.0.0.0", "--bucket", "5m", "--writers", "2")
    refused = server_process(*flags, "--log-level", "warning", db=db).start()
    assert refused.wait() == 2
    (line,) = refused.output.strip().splitlines()
    assert "trioagg cannot start" in line and "--auth off" in line
    assert db.parent.exists() == (folder == "present")
    assert not db.parent.exists() or list(db.parent.iterdir()) == [], "it left a store"

    named = re.search(r"\((trioagg keys create [^)]*)\)", line)
    assert named is not None, line
    made = _cli(*shlex.split(named[1].replace("NAME", "admin"))[1:])
    assert made.exit_code == 0, made.output
    started = server_process(*flags, "--log-level", "warning", db=db).start()
    assert started.url, started.output
    local = re.sub(r"//[\d.]+:", "//127.0.0.1:", started.url)
    answer = httpx.get(f"{local}/v1/keys", headers=_bearer(made.stdout.strip()))
    assert answer.status_code == 200
    assert started.stop() == 0


@pytest.mark.parametrize("command", [["create", "--name", "a", "--scope", "read"], ["list"]])
def test_a_key_command_without_a_store_is_one_line_exit_2_naming_create_store(
    tmp_path: Path, command: list[str]
) -> None:
    for db in (tmp_path / "other.db", tmp_path / "no" / "folder" / "other.db"):
        refused = _cli("keys", *command, "--db", str(db))
        assert refused.exit_code == 2, refused.output
        assert refused.output.splitlines() == [
            f"Error: no trioagg store at {db}: check --db, or create it with its first key "
            f"(trioagg keys create --name NAME --scope admin --db {db} --create-store, with "
            "the --bucket and --writers the server runs with where not the defaults)"
        ]
    assert list(tmp_path.iterdir()) == [], "a key command created something"


@pytest.mark.parametrize("db_url", ["sqlite", SHARDED, "postgres"], indirect=True)
async def test_create_store_makes_the_store_a_server_with_the_same_flags_opens(
    db_url: Any, tmp_path: Path
) -> None:
    db = str(db_url)
    if not db.startswith("postgresql://"):
        db = str(tmp_path / "deep" / "folder" / "events.db")  # its folder is made too
    writers = getattr(db_url, "flags", {}).get("writers", "1")
    flags = ("--db", db, "--bucket", "5m", "--writers", writers)

    def cli(*args: str) -> Any:
        return _cli("keys", "create", "--scope", "admin", *args)

    made = await trio.to_thread.run_sync(cli, "--name", "a", "--create-store", *flags)
    assert made.exit_code == 0, made.output
    assert made.stdout.startswith("tgk_")
    shards = ", 2 shard files" if writers == "2" else ""
    assert f"store {db} created (5m buckets{shards})" in made.stderr
    assert sql(db, "SELECT value FROM meta WHERE name = 'bucket_seconds'") == [("300",)]
    settings = Settings.from_text({"db": db, "bucket": "5m", "writers": writers})
    await (await open_store(settings)).aclose()  # what the server with the same flags does

    # An existing store is used as it is: nothing is made again, its settings stay.
    again = await trio.to_thread.run_sync(cli, "--name", "b", "--create-store", "--db", db)
    assert again.exit_code == 0, again.output
    assert f"store {db} created" not in again.stderr
    assert sql(db, "SELECT value FROM meta WHERE name = 'bucket_seconds'") == [("300",)]
    assert sql(db, "SELECT name FROM api_keys ORDER BY name") == [("a",), ("b",)]


async def test_whether_a_store_exists_is_told_without_creating_anything(
    tmp_path: Path, postgres_dsn: str
) -> None:
    missing = tmp_path / "no" / "trioagg.db"
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    for path in (missing, empty, other):
        assert not await store_exists(Settings(db=str(path)))
    assert not missing.parent.exists() and empty.read_bytes() == b""
    assert sql(other, "SELECT name FROM sqlite_master") == [("notes",)]

    schema, url = fresh_schema(postgres_dsn)
    try:
        assert not await store_exists(Settings(db=url))
        tables = f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{schema}'"
        assert sql(url, tables) == []
        for db in (str(tmp_path / "made.db"), url):
            await (await open_store(Settings(db=db))).aclose()
            assert await store_exists(Settings(db=db))
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
