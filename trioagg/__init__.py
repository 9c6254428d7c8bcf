"""trioagg: a small-footprint event roll-up service.

Events come in over HTTP, are validated at the edge, queued on bounded trio
memory channels, pre-aggregated by writer tasks (writer ``hour % N`` owns its
buckets) and committed to SQLite shard files or PostgreSQL; queries read the
roll-ups back. ``create_app()`` is the ASGI app; ``trioagg serve --workers N``
runs it in N processes under a supervisor.
"""

__version__ = "0.1.0"

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "__version__", "create_app"]
