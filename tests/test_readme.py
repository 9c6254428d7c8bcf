"""The README's HTTP examples are true: every curl command in it is sent, in order, to a
real server on a fresh store, and every answer it shows (the ``# {...}`` lines right after
a command) must be the answer given.

The server runs as the README says its examples do: started as the Quick start starts it,
with the flags of its ``trioagg serve`` command.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trioagg.settings import Settings
from trioagg.store import open_store

from .conftest import StartServer, sql

README = Path(__file__).parent.parent / "README.md"
README_TEXT = README.read_text()
HOST = "localhost:8000"


@dataclass
class Example:
    line: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes | None
    answer: Any


def _commands(block: list[tuple[int, str]]) -> list[tuple[int, str, list[str]]]:
    """(line, command text, answer lines) for each curl command of a shell block."""
    found: list[tuple[int, str, list[str]]] = []
    index = 0
    while index < len(block):
        number, line = block[index]
        if not (line.startswith("printf ") or line.startswith("curl ")):
            index += 1
            continue
        text = line
        # a command goes on after a trailing backslash or pipe, or inside an open quote
        while text.rstrip().endswith(("\\", "|")) or text.count("'") % 2:
            index += 1
            text = text.rstrip().removesuffix("\\") + "\n" + block[index][1]
        index += 1
        answer: list[str] = []
        while index < len(block) and block[index][1].startswith("# "):
            comment = block[index][1][2:]
            if not answer and not comment.startswith(("{", "[")):
                break
            answer.append(comment)
            index += 1
            if _complete("\n".join(answer)):
                break
        found.append((number, text, answer))
    return found


def _complete(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _shell_blocks() -> list[list[tuple[int, str]]]:
    """(line number, line) of each ``sh`` code block of the README, in order."""
    lines = README_TEXT.splitlines()
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] | None = None
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if current is None and line.strip() == "```sh":
                current = []
            elif current is not None:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append((number, line))
    return blocks


def quick_start_flags() -> dict[str, str]:
    """The flags of the Quick start's ``trioagg serve``, as settings' text by field name;
    its address and store aside (the test's server has a free port and a fresh store)."""
    heading = README_TEXT.splitlines().index("## Quick start") + 1
    command = next(
        line
        for block in _shell_blocks()
        for number, line in block
        if number > heading and "trioagg serve" in line
    )
    words = shlex.split(command.split("trioagg serve", 1)[1])
    flags = dict(zip(words[::2], words[1::2], strict=True))
    assert all(flag.startswith("--") for flag in flags), f"Quick start: {command}"
    settings = {flag[2:].replace("-", "_"): value for flag, value in flags.items()}
    return {name: text for name, text in settings.items() if name not in ("db", "host", "port")}


def readme_examples() -> list[Example]:
    examples = []
    for block in _shell_blocks():
        for number, text, answer in _commands(block):
            examples.append(_example(number, text, answer))
    return examples


def _example(number: int, text: str, answer: list[str]) -> Example:
    stdin: bytes | None = None
    if "|" in text.split("curl ")[0]:
        printf, text = text.split("|", 1)
        (fmt,) = shlex.split(printf.strip().removeprefix("printf "))
        stdin = fmt.encode().decode("unicode_escape").encode()
    words = shlex.split(text.replace("\\\n", " "))
    assert words[0] == "curl", f"README line {number}: {text}"
    headers: dict[str, str] = {}
    body: bytes | None = None
    target = ""
    words = iter(words[1:])
    for word in words:
        if word == "-s":
            continue
        if word == "-H":
            name, value = next(words).split(":", 1)
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data-binary"):
            data = next(words)
            body = stdin if data == "@-" else data.encode()
        else:
            assert word.startswith(HOST), f"README line {number}: unexpected {word!r}"
            target = word.removeprefix(HOST)
    if body is not None:  # as curl does: -d without a type is a form
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    parsed = json.loads("\n".join(answer)) if answer else None
    return Example(number, "POST" if body is not None else "GET", target, headers, body, parsed)


EXAMPLES = readme_examples()


def test_the_readme_has_examples_with_answers() -> None:
    assert len([e for e in EXAMPLES if e.answer is not None]) >= 10


async def test_the_readme_examples_answer_what_it_shows(start_server: StartServer) -> None:
    server = await start_server(**quick_start_flags())
    for example in EXAMPLES:
        response = await server.client.request(
            example.method, example.target, headers=example.headers, content=example.body
        )
        where = f"README line {example.line}: {example.method} {example.target}"
        assert response.status_code < 300, f"{where}: {response.text}"
        if example.answer is not None:
            assert _exactly(response.json()) == _exactly(example.answer), (
                f"{where}: {response.text}"
            )


def _exactly(answer: Any) -> str:
    """``answer`` as JSON text, names sorted. It tells ``2`` from ``2.0`` and ``1`` from
    ``true``, which ``==`` on decoded JSON takes for equal but a reader of the README, or
    a typed client, sees differ."""
    return json.dumps(answer, sort_keys=True)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_the_postgresql_tables_are_those_the_readme_lists(db_url: str) -> None:
    listed = re.search(r"The store is created on first start \(tables ([^)]*)\)", README_TEXT)
    assert listed is not None, "the README's PostgreSQL section lists no tables"
    await (await open_store(Settings(db=db_url))).aclose()
    tables = sql(
        db_url,
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() ORDER BY table_name",
    )
    assert sorted(re.findall(r"`(\w+)`", listed[1])) == [name for (name,) in tables]
