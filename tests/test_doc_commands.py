"""The documentation's shell commands run as written: every command of a shell block
(```sh, or a bare fence) of the README and the docs site that runs ``trioagg`` (after
any ``NAME=value`` settings, or at the end of a pipe) or ``wrk`` is run by a test, and
exits 0. A command no runner takes fails :func:`test_every_documented_command_is_run`,
so no example can be added without being run.

The runners change only what cannot be literal on a test machine, each saying so where
it does: the server's address (a free port; the CLI's is given by ``TRIOAGG_URL``, as
the docs say it may be), a PostgreSQL URL, the absolute paths of a deployment (under a
folder standing for the machine's /), and wrk's duration. ``trioagg`` is the package
under test, through a ``trioagg`` script of the test's own first on the ``PATH``.
The deployment blocks of the README and docs/deploying.md are run by
tests/test_first_run.py, whose own reading of them this file uses.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioagg.core.settings import Settings
from trioagg.store import open_store

from .conftest import StartServer, fresh_schema
from .test_first_run import DEPLOYING, _on_this_machine, running_it_commands
from .test_readme import README, ROOT, code_blocks, nav_pages

#: A command's first word after its ``NAME=value`` settings, or trioagg after a pipe.
RUNS = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(trioagg|wrk)\s|\|\s*trioagg\s")


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str  # as written, continuation lines and comments included

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)} line {self.line}"

    @property
    def words(self) -> list[str]:
        """Its words after its ``NAME=value`` settings."""
        words = shlex.split(self.text, comments=True)
        return words[len(self.settings) :]

    @property
    def subcommand(self) -> str:
        """The word after its ``trioagg`` (also at a pipe's end); ``""`` for none."""
        words = [*self.words, ""]
        return words[words.index("trioagg") + 1] if "trioagg" in words else ""

    @property
    def settings(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for word in shlex.split(self.text, comments=True):
            if not re.match(r"[A-Z_]+=", word):
                break
            name, value = word.split("=", 1)
            found[name] = value
        return found


def documented_commands() -> list[Command]:
    """The commands of the README's and the docs site's shell blocks that run trioagg or wrk."""
    found = []
    for path in [README, *nav_pages()]:
        for language, block in code_blocks(path.read_text()):
            if language not in ("sh", ""):
                continue
            index = 0
            while index < len(block):
                number, text = block[index]
                while text.rstrip().endswith("\\"):
                    index += 1
                    text += "\n" + block[index][1]
                index += 1
                if RUNS.search(text.lstrip()):
                    found.append(Command(path, number, text.strip()))
    return found


def runner(command: Command) -> str | None:
    """The name of the test that runs ``command``, None for none."""
    document = str(command.path.relative_to(ROOT))
    if document in DEPLOYING and command.line in [n for n, _ in running_it_commands(document)]:
        return "test_first_run"
    if command.words[0] == "wrk":
        return "wrk"
    return {
        "serve": "serve",
        "keys": "keys",
        "ingest": "client",
        "query": "client",
        "series": "client",
        "top": "client",
    }.get(command.subcommand)


def taken_by(name: str) -> dict[Path, list[Command]]:
    """The commands ``name`` runs, by page, in order."""
    pages: dict[Path, list[Command]] = {}
    for command in documented_commands():
        if runner(command) == name:
            pages.setdefault(command.path, []).append(command)
    return pages


def test_every_documented_command_is_run() -> None:
    found = documented_commands()
    assert len(found) >= 15, [command.where for command in found]
    missed = [f"{c.where}: {c.text}" for c in found if runner(c) is None]
    assert not missed, "commands no test runs (add a runner in this file):\n" + "\n".join(missed)


def _shell(folder: Path, **env: str) -> dict[str, str]:
    """The environment the documented commands run in: ``trioagg`` the package under test."""
    bin_folder = folder / "bin"
    bin_folder.mkdir(exist_ok=True)
    script = bin_folder / "trioagg"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m trioagg "$@"\n')
    script.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        **env,
    }


async def _run(command: Command, text: str, cwd: Path, env: dict[str, str]) -> str:
    done = await trio.run_process(
        ["bash", "-e", "-o", "pipefail", "-c", text],
        cwd=cwd,
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = done.stdout.decode()
    assert done.returncode == 0, f"{command.where}: {text}\n{output}{done.stderr.decode()}"
    return output


def _client_files(folder: Path) -> int:
    """The files docs/client.md's commands read, shaped as its text says; the events
    they hold, all under ``checkout.``. events.ndjson: events of now (the reads without
    --from look at the last 24 hours); sales.csv: the columns its ``--key name --ts when
    ...`` names."""
    ndjson = [
        {"key": "checkout.completed", "value": 42.5, "tags": {"region": "eu"}},
        {"key": "checkout.completed", "value": 12, "tags": {"region": "us"}},
        {"key": "checkout.started"},
    ]
    (folder / "events.ndjson").write_text("".join(json.dumps(e) + "\n" for e in ndjson))
    (folder / "sales.csv").write_text(
        "ref,name,when,amount,zone\n"
        "s1,checkout.completed,2026-11-24T10:05:00Z,30,eu\n"
        "s2,checkout.completed,2026-11-24T11:00:00Z,7.5,us\n"
    )
    day = b'{"key": "checkout.completed", "ts": "2026-11-24T09:00:00Z", "value": 1}\n'
    (folder / "day.ndjson.gz").write_bytes(gzip.compress(day))
    return len(ndjson) + 2 + 1


#: The answers of a read that found nothing, as tables, JSON and CSV (the header alone).
EMPTY = re.compile(r'no data|no keys|"results":\s*\[\]|\Akey,[^\n]*\n?\Z')


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_cli_commands_run_against_a_server(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server()
    events = _client_files(tmp_path)
    # the test's server has a free port: TRIOAGG_URL points the commands at it
    env = _shell(tmp_path, TRIOAGG_URL=server.url)
    for page, commands in taken_by("client").items():
        for command in commands:
            if command.subcommand == "ingest":
                await _run(command, command.text, tmp_path, env)

        async def read(command: Command) -> None:
            output = await _run(command, command.text, tmp_path, env)
            assert not EMPTY.search(output), f"{command.where}: {output}"

        async with trio.open_nursery() as reads:  # each reads what every ingest stored
            for command in commands:
                if command.subcommand != "ingest":
                    reads.start_soon(read, command)
        status = (await server.client.get("/v1/status")).json()
        assert status["events_committed"] == events, f"{page}: {status}"


@pytest.mark.slow
async def test_the_key_commands_run_on_the_default_store(tmp_path: Path) -> None:
    env = _shell(tmp_path)
    for page, commands in taken_by("keys").items():
        folder = tmp_path / page.stem
        folder.mkdir()
        await (await open_store(Settings(db=str(folder / "trioagg.db")))).aclose()
        outputs = [await _run(command, command.text, folder, env) for command in commands]
        assert outputs[0].startswith("tgk_"), f"{commands[0].where}: {outputs[0]}"


def test_the_serve_commands_serve_and_stop(
    server_process: Any, postgres_dsn: str, tmp_path: Path
) -> None:
    import psycopg

    for commands in taken_by("serve").values():
        for command in commands:
            # each command on a machine of its own: its working directory too, where a
            # relative --db (the default ./trioagg.db) is
            root = tmp_path / f"machine-{command.path.stem}-{command.line}"
            root.mkdir(parents=True, exist_ok=True)
            # the deployment's folders, which its text has you make, under root
            for word in command.words:
                if word.startswith("/"):
                    (root / word.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            env = dict(command.settings)
            schemas = []
            for name, value in env.items():
                if value.startswith("postgresql://"):  # the test's PostgreSQL for the doc's
                    schema, env[name] = fresh_schema(postgres_dsn)
                    schemas.append(schema)
            try:
                process = server_process(db=root / "unused.db", env=env)
                server = process.start(_on_this_machine(command.words, root), cwd=root)
                assert server.url, f"{command.where}: {server.output}"
                local = re.sub(r"//[\d.]+:", "//127.0.0.1:", server.url)
                assert httpx.get(f"{local}/readyz", timeout=30).status_code == 200
                assert server.stop() == 0, f"{command.where}: {server.output}"
            finally:
                with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                    for schema in schemas:
                        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_wrk_command_loads_a_server(start_server: StartServer) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (Debian package wrk): its documented command not run")
    server = await start_server()
    for commands in taken_by("wrk").values():
        for command in commands:
            # the test's server for the doc's port 8000; 1 s of load, not 8, for time
            text = command.text.replace("http://127.0.0.1:8000", server.url)
            text = text.replace("-d 8s", "-d 1s")
            assert text.count(server.url) == 1 and "-d 1s" in text, command.where
            output = await _run(command, text, ROOT, dict(os.environ))
            assert "Non-2xx" not in output, f"{command.where}: {output}"
    status = (await server.client.get("/v1/status")).json()
    assert status["events_committed"] > 0, status
