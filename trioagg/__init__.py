"""trioagg: a small-footprint event roll-up service.

Events come in over HTTP (JSON, OTLP) or StatsD, are validated at the edge and
queued on bounded trio memory channels to writer tasks (writer ``hour % N`` owns
its buckets). A writer commits each batch as one journal row before any ``200``,
folds its roll-ups into an in-memory head, and flushes the head's rows to the
store (SQLite, one file or shard files, or PostgreSQL) once per window; queries
read the stored roll-ups plus the head. ``create_app(settings)`` is the ASGI app;
``trioagg serve --workers N`` runs it in N processes under a supervisor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Settings", "__version__", "create_app"]

if TYPE_CHECKING:
    from .app import create_app
    from .core.settings import Settings


def __getattr__(name: str) -> Any:
    # Loaded when asked for: the client and the command line's client tools import
    # this package, and the server (Quart, hypercorn) costs them about a second.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .core.settings import Settings

        return Settings
    raise AttributeError(f"module 'trioagg' has no attribute {name!r}")
