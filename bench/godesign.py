"""The seed's Go design as a baseline: finding Debian's Go toolchain, building, running.

``bench/goseed/main.go`` is the design trioagg replaces, written as the seed
describes it (Gin, go-sqlite3, one bounded channel, one writer goroutine that
pre-aggregates what is waiting up to ``batch_size`` and commits it, answering
``202`` before the commit). It is built at run time, into the bench's work
directory, from Debian packages only (``GOPATH=/usr/share/gocode``,
``GO111MODULE=off``: no module download). When the toolchain or a package is
missing, the baseline is skipped with one line naming the packages to install.

Because the Go design answers before it commits, its events/s in the bench are
*committed* events/s: the events it acknowledged divided by the phase's time
plus the drain after SIGTERM (:func:`committed_rate`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

#: the app name of the Go design in measurements, rows and the JSON
APP = "go"
SOURCE = Path(__file__).resolve().parent / "goseed"
GOPATH = Path("/usr/share/gocode")
#: what each Debian package provides, as the build needs it
PACKAGES = (
    ("golang-go", "go"),
    ("golang-github-gin-gonic-gin-dev", "src/github.com/gin-gonic/gin"),
    ("golang-github-mattn-go-sqlite3-dev", "src/github.com/mattn/go-sqlite3"),
    ("gcc", "gcc"),  # go-sqlite3 is cgo
)
#: trioagg's own defaults (trioagg/core/settings.py), so that both batch alike
BATCH_SIZE = 10_000
QUEUE_SIZE = 1_024


class GoUnavailable(RuntimeError):
    """The Go design cannot be built here; the message is the one line to print."""


def missing_packages(
    gopath: Path = GOPATH, which: Callable[[str], str | None] = shutil.which
) -> list[str]:
    """The Debian packages the build needs and this machine lacks."""
    missing = []
    for package, needs in PACKAGES:
        found = which(needs) if "/" not in needs else (gopath / needs).is_dir()
        if not found:
            missing.append(package)
    return missing


def skip_line(missing: list[str]) -> str:
    """The one line a run prints when it cannot build the Go design."""
    return (
        "Go design baseline skipped: missing Debian package(s) "
        f"{', '.join(missing)} (apt-get install {' '.join(missing)})"
    )


def build(workdir: Path, gopath: Path = GOPATH) -> Path:
    """Compile ``bench/goseed`` into ``workdir``; :class:`GoUnavailable` if it cannot."""
    missing = missing_packages(gopath)
    if missing:
        raise GoUnavailable(skip_line(missing))
    binary = workdir / "goseed"
    env = dict(os.environ, GOPATH=str(gopath), GO111MODULE="off", CGO_ENABLED="1")
    env.setdefault("GOFLAGS", "")
    try:
        subprocess.run(
            ["go", "build", "-o", str(binary), "."],
            cwd=SOURCE,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as error:
        tail = " | ".join((error.stderr or "").strip().splitlines()[-3:])
        raise GoUnavailable(f"Go design baseline skipped: go build failed: {tail}") from error
    except subprocess.TimeoutExpired as error:
        raise GoUnavailable("Go design baseline skipped: go build took over 600 s") from error
    return binary


def command(binary: Path | str, db: Path | str, sync: str = "full") -> list[str]:
    """The argv of one Go design server on a free port of 127.0.0.1 with a SQLite file."""
    return [
        str(binary),
        "-db",
        str(db),
        "-addr",
        "127.0.0.1:0",
        "-sync",
        sync,
        "-batch-size",
        str(BATCH_SIZE),
        "-queue-size",
        str(QUEUE_SIZE),
    ]


def committed_rate(acked_events: int, elapsed_s: float, drain_s: float) -> float:
    """Events per second committed: what was acknowledged over the phase plus the drain
    (a design that answers before committing has not committed them when it answers)."""
    total = elapsed_s + max(0.0, drain_s)
    return acked_events / total if total > 0 else 0.0
