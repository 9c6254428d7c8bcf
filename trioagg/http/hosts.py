"""Which ``Host`` a request may name while the server answers without an API key: the
defence against DNS rebinding.

A web page can make a name of its own (``evil.example``) resolve to 127.0.0.1, or to a
private address, and then read and write a server there as its own origin: the
browser connects to this server and sends ``Host: evil.example``. A key stops that
(the page has none), so the check applies only while no key is required. Then a
request for data must name this server: ``localhost`` or a subdomain of it (browsers
resolve ``*.localhost`` to loopback themselves), a loopback address, the address its
connection reached (the bound address; under a wildcard bind, the address of this
machine the client used, such as a pod's IP), the ``--host`` name, or a host of
``--allowed-hosts``. Ports are not compared: a rebinding page reaches this server's
port whatever it names; what it cannot name is this server. No ``Host`` at all
(HTTP/1.0) is let in: browsers always send one.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from typing import Any, Final

from ..core.errors import MisdirectedRequest
from ..core.settings import Settings, env_name, flag_name

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: A Host header, lower-cased: an IPv6 literal in brackets or a name (or IPv4 address),
#: then an optional port.
_HOST: Final = re.compile(r"(?:\[(?P<literal>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._~-]+))(?::\d*)?")

#: Verdicts remembered: a server is reached under a handful of names, and a flood of
#: made-up ones costs a parse each (a few us), never memory.
_VERDICTS: Final = 256


def address_of(text: str) -> Address | None:
    """The IP address ``text`` is (an IPv4-mapped IPv6 address, as a dual-stack socket
    reports IPv4 peers, as its IPv4 address), or None for a name."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AllowedHosts:
    """The hosts a request may name (see the module docstring): :meth:`check` raises
    :class:`MisdirectedRequest` for any other."""

    def __init__(self, allowed: Sequence[str], own: str = "localhost") -> None:
        """``allowed`` as :func:`~trioagg.core.settings.parse_hosts` gives them; ``own`` the
        ``--host`` the server listens on (a wildcard address names nothing)."""
        self.any = "*" in allowed
        patterns = [*allowed, own.lower().strip("[]").removesuffix(".")]
        self._addresses = {a for a in map(address_of, patterns) if a and not a.is_unspecified}
        names = {p for p in patterns if not p.startswith("*") and address_of(p) is None}
        self._names = names | {"localhost"}
        self._suffixes = (".localhost", *(p[1:] for p in patterns if p.startswith("*.")))
        self.allows = functools.lru_cache(maxsize=_VERDICTS)(self._allows)

    @classmethod
    def of(cls, settings: Settings) -> AllowedHosts:
        return cls(settings.allowed_hosts, settings.host)

    def check(self, host: str | None, server: Sequence[Any] | None) -> None:
        """Let a request with ``Host: host`` in, which reached ``server`` (the ASGI
        scope's (host, port) of this end, None on a Unix socket), or refuse it."""
        reached = None if server is None else str(server[0])
        if not self.any and not self.allows(host, reached):
            named = (host or "")[:100]
            raise MisdirectedRequest(
                f"Host {named!r} does not name this server: while it serves without an "
                "API key, it answers only requests for localhost, a loopback address, the "
                f"address they reached, or a host of {flag_name('allowed_hosts')} "
                f"({env_name('allowed_hosts')}), so that no web page can use it by pointing "
                "a name of its own at it (DNS rebinding). If this is a name of the server, "
                "add it there"
            )

    def _allows(self, host: str | None, reached: str | None) -> bool:
        if host is None:
            return True
        match = _HOST.fullmatch(host.lower())
        if match is None:
            return False
        bare: str = match["literal"] or match["name"].removesuffix(".")  # no port, brackets
        if bare in self._names or bare.endswith(self._suffixes):
            return True
        address = address_of(bare)
        if address is None:
            return False
        return (
            address.is_loopback
            or address in self._addresses
            or (reached is not None and address == address_of(reached))
        )
