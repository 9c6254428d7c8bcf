"""The Python client of trioagg's HTTP API, and the command line's client tools.

``from trioagg.client import Client, AsyncClient`` loads the client only (httpx,
anyio, msgspec; none of the server): the clients (``clients``), their typed answers
(``answers``), what they raise (``errors``), what leaving the process does to a
buffer (``exits``). ``tools`` is ``trioagg ingest``, ``query``, ``series`` and
``top``, which the command line loads when one of them runs.
"""

# The clients' public names are this package's: one list, in clients.py.
from .clients import *  # noqa: F403
from .clients import __all__ as __all__
