"""``trioagg`` with an injected bug, for the fault-injection suite (not a test module).

Run as ``python tests/crashing_server.py serve --db ... --port 0``, or under hypercorn
as ``hypercorn --worker-class trio 'tests/crashing_server.py:create_app()'``. With
``TRIOAGG_TEST_CRASH=writer`` the writer raises :class:`InjectedBug` (a
``BaseException``, like a bug no handler expects) when a batch holds an event
of key ``crash``; with ``TRIOAGG_TEST_CRASH=purge`` the id purge raises it.
Everything else is the real CLI.
"""

from __future__ import annotations

import os
from typing import Any

from trioagg import app, cli
from trioagg.http.app import TrioaggApp
from trioagg.ingest.writer import Submission, Writer
from trioagg.store import Store


class InjectedBug(BaseException):
    """A bug that escapes every ``except Exception``."""


def inject(where: str) -> None:
    if where == "writer":
        commit = Writer._commit

        async def crashing_commit(self: Writer, batch: list[Submission]) -> Any:
            if any(point[0] == "crash" for submission in batch for point in submission.points):
                raise InjectedBug("injected: the writer met key 'crash'")
            return await commit(self, batch)

        Writer._commit = crashing_commit  # type: ignore[method-assign]
    elif where == "purge":

        async def crashing_purge(self: Store) -> int:
            raise InjectedBug("injected: the purge crashed")

        Store.purge_expired_ids = crashing_purge  # type: ignore[method-assign]
    else:
        raise SystemExit(f"TRIOAGG_TEST_CRASH must be writer or purge, not {where!r}")


def create_app() -> TrioaggApp:
    """The hypercorn factory, with the bug injected."""
    inject(os.environ.get("TRIOAGG_TEST_CRASH", "writer"))
    return app.create_app()


if __name__ == "__main__":
    inject(os.environ.get("TRIOAGG_TEST_CRASH", "writer"))
    cli.main()
