"""What every request passes before its view runs, and what a refused or failed one is
answered: the one check and the one error answer both request paths use (Quart's
views, :mod:`trioagg.http.app`, and the hot path, :mod:`trioagg.http.hotpath`).

* :class:`Gate` lets a request to an endpoint that needs a scope
  (:data:`~trioagg.http.endpoints.SCOPES_BY_PATH`) in: while no key is required, its
  Host must name this server (:mod:`trioagg.http.hosts`); then its key must carry the
  scope. CORS preflights (OPTIONS) carry no credentials by design and are never refused.
* :func:`failure_answer` turns what a request raised into its answer in the error
  envelope, counted in ``trioagg_requests_rejected_total`` (and, for a refused key,
  ``trioagg_auth_refused_total``): a :class:`~trioagg.core.errors.RequestError` as it
  says, a store outage as a 503, anything else as a logged 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..core.errors import (
    Forbidden,
    RequestError,
    StoreOutage,
    StoreUnavailable,
    Unauthorized,
    error_body,
)
from ..core.settings import Settings
from ..keys.admin import ApiKey
from ..service.lifecycle import Service
from ..service.metrics import Metrics
from .endpoints import SCOPES_BY_PATH
from .hosts import AllowedHosts

log = logging.getLogger("trioagg")

#: An answer before it is put in a response: status, headers, body.
Answer = tuple[int, dict[str, str], bytes]


class Gate:
    """Lets requests in, or refuses them (see the module)."""

    def __init__(self, settings: Settings) -> None:
        scopes = dict(SCOPES_BY_PATH)
        if settings.metrics_public:
            del scopes["/metrics"]
        self._scopes = scopes
        self._authenticating = settings.auth != "off"
        self._hosts = AllowedHosts.of(settings)

    async def check(
        self,
        service: Service,
        path: str,
        method: str,
        host: str | None,
        authorization: str | None,
        server: Sequence[Any] | None,
    ) -> ApiKey | None:
        """The key a request to ``path`` (a route's rule) is let in with, None when it
        needs none; raises :class:`~trioagg.core.errors.RequestError` to refuse it.
        ``server`` is the ASGI scope's address this end of the connection has."""
        if path not in SCOPES_BY_PATH or method == "OPTIONS":
            return None
        auth = service.auth
        if not auth.required:
            # An HTTP/1.0 request without Host reaches the views with an empty one
            # (Quart fills it in so): it names no host, and is let in as such.
            self._hosts.check(host or None, server)
        scope = self._scopes.get(path)
        if self._authenticating and scope is not None:
            return await auth.check(authorization, scope, server)
        return None


def failure_answer(metrics: Metrics, error: Exception, method: str, path: str) -> Answer:
    """The answer to a request that raised ``error`` (see the module)."""
    if isinstance(error, StoreOutage):
        log.warning("%s %s: the store is unavailable: %s", method, path, error.__cause__)
        error = StoreUnavailable(f"the store cannot answer now ({error.reason}); retry later")
    if isinstance(error, RequestError):
        metrics.requests_rejected.labels(error.code).inc()
        if isinstance(error, Unauthorized | Forbidden):
            metrics.auth_refused.labels(error.reason).inc()
        return error.status, error.headers(), error.body()
    log.error("unexpected error answering %s %s", method, path, exc_info=error)
    metrics.requests_rejected.labels("internal_error").inc()
    return 500, {}, error_body("internal_error", "an unexpected error; see the server log")
