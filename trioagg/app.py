"""The ASGI entry point: ``create_app()`` as hypercorn's command line loads it
(``hypercorn 'trioagg.app:create_app()'``), and ``create_app(settings)`` as
``trioagg serve`` and the tests run it.

What only a process may do (settings from ``TRIOAGG_*``, exit code 2, SIGTERM left
to the drain, logging on stderr) happens here, through :mod:`trioagg.server.process`; the
app itself is :func:`trioagg.http.app.build_app`'s.
"""

from __future__ import annotations

from .core.settings import Settings
from .http.app import TrioaggApp, build_app
from .server.process import configure_logging, hypercorn_worker_settings


def create_app(settings: Settings | None = None) -> TrioaggApp:
    """The ASGI app for ``settings``. Without them it is a worker that hypercorn's
    command line starts, whose settings come from the environment
    (:func:`~trioagg.server.process.hypercorn_worker_settings`)."""
    if settings is None:
        settings = hypercorn_worker_settings()
    configure_logging(settings.log_level)
    return build_app(settings)
