"""trioagg: a small-footprint event roll-up service.

Events come in over HTTP, are validated at the edge, queued on bounded trio
memory channels, pre-aggregated by writer tasks (writer ``hour % N`` owns its
buckets) and committed to SQLite shard files or PostgreSQL; queries read the
roll-ups back. ``create_app()`` is the ASGI app; ``trioagg serve --workers N``
runs it in N processes under a supervisor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Settings", "__version__", "create_app"]

if TYPE_CHECKING:
    from .app import create_app
    from .settings import Settings


def __getattr__(name: str) -> Any:
    # Loaded when asked for: the client and the command line's client tools import
    # this package, and the server (Quart, hypercorn) costs them about a second.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(f"module 'trioagg' has no attribute {name!r}")
