"""The OpenAPI 3.1 document served at ``/openapi.json``.

Nothing in it is written twice: the event schema is generated from the
msgspec types that validate events (:mod:`trioagg.ingest.decode`), the answers'
schemas from the types the routes encode (:mod:`trioagg.core.answers`), and the
query parameters from the tables the parsers read (:mod:`trioagg.query.params`), the
paths, their summaries and the scopes they need from the endpoint table
(:mod:`trioagg.http.endpoints`). What JSON Schema cannot say (limits against the
server's clock, the query budget) is said in descriptions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Final

import msgspec

from .. import __version__
from ..core.answers import ANSWERS
from ..core.events import MAX_TAGS, TAG_VALUE_BYTES, TAGS_BYTES
from ..core.times import LATEST
from ..ingest.decode import Event
from ..query.budget import DEFAULT_BUDGET
from ..query.params import Param
from .endpoints import ENDPOINTS, Answer, Scope

_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _parameters(table: Iterable[Param]) -> list[dict[str, Any]]:
    described = []
    for param in table:
        entry: dict[str, Any] = {
            "name": param.name,
            "in": "query",
            "description": param.description,
            "schema": dict(param.schema),
            "example": param.example,
        }
        if param.required:
            entry["required"] = True
        if param.max_items > 1:
            entry["explode"] = True
        described.append(entry)
    return described


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _answer(answer: Answer) -> dict[str, Any]:
    """A 200 from the endpoint table: the answer type's schema, or any JSON object or
    text where the table names none."""
    if answer.type is not None:
        schema = _ref(answer.type.__name__)
    elif answer.media_type == "application/json":
        schema = {"type": "object"}
    else:
        schema = {"type": "string"}
    return {"description": answer.description, "content": {answer.media_type: {"schema": schema}}}


def _event_limits(event: dict[str, Any]) -> None:
    """Say in the event schema what the validation checks beyond types."""
    fields = event["properties"]
    fields["value"]["description"] = "A finite number with |value| <= 1e100; default 1."
    fields["tags"]["description"] = (
        f"At most {MAX_TAGS} tags; values of at most {TAG_VALUE_BYTES} bytes of UTF-8, and "
        f"at most {TAGS_BYTES} bytes together as compact JSON (a tenant's stamped tag "
        "included); anything else is 422."
    )
    fields["ts"]["description"] = (
        "RFC 3339 with an offset, or Unix seconds; default: when the server received it. "
        "Accepted from 1970-01-01T00:00:00Z (or --max-age ago, when the server sets it) to "
        "--max-future (default 1 hour) ahead of the server's clock; anything else is 422."
    )
    for choice in fields["ts"].get("anyOf", []):
        if choice.get("type") == "number":
            choice.update(minimum=0, exclusiveMaximum=LATEST)
            choice.pop("maximum", None)


_SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key made with `trioagg keys create` (tgk_...), sent as "
    "`Authorization: Bearer <key>`. Scopes: ingest (POST /v1/events), read (the queries and "
    "/v1/status), admin (everything, /metrics too unless --metrics-public). A key with a "
    "tenant stamps tenant=<value> on the events it sends and reads only series with that "
    "tag. With --auth off no key is needed; with auto, while the store holds no key, none "
    "is needed on a loopback address and requests reaching any other address are refused "
    "(401).",
}


#: OTLP/JSON's request, as far as trioagg reads it (the rest is ignored, as OTLP says).
_OTLP_JSON_REQUEST: Final = {
    "type": "object",
    "description": "An OTLP/JSON ExportMetricsServiceRequest (opentelemetry-proto).",
    "properties": {"resourceMetrics": {"type": "array", "items": {"type": "object"}}},
}
_OTLP_JSON_RESPONSE: Final = {
    "type": "object",
    "description": "An OTLP/JSON ExportMetricsServiceResponse: empty when every point was stored.",
    "properties": {
        "partialSuccess": {
            "type": "object",
            "properties": {
                "rejectedDataPoints": {"type": "string", "pattern": "^[0-9]+$"},
                "errorMessage": {"type": "string"},
            },
        }
    },
}


def _secure(operation: dict[str, Any], scope: Scope) -> None:
    """Add the bearer requirement and its 401 and 403 answers to an operation that needs
    a key with ``scope``; ``{}`` says a key may be absent (auth off, or auto without
    keys), and then the Host check's 421 applies."""
    operation["security"] = [{"bearer": []}, {}]
    operation["description"] = (
        operation.get("description", "") + f" Needs an API key with the {scope} scope "
        "when auth is on (see the bearer security scheme)."
    ).strip()
    operation["responses"]["401"] = _error(
        "No API key, or one that is unknown, revoked or expired (unauthorized, with "
        'WWW-Authenticate: Bearer realm="trioagg"). Nothing was stored.'
    )
    operation["responses"]["403"] = _error(
        f"The key lacks the {scope} scope, or its tenant differs from the tenant the "
        "request names (forbidden). Nothing was stored."
    )
    operation["responses"]["421"] = _error(
        "The server answers without an API key and the request's Host does not name "
        "it: not localhost, a loopback address, the address the connection reached or "
        "a host of --allowed-hosts (misdirected_request; against DNS rebinding). "
        "Nothing was stored."
    )


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document; built once."""
    (event_ref, *_), schemas = msgspec.json.schema_components([Event, *ANSWERS], ref_template=_REF)
    _event_limits(schemas["Event"])
    budget = DEFAULT_BUDGET
    too_big = (
        f"Invalid parameters, every problem as {{parameter, message}}; also a query over the "
        f"budget: more than {budget.answer_buckets} answer buckets (fill included), "
        f"{budget.calendar_buckets} day/week/month buckets, {budget.rows} stored rows or "
        f"{budget.answer_bytes} bytes of answer; the message says how to narrow it."
    )
    busy = _error(
        "Nothing of the request was stored; retry after Retry-After: the writer's queue "
        "stayed full or the bytes in flight would pass max_inflight (overloaded), the "
        "store could not commit (commit_failed), or the store is failing and a wait=false "
        "request is not acknowledged (store_unavailable)."
    )
    unreachable = _error("The store cannot answer now (store_unavailable, with Retry-After).")
    operations: dict[str, dict[str, Any]] = {
        "post_events": {
            "description": "Atomic: an invalid event rejects the whole request. Durable by "
            "default: answered after the commit. Unknown event fields are rejected. "
            "NDJSON (application/x-ndjson, also application/ndjson or "
            "application/jsonlines) carries one event object per line. The Content-Type "
            "is required, and its charset, if given, must be UTF-8. The body may be "
            "compressed with Content-Encoding gzip, x-gzip or deflate; max_body bounds "
            "it on the wire and inflated.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"oneOf": [event_ref, {"type": "array", "items": event_ref}]}
                    },
                    "application/x-ndjson": {
                        "schema": {
                            "type": "string",
                            "description": "One event object per line.",
                        }
                    },
                },
            },
            "responses": {
                "202": _json_response("Queued (wait=false).", _ref("Accepted")),
                "400": _error(
                    "Malformed JSON (the message says where), invalid UTF-8, nesting "
                    "too deep, corrupt compressed data, an empty body, or a bad wait "
                    "value."
                ),
                "408": _error("The body took longer than body_timeout to arrive."),
                "413": _error(
                    "Body over max_body (on the wire or inflated) or more than max_batch events."
                ),
                "415": _error(
                    "No Content-Type, or one other than application/json or NDJSON; a "
                    "charset other than UTF-8; a Content-Encoding other than gzip, "
                    "x-gzip or deflate."
                ),
                "422": _error(
                    "Invalid events (invalid_events: every problem as {index, field, "
                    "message}), or events the store refused (unstorable_events: "
                    "retrying cannot help)."
                ),
                "503": busy,
            },
        },
        "post_metrics": {
            "description": "An OTLP ExportMetricsServiceRequest, as the OpenTelemetry "
            "exporters send it (protobuf, or OTLP/JSON), optionally compressed with "
            "Content-Encoding gzip or deflate. Each data point becomes events of the "
            "key its metric names (histograms: <name>.count, .sum, .min, .max and "
            ".bucket with an le tag), its attributes and the resource attributes of "
            "--otlp-resource-attributes as tags; cumulative points become deltas per "
            "stream. Answered after the commit, with OTLP's response: a point that "
            "cannot be stored exactly is refused alone and counted in partial_success "
            "(rejected_data_points, error_message); the others are stored. Events get "
            "ids of their point, so a retried export counts once. Errors use trioagg's "
            "error envelope.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": _OTLP_JSON_REQUEST},
                },
            },
            "responses": {
                "200": {
                    "description": "Stored, but for the points partial_success names.",
                    "content": {
                        "application/x-protobuf": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                        "application/json": {"schema": _OTLP_JSON_RESPONSE},
                    },
                },
                "400": _error(
                    "Not an ExportMetricsServiceRequest (malformed protobuf or JSON), "
                    "or corrupt compressed data."
                ),
                "408": _error("The body took longer than body_timeout to arrive."),
                "413": _error("Body over max_body (on the wire or inflated)."),
                "415": _error(
                    "A Content-Type other than application/x-protobuf or "
                    "application/json; a Content-Encoding other than gzip, x-gzip or "
                    "deflate."
                ),
                "503": busy,
            },
        },
        "get_aggregates": {
            "description": "How fresh: a read through the process that acknowledged a "
            "write (200) sees it. A write acknowledged by another process on the same "
            "store (another worker or host) is seen once that process flushes it "
            "(--flush-window, 1 s by default) and, where this process had the answer "
            "cached, once the cached answer is at most --read-cache-ttl (2 s) old; on "
            "SQLite a cached answer is served longer only while the store has taken "
            "no commit since it was read.",
            "responses": {
                "422": _error(too_big),
                "503": unreachable,
            },
        },
        "get_keys": {
            "responses": {
                "422": _error("Invalid parameters: every problem as {parameter, message}."),
                "503": unreachable,
            },
        },
        "get_top": {
            "responses": {
                "422": _error("Invalid parameters: every problem as {parameter, message}."),
                "503": unreachable,
            },
        },
        "get_status": {
            "description": "What the dashboard at / shows of the service itself, read "
            "from the same counters as /metrics; a client derives rates from two "
            "answers (their difference over the difference of time).",
            "responses": {
                "422": _error("An unknown parameter: it takes none."),
            },
        },
        "page": {},
        "healthz": {},
        "readyz": {
            "responses": {
                "503": _json_response("Not ready; checks says why.", _ref("Ready")),
            },
        },
        "metrics": {},
        "openapi": {},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "trioagg",
            "version": __version__,
            "description": "Events in over HTTP, pre-aggregated roll-ups out.",
        },
        "paths": _paths(operations),
        "components": {"schemas": schemas, "securitySchemes": {"bearer": _SECURITY_SCHEME}},
    }
    return document


def _paths(operations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The document's paths: one operation per endpoint of :data:`ENDPOINTS` that is
    documented, its summary, parameters, 200 answer and security from the table, the rest from
    ``operations`` (by view name), which must describe those endpoints and no other."""
    paths: dict[str, Any] = {}
    for endpoint in ENDPOINTS:
        if not endpoint.documented:
            continue
        operation = {"summary": endpoint.summary, **operations.pop(endpoint.view)}
        if endpoint.answer is not None:
            operation["responses"] = {
                "200": _answer(endpoint.answer),
                **operation.get("responses", {}),
            }
        if endpoint.params:
            operation["parameters"] = _parameters(endpoint.params)
        if endpoint.scope is not None:
            _secure(operation, endpoint.scope)
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    if operations:
        raise RuntimeError(f"operations described for no endpoint: {', '.join(operations)}")
    return paths
