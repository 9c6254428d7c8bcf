"""The Python client of trioagg's HTTP API, and the command line's client tools.

``from trioagg.client import Client, AsyncClient`` loads the client only (httpx,
anyio, msgspec; none of the server): the clients (``clients``), their typed answers
(``answers``), what they raise (``errors``), what leaving the process does to a
buffer (``exits``). ``tools`` is ``trioagg ingest``, ``query``, ``series`` and
``top``, which the command line loads when one of them runs.
"""

from .clients import (
    DEFAULT_URL,
    SERVER_MAX_BYTES,
    SERVER_MAX_EVENTS,
    AsyncClient,
    Client,
    ClientError,
    ClientOptions,
    Counters,
    Policy,
    Rejected,
    ServerError,
    Timeout,
    TransportError,
    Undelivered,
    uuid7,
)

__all__ = [
    "DEFAULT_URL",
    "SERVER_MAX_BYTES",
    "SERVER_MAX_EVENTS",
    "AsyncClient",
    "Client",
    "ClientError",
    "ClientOptions",
    "Counters",
    "Policy",
    "Rejected",
    "ServerError",
    "Timeout",
    "TransportError",
    "Undelivered",
    "uuid7",
]
