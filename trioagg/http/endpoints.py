"""Every HTTP endpoint once: its path, method, the view that answers it, the scope an
API key needs for it, its query parameters and its summary (no I/O).

The routes (:func:`trioagg.app.route`), the key check before each view and the
OpenAPI document (:mod:`trioagg.http.openapi`) are all made from :data:`ENDPOINTS`, so
none of them can know an endpoint the others do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from ..query.params import AGGREGATES, EVENTS, KEYS, STATUS, TOP, Param

Scope = Literal["ingest", "read", "admin"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    method: Literal["GET", "POST"]
    #: The name of the function that answers it (Quart's endpoint name).
    view: str
    summary: str
    #: The scope a key needs when auth is on; None: open to every client.
    scope: Scope | None = None
    params: tuple[Param, ...] = ()
    #: False for what is not API (the dashboard's files): left out of the OpenAPI document.
    documented: bool = True


ENDPOINTS: Final = (
    Endpoint(
        "/v1/events",
        "POST",
        "post_events",
        "Ingest events (one object, a JSON array, or NDJSON)",
        scope="ingest",
        params=EVENTS,
    ),
    Endpoint(
        "/v1/metrics",
        "POST",
        "post_metrics",
        "Ingest OpenTelemetry metrics (OTLP/HTTP)",
        scope="ingest",
    ),
    Endpoint(
        "/v1/aggregates",
        "GET",
        "get_aggregates",
        "Roll-ups of one or more keys over a time range",
        scope="read",
        params=AGGREGATES,
    ),
    Endpoint(
        "/v1/keys",
        "GET",
        "get_keys",
        "Keys with their tag names and first and last bucket, paginated",
        scope="read",
        params=KEYS,
    ),
    Endpoint(
        "/v1/top",
        "GET",
        "get_top",
        "Keys ranked by total count or sum over a range",
        scope="read",
        params=TOP,
    ),
    Endpoint(
        "/v1/status",
        "GET",
        "get_status",
        "The service's figures at a glance: events, queue, commits",
        scope="read",
        params=STATUS,
    ),
    Endpoint("/", "GET", "page", "The dashboard: a page for people, with a browser"),
    Endpoint(
        "/static/<version>/<path:name>",
        "GET",
        "dashboard_file",
        "The dashboard's scripts, styles and pictures",
        documented=False,
    ),
    Endpoint("/healthz", "GET", "healthz", "Liveness: the process answers"),
    Endpoint(
        "/readyz",
        "GET",
        "readyz",
        "Readiness: store reachable, writer running, queue not saturated",
    ),
    Endpoint("/metrics", "GET", "metrics", "Prometheus metrics", scope="admin"),
    Endpoint("/openapi.json", "GET", "openapi", "This document"),
)

#: The scope each guarded endpoint's path (Quart's URL rule) needs.
SCOPES_BY_PATH: Final = {e.path: e.scope for e in ENDPOINTS if e.scope is not None}
