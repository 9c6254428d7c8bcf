"""What the client and the command line load: nothing of the server.

Importing ``trioagg.client`` took 0.93 s when it loaded Quart, hypercorn and the
sketch library (issue 24); these tests read the modules a fresh interpreter
imported (``-X importtime`` lists each), not a timer, which the machine's load
would make flaky.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

#: What only the server needs: its frameworks, metrics, sketches and store drivers.
SERVER_PACKAGES = (
    "quart",
    "quart_trio",
    "quart_cors",
    "flask",
    "werkzeug",
    "hypercorn",
    "prometheus_client",
    "datasketches",
    "numpy",
    "psycopg",
    "sqlite3",
    "google.protobuf",
    "opentelemetry",
)
#: The server's own modules (and those only it uses).
SERVER_MODULES = (
    "trioagg.app",
    "trioagg.keys.auth",
    "trioagg.http.dashboard",
    "trioagg.http.edges",
    "trioagg.service.metrics",
    "trioagg.http.openapi",
    "trioagg.ingest.otlp",
    "trioagg.query.aggregates",
    "trioagg.query.readcache",
    "trioagg.core.rollup",
    "trioagg.server.serving",
    "trioagg.ingest.statsd",
    "trioagg.store",
    "trioagg.server.supervisor",
    "trioagg.ingest.writer",
)
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ( *)(\S+)$", re.MULTILINE)


def imported(*args: str) -> set[str]:
    """The modules ``python -X importtime ARGS`` imported, as its stderr lists them."""
    ran = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {name for _, name in _IMPORTED.findall(ran.stderr)}


def of(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    """Those of ``modules`` that are one of ``packages`` or inside one."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.slow
def test_importing_the_client_loads_only_the_client() -> None:
    modules = imported("-c", "from trioagg.client import AsyncClient, Client")
    assert "httpx" in modules and "trioagg.client" in modules  # the listing was read
    assert of(modules, SERVER_PACKAGES + SERVER_MODULES) == []
    # The sync Client loads trio when one is made: an AsyncClient may run under asyncio.
    assert of(modules, ("trio",)) == []
    assert of(modules, ("trioagg",)) == [
        "trioagg",
        "trioagg.client",
        "trioagg.client.answers",
        "trioagg.client.clients",
        "trioagg.client.errors",
        "trioagg.client.exits",
        "trioagg.core",
        "trioagg.core.answers",
        "trioagg.core.stats",
    ]


@pytest.mark.slow
def test_the_command_line_loads_the_server_only_to_serve() -> None:
    for args in (["--version"], ["--help"], ["query", "--help"], ["keys", "--help"]):
        modules = imported("-m", "trioagg", *args)
        assert "trioagg.cli" in modules and "click" in modules
        assert of(modules, SERVER_PACKAGES + SERVER_MODULES) == [], args
