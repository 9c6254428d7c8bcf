"""trioagg: a small-footprint event roll-up service.

Events come in over HTTP, are validated at the edge, queued on a bounded trio
memory channel, pre-aggregated by one writer task and committed to SQLite;
queries read the roll-ups back. ``create_app()`` is the ASGI app.
"""

__version__ = "0.1.0"

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "__version__", "create_app"]
