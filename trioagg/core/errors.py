"""The exceptions of trioagg and the error envelope they become over HTTP.

The tree::

    TrioaggError
    ├── ConfigError              a setting is invalid, or the store disagrees with it
    ├── StoreError               a transaction failed; nothing of it is stored (tied to its data)
    │   └── StoreOutage          the store cannot commit anything now (unreachable, full, ...)
    │       └── StoreBusy        the database stayed locked for longer than busy_timeout
    └── RequestError             answered to the client as {"error": {...}} with `status`
        ├── MalformedBody        400 malformed_json
        ├── Unauthorized         401 unauthorized (WWW-Authenticate: Bearer)
        ├── Forbidden            403 forbidden (the key lacks the scope, or the tenant differs)
        ├── RequestTimedOut      408 request_timeout
        ├── MisdirectedRequest   421 misdirected_request (a keyless server not named in Host)
        ├── PayloadTooLarge      413 payload_too_large
        ├── UnsupportedMediaType 415 unsupported_media_type
        ├── InvalidEvents        422 invalid_events (details: every problem, by event index)
        ├── InvalidQuery         422 invalid_query  (details: every problem, by parameter)
        ├── Overloaded           503 overloaded (Retry-After)
        ├── CommitFailed         503 commit_failed (the request's events were not stored)
        ├── StoreUnavailable     503 store_unavailable (a read could not reach the store)
        └── Unstorable           422 unstorable_events (the store refused this request's data)

Errors raised by Quart itself (404, 405) are given the same envelope by the app.
Requests that hypercorn refuses before the app sees them (a request line or
headers over 16 KiB) are answered by hypercorn, without the envelope.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec


class TrioaggError(Exception):
    """Base class of every error trioagg raises on purpose."""


class ConfigError(TrioaggError):
    """A setting is invalid, or an existing store was created with other settings."""


class StoreCannotOpen(ConfigError):
    """A store that cannot be opened, in one sentence whatever found it: ``store`` is its
    backend's description, ``why`` the cause (the driver's words, or trioagg's own)."""

    def __init__(self, store: str, why: object) -> None:
        super().__init__(f"cannot open the store {store}: {why}")


class StoreError(TrioaggError):
    """A transaction failed; the store holds nothing of it."""


class StoreOutage(StoreError):
    """The store cannot commit anything now, whatever the data: it is unreachable, full,
    read-only, gone, or locked. ``reason`` is short and safe to show a client (no host,
    path or driver text); the driver's own error is logged and chained."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreBusy(StoreOutage):
    """The database stayed locked by another writer for longer than ``busy_timeout``."""


class RequestError(TrioaggError):
    """An error that is the answer to one HTTP request."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.details)


class MalformedBody(RequestError):
    status = 400
    code = "malformed_json"


class Unauthorized(RequestError):
    """No key, or one that is unknown, revoked or expired. ``reason`` is the metric's label
    (never the key); any reason but ``missing`` and ``public_without_keys`` (a key was
    sent) adds RFC 6750's ``error="invalid_token"`` to the challenge."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="trioagg"'
        if self.reason not in ("missing", "public_without_keys"):
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


class Forbidden(RequestError):
    """A valid key without the scope the endpoint needs, or whose tenant differs from the
    one the request names. ``reason`` is the metric's label."""

    status = 403
    code = "forbidden"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestTimedOut(RequestError):
    """The client took longer than ``body_timeout`` to send the request body."""

    status = 408
    code = "request_timeout"


class MisdirectedRequest(RequestError):
    """A server that answers without a key was asked for data under a Host that does not
    name it (:mod:`trioagg.http.hosts`). 421 rather than 400: the request is well formed, and
    RFC 9110 (15.5.20) gives 421 to a server that will not answer for the target URI's
    authority; it also counts apart from malformed requests in the metrics."""

    status = 421
    code = "misdirected_request"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class InvalidEvents(RequestError):
    status = 422
    code = "invalid_events"

    def __init__(self, message: str, details: list[dict[str, Any]], event_count: int) -> None:
        super().__init__(message, details)
        #: Events in the rejected request, valid ones included: none of them is stored.
        self.event_count = event_count
        #: Of them, events older than the store's retention (see trioagg.core.tiers).
        self.past_retention = 0


class InvalidQuery(RequestError):
    status = 422
    code = "invalid_query"


class Overloaded(RequestError):
    """The writer's channel stayed full for longer than the enqueue timeout."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class CommitFailed(RequestError):
    """The transaction that held the request's events failed; none of them is stored."""

    status = 503
    code = "commit_failed"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class StoreUnavailable(RequestError):
    """A read could not reach the store (an outage); retrying later may work."""

    status = 503
    code = "store_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class Unstorable(RequestError):
    """The store refused this request's events (and only this request's): retrying the
    same events cannot work. Nothing of the request was stored."""

    status = 422
    code = "unstorable_events"


def error_body(code: str, message: str, details: list[dict[str, Any]] | None = None) -> bytes:
    """The one error envelope: ``{"error": {"code", "message", "details"}}``."""
    return msgspec.json.encode(
        {"error": {"code": code, "message": message, "details": details or []}}
    )
