"""The documentation's examples are true: every curl command of the README and of
the docs site (docs/, in the order of mkdocs.yml's nav) is sent, in order, to a real server
on a fresh store, and every answer it shows (the ``# {...}`` lines right after a command)
must be the answer given. The README's examples run on a server of their own, the docs
site's on one server, page after page, as a reader goes through them. The site itself
builds with ``mkdocs build --strict``, so no link is broken. Every Python example runs,
against a server of its own, and exits 0.

The servers run as the examples say they do: started with the flags of the document's
first ``trioagg serve`` command (the Quick start's).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from trioagg.core.settings import Settings
from trioagg.store import open_store

from .conftest import StartServer, sql

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
HOST = "localhost:8000"


def nav_pages() -> list[Path]:
    """The docs site's pages, in the order of mkdocs.yml's nav."""
    nav = (ROOT / "mkdocs.yml").read_text()
    return [DOCS / name for name in re.findall(r"^\s*- (?:[^\n]+: )?(\S+\.md)$", nav, re.M)]


@dataclass
class Example:
    where: str
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


def code_blocks(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """(language, its (line number, line)s) of each fenced code block of a document, in
    order; the language is ``""`` for a bare fence."""
    blocks: list[tuple[str, list[tuple[int, str]]]] = []
    current: list[tuple[int, str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = []
                blocks.append((line.strip().removeprefix("```"), current))
            else:
                current = None
        elif current is not None:
            current.append((number, line))
    return blocks


def _shell_blocks(text: str, language: str = "sh") -> list[list[tuple[int, str]]]:
    """(line number, line) of each code block of a document in ``language``, in order."""
    return [block for found, block in code_blocks(text) if found == language]


def quick_start_flags(document: str) -> dict[str, str]:
    """The flags of a document's first ``trioagg serve``, as settings' text by field name;
    its address and store aside (the test's server has a free port and a fresh store)."""
    command = next(
        line for block in _shell_blocks(document) for _, line in block if "trioagg serve" in line
    )
    words = shlex.split(command.split("trioagg serve", 1)[1])
    flags = dict(zip(words[::2], words[1::2], strict=True))
    assert all(flag.startswith("--") for flag in flags), f"Quick start: {command}"
    settings = {flag[2:].replace("-", "_"): value for flag, value in flags.items()}
    return {name: text for name, text in settings.items() if name not in ("db", "host", "port")}


def examples(*paths: Path) -> list[Example]:
    """The curl examples of these documents, in order."""
    found = []
    for path in paths:
        for block in _shell_blocks(path.read_text()):
            for number, text, answer in _commands(block):
                found.append(_example(f"{path.relative_to(ROOT)} line {number}", text, answer))
    return found


def _example(where: str, text: str, answer: list[str]) -> Example:
    stdin: bytes | None = None
    if "|" in text.split("curl ")[0]:
        printf, text = text.split("|", 1)
        (fmt,) = shlex.split(printf.strip().removeprefix("printf "))
        stdin = fmt.encode().decode("unicode_escape").encode()
    words = shlex.split(text.replace("\\\n", " "))
    assert words[0] == "curl", f"{where}: {text}"
    headers: dict[str, str] = {}
    body: bytes | None = None
    target = ""
    rest = iter(words[1:])
    for word in rest:
        if word == "-s":
            continue
        if word == "-H":
            name, value = next(rest).split(":", 1)
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data-binary"):
            data = next(rest)
            body = stdin if data == "@-" else data.encode()
        else:
            assert word.startswith(HOST), f"{where}: unexpected {word!r}"
            target = word.removeprefix(HOST)
    if body is not None:  # as curl does: -d without a type is a form
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    parsed = json.loads("\n".join(answer)) if answer else None
    return Example(where, "POST" if body is not None else "GET", target, headers, body, parsed)


#: (the documents whose first ``trioagg serve`` starts the server, their examples)
SEQUENCES = {"README": [README], "docs": nav_pages()}


def test_the_documents_have_examples_with_answers() -> None:
    found = examples(README, *nav_pages())
    assert len([e for e in found if e.answer is not None]) >= 10


@pytest.mark.parametrize("sequence", SEQUENCES)
async def test_the_examples_answer_what_they_show(start_server: StartServer, sequence: str) -> None:
    paths = SEQUENCES[sequence]
    server = await start_server(**quick_start_flags("\n".join(p.read_text() for p in paths)))
    for example in examples(*paths):
        response = await server.client.request(
            example.method, example.target, headers=example.headers, content=example.body
        )
        where = f"{example.where}: {example.method} {example.target}"
        assert response.status_code < 300, f"{where}: {response.text}"
        if example.answer is not None:
            assert _exactly(response.json()) == _exactly(example.answer), (
                f"{where}: {response.text}"
            )


def _exactly(answer: Any) -> str:
    """``answer`` as JSON text, names sorted. It tells ``2`` from ``2.0`` and ``1`` from
    ``true``, which ``==`` on decoded JSON takes for equal but a reader of the docs, or
    a typed client, sees differ."""
    return json.dumps(answer, sort_keys=True)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_the_postgresql_tables_are_those_the_docs_list(db_url: str) -> None:
    text = "\n".join(path.read_text() for path in [README, *nav_pages()])
    listed = re.search(r"The store is created on first start \(tables ([^)]*)\)", text)
    assert listed is not None, "the docs' PostgreSQL section lists no tables"
    await (await open_store(Settings(db=db_url))).aclose()
    tables = sql(
        db_url,
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() ORDER BY table_name",
    )
    assert sorted(re.findall(r"`(\w+)`", listed[1])) == [name for (name,) in tables]


#: Pages whose Python is not trioagg's to run: the discussion note's repro of a hypercorn
#: bug, which serves a bare Quart app and kills it.
NOT_EXAMPLES = {DOCS / "hypercorn-trio.md"}


def python_examples() -> list[tuple[str, str]]:
    """(where, code) of each ``python`` block of the README and the docs site."""
    return [
        (f"{path.relative_to(ROOT)} line {block[0][0]}", "\n".join(line for _, line in block))
        for path in [README, *nav_pages()]
        if path not in NOT_EXAMPLES
        for block in _shell_blocks(path.read_text(), "python")
    ]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), python_examples(), ids=lambda value: value[:24])
async def test_the_python_examples_run(start_server: StartServer, where: str, code: str) -> None:
    server = await start_server(statsd="127.0.0.1:0")  # the StatsD example's 8125
    assert server.app.service.statsd is not None
    statsd_port = server.app.service.statsd.address.rsplit(":", 1)[1]
    script = code.replace("http://127.0.0.1:8000", server.url).replace("8125", statsd_port)
    assert script != code, f"{where}: no server address to point at the test's server"
    before = (await server.client.get("/v1/status")).json()
    done = await trio.run_process(
        [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == 0, f"{where}: {done.stderr.decode()}"
    # a client hands refusals to on_error and exits 0: the server says whether it took all
    after = (await server.client.get("/v1/status")).json()
    assert after["events_rejected"] == before["events_rejected"], f"{where}: events refused"
    assert after["events_committed"] > before["events_committed"], f"{where}: nothing stored"


def test_every_page_is_in_the_nav() -> None:
    assert sorted(DOCS.rglob("*.md")) == sorted(nav_pages())


def test_the_readme_links_to_files_that_exist() -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to {target}, which is missing"


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (it is in the dev extra: pip install -e '.[dev]')")
    built = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
