"""The tests whose times come from tests/clock.py pass at any hour of the day.

``test_the_wall_clock_tests_pass_at`` runs them again (the ``wall_clock`` mark, less the
``slow`` tests and this module's, on SQLite alone: the hour is the test's business, not
the store's) in a child pytest under libfaketime, which moves the clock of that
process, and so of the servers it runs and of ``time.time()`` in its tests, to yesterday
at 00:05 and at 23:50 UTC. Just after midnight, events that run past the whole days
they start on lie ahead of the server by more than ``max_future``; just before it, the
day is nearly over.
``test_only_the_clock_reads_the_wall_clock`` keeps every read of the wall clock in
tests/clock.py, so that the ``wall_clock`` mark finds every test that takes one.

libfaketime moves the monotonic clock too: with ``FAKETIME_DONT_FAKE_MONOTONIC`` its
0.9.10 (Debian 12) refuses ``time.sleep`` with EINVAL and slows the servers tenfold.
It does not intercept ``sem_clockwait``, on which a Python thread waiting with a
timeout would wait for ever: the child runs under a deadline. Without libfaketime the
check is skipped saying so, and fails where ``TRIOAGG_REQUIRE_FAKETIME`` is set (as
``.ci/run`` does, having installed Debian's ``libfaketime``).
"""

from __future__ import annotations

import ast
import datetime
import glob
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import clock

THIS = Path(__file__).resolve()
ROOT = THIS.parent.parent
TESTS = ROOT / "tests"
NO_FAKETIME = (
    "NO LIBFAKETIME: install Debian's libfaketime (apt-get install libfaketime) or point "
    "TRIOAGG_LIBFAKETIME at libfaketime.so.1, so that the wall-clock tests run at other hours"
)


def libfaketime() -> str:
    """The path of libfaketime.so.1, or skip (fail under TRIOAGG_REQUIRE_FAKETIME)."""
    found = os.environ.get("TRIOAGG_LIBFAKETIME") or next(
        iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None
    )
    if found and os.path.exists(found):
        return found
    if os.environ.get("TRIOAGG_REQUIRE_FAKETIME"):
        pytest.fail(NO_FAKETIME + " (TRIOAGG_REQUIRE_FAKETIME is set)")
    pytest.skip(NO_FAKETIME)


def shifted_to(hour: str) -> tuple[float, dict[str, str]]:
    """Yesterday (UTC) at ``hour``, and the environment whose clock starts there."""
    yesterday = datetime.datetime.fromtimestamp(clock.now(), datetime.UTC).date()
    yesterday -= datetime.timedelta(days=1)
    moment = datetime.datetime.fromisoformat(f"{yesterday}T{hour}:00+00:00").timestamp()
    preload = " ".join(filter(None, [libfaketime(), os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "LD_PRELOAD": preload, "FAKETIME": f"{moment - clock.now():+.0f}"}
    return moment, env


@pytest.mark.slow
@pytest.mark.parametrize("hour", ["00:05", "23:50"])
def test_the_wall_clock_tests_pass_at(hour: str) -> None:
    moment, env = shifted_to(hour)
    seen = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(float(seen.stdout) - moment) < 60, f"libfaketime did not move the clock: {seen}"
    command = [sys.executable, "-m", "pytest", "-m", "wall_clock and not slow"]
    command += ["--store", "sqlite", "-n", "0", "-p", "no:cacheprovider", "-q"]
    # Only the modules that import the clock: collecting the whole suite to keep them
    # took a third of the child's start (test_the_clock_importers_are_the_marked_modules
    # keeps this list the one the mark finds). Not this one: it imports the clock to
    # shift it, and its other tests read source files, never the time (one of them
    # imported every test module again, 2-4 s of each child's CPU).
    command += [str(path.relative_to(ROOT)) for path in clock_importers() if path != THIS]
    ran = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    # Exit 5 (no test ran) fails too: the mark must select the tests it is for.
    status = ran.returncode
    assert status == 0, f"at {hour} UTC:\n{ran.stdout[-20_000:]}\n{ran.stderr[-5000:]}"


def imports_the_clock(tree: ast.AST) -> bool:
    """Whether a test module imports tests/clock.py (``from . import clock``), which
    is what makes conftest.py mark its tests ``wall_clock``."""
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module in (None, "tests")
        and any(alias.name == "clock" and alias.asname is None for alias in node.names)
        for node in ast.walk(tree)
    )


def clock_importers() -> list[Path]:
    """The test modules that import tests/clock.py."""
    return [
        path
        for path in sorted(TESTS.glob("test_*.py"))
        if imports_the_clock(ast.parse(path.read_text(), str(path)))
    ]


def test_the_clock_importers_are_the_marked_modules() -> None:
    """The modules the child run is given are those whose tests carry the mark: each
    module whose ``clock`` is tests/clock.py (what conftest.py marks), no other."""
    marked = {
        path
        for path in sorted(TESTS.glob("test_*.py"))
        if getattr(importlib.import_module(f"tests.{path.stem}"), "clock", None) is clock
    }
    assert set(clock_importers()) == marked
    assert Path(__file__) in marked and len(marked) > 5


def wall_clock_reads(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Where ``tree`` reads the wall clock itself, or takes names out of tests/clock.py
    (the ``wall_clock`` mark finds the modules that import the module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.module == "time" and {a.name for a in node.names} & {"time", "time_ns"}:
                yield node.lineno, "from time import time"
            if node.module == "clock" or (node.module or "").endswith(".clock"):
                yield node.lineno, "from .clock import ...: import the module (from . import clock)"
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else None
        if name in ("time", "time_ns") and owner_name == "time":
            yield node.lineno, f"time.{name}()"
        elif name in ("now", "utcnow", "today") and owner_name != "clock":
            yield node.lineno, f".{name}()"
        elif name in ("gmtime", "localtime", "ctime", "asctime") and not node.args:
            yield node.lineno, f"{name}() of now"


def test_only_the_clock_reads_the_wall_clock() -> None:
    found = [
        f"{path.name}:{line}: {what}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name != "clock.py"
        for line, what in wall_clock_reads(ast.parse(path.read_text(), str(path)))
    ]
    assert found == [], "read the wall clock through tests/clock.py:\n" + "\n".join(found)


def test_the_guard_finds_each_way_of_reading_the_clock() -> None:
    source = """
import time, datetime
from time import time as now
from .clock import now
time.time()
datetime.datetime.now(datetime.UTC)
datetime.date.today()
time.gmtime()
clock.now()
time.gmtime(0)
time.monotonic()
"""
    assert sorted(line for line, _ in wall_clock_reads(ast.parse(source))) == [3, 4, 5, 6, 7, 8]
