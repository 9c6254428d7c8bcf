"""Every HTTP endpoint once: its path, method, the view that answers it, the scope an
API key needs for it, its query parameters, its summary and what its ``200``
carries (no I/O).

The routes (:func:`trioagg.http.app.route`), the key check before each view and the
OpenAPI document (:mod:`trioagg.http.openapi`) are all made from :data:`ENDPOINTS`, so
none of them can know an endpoint the others do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from ..core.answers import Accepted, Aggregates, Health, Keys, Ready, Status, Top
from ..query.params import AGGREGATES, EVENTS, KEYS, STATUS, TOP, Param

Scope = Literal["ingest", "read", "admin"]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a ``200`` carries: its description, its media type and, for JSON, the
    answer type of :mod:`trioagg.core.answers` it is written from (its schema)."""

    description: str
    type: type[msgspec.Struct] | None = None
    media_type: str = "application/json"


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
    #: What its 200 carries; None where the OpenAPI document describes it by hand
    #: (OTLP's two encodings) or leaves it out (``documented=False``).
    answer: Answer | None = None
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
        answer=Answer("Committed.", Accepted),
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
        answer=Answer("The roll-ups.", Aggregates),
    ),
    Endpoint(
        "/v1/keys",
        "GET",
        "get_keys",
        "Keys with their tag names and first and last bucket, paginated",
        scope="read",
        params=KEYS,
        answer=Answer("A page of keys; next is null on the last page.", Keys),
    ),
    Endpoint(
        "/v1/top",
        "GET",
        "get_top",
        "Keys ranked by total count or sum over a range",
        scope="read",
        params=TOP,
        answer=Answer("Keys, highest first.", Top),
    ),
    Endpoint(
        "/v1/status",
        "GET",
        "get_status",
        "The service's figures at a glance: events, queue, commits",
        scope="read",
        params=STATUS,
        answer=Answer("The figures.", Status),
    ),
    Endpoint(
        "/",
        "GET",
        "page",
        "The dashboard: a page for people, with a browser",
        answer=Answer(
            "The page; its scripts and styles are files of the package under /static/.",
            media_type="text/html",
        ),
    ),
    Endpoint(
        "/static/<version>/<path:name>",
        "GET",
        "dashboard_file",
        "The dashboard's scripts, styles and pictures",
        documented=False,
    ),
    Endpoint(
        "/healthz",
        "GET",
        "healthz",
        "Liveness: the process answers",
        answer=Answer("Alive.", Health),
    ),
    Endpoint(
        "/readyz",
        "GET",
        "readyz",
        "Readiness: store reachable, writer running, queue not saturated",
        answer=Answer("Ready.", Ready),
    ),
    Endpoint(
        "/metrics",
        "GET",
        "metrics",
        "Prometheus metrics",
        scope="admin",
        answer=Answer("Prometheus text format.", media_type="text/plain"),
    ),
    Endpoint("/openapi.json", "GET", "openapi", "This document", answer=Answer("OpenAPI 3.1.")),
)

#: The scope each guarded endpoint's path (Quart's URL rule) needs.
SCOPES_BY_PATH: Final = {e.path: e.scope for e in ENDPOINTS if e.scope is not None}
