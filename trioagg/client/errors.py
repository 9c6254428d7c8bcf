"""What the Python client raises about the server or the way to it: one tree.

::

    ClientError                  status (0: no answer), code, message, details
    ├── ServerError              an error answer: the server's error envelope
    ├── TransportError           no answer: connecting or the connection failed
    │   └── Timeout              no answer within the client's ``timeout``
    └── Undelivered              close() gave up on events (close_timeout)

``except ClientError`` catches each. Every one has the fields of the server's
error envelope, so that code reading an error (``on_error``'s
:class:`~trioagg.client.Rejected`, ``Undelivered.last_error``) need not ask which
it is: ``status`` is the answer's HTTP status, 0 where none came; ``code`` is the
envelope's (``invalid_query``, ``overloaded``...) or the client's own
(``connection_error``, ``timeout``, ``close_timeout``, ``invalid_answer``).
A :class:`TransportError`'s ``__cause__`` is httpx's error. Wrong arguments
raise TypeError or ValueError before any request, and a closed client
RuntimeError: mistakes of the caller, not of the server.
"""

from __future__ import annotations

from typing import Any, Final

import httpx
import msgspec


class ClientError(Exception):
    """Anything the client raises about the server or the way to it.

    ``status``: the answer's HTTP status, 0 where no answer came. ``code``: what went
    wrong, in a word. ``message``: in a sentence. ``details``: the server's details
    (a list of objects, each with a ``message``), empty where it sent none."""

    status: int = 0

    def __init__(
        self, code: str, message: str, details: list[Any] | None = None, *, text: str = ""
    ) -> None:
        super().__init__(text or message)
        self.code = code
        self.message = message
        self.details = [] if details is None else details


class ServerError(ClientError):
    """An error answer of the server: its status and its error envelope's fields
    (``invalid_answer``: an answer that is not one of trioagg's).

    Its text is the status, code and message, then the first details (what is wrong
    and where); every detail is in ``details``."""

    def __init__(self, status: int, code: str, message: str, details: list[Any]) -> None:
        text = f"{status} {code}: {message}{_reasons(details)}"
        super().__init__(code, message, details, text=text)
        self.status = status

    @classmethod
    def of(cls, response: httpx.Response) -> ServerError:
        """The error ``response`` says (one without the envelope: its first 200 chars)."""
        try:
            error = msgspec.json.decode(response.content)["error"]
            return cls(response.status_code, error["code"], error["message"], error["details"])
        except (msgspec.DecodeError, KeyError, TypeError):
            return cls(response.status_code, "http_error", response.text[:200], [])

    @classmethod
    def invalid_answer(
        cls, response: httpx.Response, request: str, error: msgspec.DecodeError
    ) -> ServerError:
        """A success answer to ``request`` that is not trioagg's: a proxy's page, another
        service on the port (``error``, the decoder's, is its ``__cause__``)."""
        said = f"not an answer of trioagg to {request}: {error}"
        made = cls(response.status_code, "invalid_answer", said, [])
        made.__cause__ = error
        return made


class TransportError(ClientError):
    """No answer came: the server could not be reached (refused, no route, a name not
    found, TLS failed), or the connection broke before the answer was read. Sending
    retries these for ``retry_timeout``; a query raises them at once. ``__cause__``
    is httpx's error (an ``httpx.TransportError``)."""

    def __init__(self, message: str, code: str = "connection_error") -> None:
        super().__init__(code, message, text=f"{code}: {message}")

    @staticmethod
    def of(error: httpx.TransportError) -> TransportError:
        """``error`` as the client's: a :class:`Timeout` for httpx's timeouts."""
        said = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        made = Timeout(said) if isinstance(error, httpx.TimeoutException) else TransportError(said)
        made.__cause__ = error
        return made


class Timeout(TransportError):
    """No answer within the client's ``timeout`` (seconds, 30 by default): connecting,
    sending the request, or waiting for the answer took longer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="timeout")


class Undelivered(ClientError):
    """Raised by ``close()`` when ``close_timeout`` ran out before every event was
    acknowledged: the events still buffered, waiting for a retry or in a request
    under way were given up (and passed to ``on_error`` as well).

    ``events``: those events as sent (JSON lines, each with its id). Save them and
    send them again later (``send_encoded``, or ``trioagg ingest`` on a file of
    them): their ids make a resend count once, within the server's dedup window,
    which matters because a request cut off under way may have been stored.
    ``last_error``: the last error answer or connection error met while sending, if
    any (why the events were still waiting).
    """

    def __init__(
        self, events: list[bytes], close_timeout: float, last_error: ClientError | None
    ) -> None:
        why = f"; last error: {last_error}" if last_error is not None else ""
        message = f"{len(events):,} events not delivered within close_timeout ({close_timeout:g} s)"
        super().__init__("close_timeout", message, text=message + why)
        self.events = events
        self.close_timeout = close_timeout
        self.last_error = last_error


#: Details a ServerError's text shows at most: an invalid_events answer may have thousands.
_SHOWN_DETAILS: Final = 3


def _reasons(details: list[Any]) -> str:
    """``: stats: unknown stat(s) ...``, ``: event 3, tags: ...``: the first details."""
    said = []
    for detail in details[:_SHOWN_DETAILS]:
        if not isinstance(detail, dict) or "message" not in detail:
            said.append(str(detail))
        elif "parameter" in detail:
            said.append(f"{detail['parameter']}: {detail['message']}")
        elif "index" in detail:
            field = f", {detail['field']}" if detail.get("field") else ""
            said.append(f"event {detail['index']}{field}: {detail['message']}")
        else:
            said.append(str(detail["message"]))
    if len(details) > _SHOWN_DETAILS:
        said.append(f"{len(details) - _SHOWN_DETAILS:,} more in .details")
    return ": " + "; ".join(text[:300] for text in said) if said else ""
