"""The OpenAPI 3.1 document served at ``/openapi.json``.

The event schema is generated from the msgspec types that validate events,
so the document and the validation cannot drift apart; the rest follows
``shared/API.md``.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from . import __version__
from .discovery import MAX_LIMIT, TOP_STATS
from .ingest import Event
from .query import DEFAULT_STATS, FILLS, GRANULARITIES
from .rollup import STATS


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


#: An example value of every query parameter, by name.
_EXAMPLES: dict[str, Any] = {
    "wait": False,
    "key": ["checkout.completed", "checkout.started"],
    "from": "2026-11-01T00:00:00Z",
    "to": "2026-12-01T00:00:00+01:00",
    "granularity": "day",
    "tz": "Europe/Berlin",
    "fill": "zero",
    "group_by": "region",
    "stats": "count,avg,p99",
    "tag.NAME": "eu",
    "prefix": "checkout.",
    "after": "checkout.completed",
    "limit": 100,
    "stat": "sum",
}


def _param(name: str, description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": schema,
        "example": _EXAMPLES[name],
        **extra,
    }


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document; built once."""
    (event_ref,), definitions = msgspec.json.schema_components(
        [Event], ref_template="#/components/schemas/{name}"
    )
    stats_list = ", ".join(STATS)
    schemas = {
        **definitions,
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string", "examples": ["invalid_events"]},
                        "message": {"type": "string"},
                        "details": {
                            "type": "array",
                            "items": {"type": "object"},
                            "description": "For invalid_events: {index, field, message} "
                            "per problem; for invalid_query: {parameter, message}.",
                        },
                    },
                }
            },
        },
        "Accepted": {
            "type": "object",
            "required": ["accepted"],
            "properties": {
                "accepted": {"type": "integer", "description": "Events of the request."},
                "duplicates": {
                    "type": "integer",
                    "description": "Of those, events whose id was already stored within the "
                    "dedup window: acknowledged, not counted again (durable answers only).",
                },
            },
            "examples": [{"accepted": 3, "duplicates": 1}],
        },
        "Keys": {
            "type": "object",
            "properties": {
                "keys": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "key": {"type": "string"},
                            "tags": {"type": "array", "items": {"type": "string"}},
                            "first": {"type": "string", "format": "date-time"},
                            "last": {"type": "string", "format": "date-time"},
                            "series": {"type": "integer"},
                        },
                    },
                },
                "next": {"type": ["string", "null"]},
            },
        },
        "Top": {
            "type": "object",
            "properties": {
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "stat": {"type": "string"},
                "results": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Aggregates": {
            "type": "object",
            "properties": {
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
                "granularity": {"type": "string"},
                "tz": {"type": "string"},
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "key": {"type": "string"},
                            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                            "buckets": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "start": {"type": "string", "format": "date-time"}
                                    },
                                    "additionalProperties": {"type": "number"},
                                },
                            },
                        },
                    },
                },
            },
        },
    }
    busy = _error(
        "The writer's queue stayed full (overloaded, with Retry-After) or the "
        "commit failed (commit_failed); nothing of the request was stored."
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trioagg",
            "version": __version__,
            "description": "Events in over HTTP, pre-aggregated roll-ups out.",
        },
        "paths": {
            "/v1/events": {
                "post": {
                    "summary": "Ingest events (one object, a JSON array, or NDJSON)",
                    "description": "Atomic: an invalid event rejects the whole request. Durable by "
                    "default: answered after the commit. Unknown event fields are rejected.",
                    "parameters": [
                        _param(
                            "wait",
                            "false: answer 202 once queued, before the commit (may be lost "
                            "on a crash)",
                            {"type": "boolean", "default": True},
                        )
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [event_ref, {"type": "array", "items": event_ref}]
                                }
                            },
                            "application/x-ndjson": {
                                "schema": {"type": "string"},
                                "description": "One event object per line.",
                            },
                        },
                    },
                    "responses": {
                        "200": _json_response(
                            "Committed.", {"$ref": "#/components/schemas/Accepted"}
                        ),
                        "202": _json_response(
                            "Queued (wait=false).", {"$ref": "#/components/schemas/Accepted"}
                        ),
                        "400": _error("Malformed JSON (the message says where) or an empty body."),
                        "413": _error("Body over max_body or more than max_batch events."),
                        "415": _error("Content-Type other than application/json or NDJSON."),
                        "422": _error("Invalid events: every problem as {index, field, message}."),
                        "503": busy,
                    },
                }
            },
            "/v1/aggregates": {
                "get": {
                    "summary": "Roll-ups of one or more keys over a time range",
                    "parameters": [
                        _param(
                            "key",
                            "Key to read; repeat for several (at most 100).",
                            {"type": "array", "items": {"type": "string"}},
                            required=True,
                            explode=True,
                        ),
                        _param(
                            "from",
                            "Start, RFC 3339 or Unix seconds (inclusive); default to minus 24 h.",
                            {"type": "string"},
                        ),
                        _param(
                            "to",
                            "End, RFC 3339 or Unix seconds (exclusive); default now.",
                            {"type": "string"},
                        ),
                        _param(
                            "granularity",
                            "Width of the answer's buckets.",
                            {"type": "string", "enum": list(GRANULARITIES), "default": "hour"},
                        ),
                        _param(
                            "tz",
                            "IANA zone for day, week and month boundaries (e.g. Europe/Berlin); "
                            "422 when its boundaries miss the store's bucket edges.",
                            {"type": "string", "default": "UTC"},
                        ),
                        _param(
                            "fill",
                            "none: omit empty buckets; zero: every stat 0; null: count 0, "
                            "other stats null.",
                            {"type": "string", "enum": list(FILLS), "default": "none"},
                        ),
                        _param(
                            "group_by",
                            "A tag name: one result series per value of it.",
                            {"type": "string"},
                        ),
                        _param(
                            "stats",
                            f"Comma list of {stats_list} and percentiles pNN or pNN.N (p50, "
                            "p99.9; keys named by --quantiles). Example: count,avg,p99.",
                            {"type": "string", "default": ",".join(DEFAULT_STATS)},
                        ),
                        _param(
                            "tag.NAME",
                            "Keep only series whose tag NAME has this value, e.g. "
                            "tag.region=eu (repeatable with other names, AND).",
                            {"type": "string"},
                        ),
                    ],
                    "responses": {
                        "200": _json_response(
                            "The roll-ups.", {"$ref": "#/components/schemas/Aggregates"}
                        ),
                        "422": _error("Invalid parameters: every problem as {parameter, message}."),
                    },
                }
            },
            "/v1/keys": {
                "get": {
                    "summary": "Keys with their tag names and first and last bucket, paginated",
                    "parameters": [
                        _param("prefix", "Only keys starting with this.", {"type": "string"}),
                        _param(
                            "after",
                            "Keys after this one (the previous page's next).",
                            {"type": "string"},
                        ),
                        _param(
                            "limit",
                            "Keys per page.",
                            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
                        ),
                    ],
                    "responses": {
                        "200": _json_response(
                            "A page of keys; next is null on the last page.",
                            {"$ref": "#/components/schemas/Keys"},
                        ),
                        "422": _error("Invalid parameters."),
                    },
                }
            },
            "/v1/top": {
                "get": {
                    "summary": "Keys ranked by total count or sum over a range",
                    "parameters": [
                        _param(
                            "from",
                            "Start, RFC 3339 or Unix seconds; default to minus 24 h.",
                            {"type": "string"},
                        ),
                        _param("to", "End (exclusive); default now.", {"type": "string"}),
                        _param(
                            "stat",
                            "What to rank by.",
                            {"type": "string", "enum": list(TOP_STATS), "default": "count"},
                        ),
                        _param(
                            "limit",
                            "How many keys.",
                            {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 100},
                        ),
                        _param("prefix", "Only keys starting with this.", {"type": "string"}),
                    ],
                    "responses": {
                        "200": _json_response(
                            "Keys, highest first.", {"$ref": "#/components/schemas/Top"}
                        ),
                        "422": _error("Invalid parameters."),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process answers",
                    "responses": {"200": _json_response("Alive.", {"type": "object"})},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: store reachable, writer running, queue not saturated",
                    "responses": {
                        "200": _json_response("Ready.", {"type": "object"}),
                        "503": _json_response("Not ready; checks says why.", {"type": "object"}),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json_response("OpenAPI 3.1.", {"type": "object"})},
                }
            },
        },
        "components": {"schemas": schemas},
    }
