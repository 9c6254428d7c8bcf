"""API keys as data, and their administration: making secrets and keeping only their
digests, the stored key and its scopes, and ``trioagg keys create``, ``list`` and
``revoke`` on the store (blocking: the key commands run outside any event loop).
Checking a request's key is :mod:`trioagg.keys.auth`'s.

**Secrets.** A key is ``tgk_`` and 32 random bytes from :mod:`secrets` (256 bits, URL-safe
base64). The prefix makes a leaked key easy to recognise (secret scanners, logs). The
store keeps the SHA-256 digest of the secret, never the secret, and finds a key by its
digest. A fast hash is right here: slow password hashes (bcrypt, argon2) exist to make
guessing a *low-entropy* password expensive, but nobody can guess among 2**256 secrets
at any speed, so a slow hash would only cost every request milliseconds. No per-store
secret (pepper) is needed either, for the same reason, which lets ``trioagg keys`` work
on the store alone. Looking a key up by its digest makes the time taken depend on the
digest, never on how much of a secret matched: an attacker learns nothing about a
secret from timing (no byte-by-byte comparison of secrets ever happens).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, get_args

from ..core.errors import ConfigError
from ..http.endpoints import Scope
from ..store import Backend
from ..store.base import BusyRetry

PREFIX: Final = "tgk_"
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)
#: Random bytes of a secret: 256 bits.
_SECRET_BYTES: Final = 32
#: Characters of a secret after PREFIX: its bytes in URL-safe base64 without padding
#: (``secrets.token_urlsafe``), 4 per 3 bytes rounded up: 43.
SECRET_CHARS: Final = (_SECRET_BYTES * 4 + 2) // 3
_SECRET_FORM: Final = re.compile(re.escape(PREFIX) + f"[A-Za-z0-9_-]{{{SECRET_CHARS}}}")
#: How long the key commands retry a store locked by a running server's writer.
_BUSY_SECONDS: Final = 10.0


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def has_secret_form(text: str) -> bool:
    """Whether ``text`` has the form of every secret :func:`new_secret` makes: PREFIX
    and :data:`SECRET_CHARS` URL-safe base64 characters. Nothing else can be a key."""
    return _SECRET_FORM.fullmatch(text) is not None


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key, without its secret."""

    name: str
    digest: str
    scopes: tuple[str, ...]
    tenant: str | None
    created: float
    expires: float | None
    revoked: float | None
    last_used: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ApiKey:
        name, digest, scopes, tenant, created, expires, revoked, last_used = row
        return cls(
            name, digest, tuple(scopes.split(",")), tenant, created, expires, revoked, last_used
        )

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def state(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired`` at ``now`` (Unix seconds)."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "active"


def parse_scopes(texts: Sequence[str]) -> tuple[str, ...]:
    """Scopes from repeated or comma-separated texts, in SCOPES order."""
    given = {part.strip().lower() for text in texts for part in text.split(",") if part.strip()}
    unknown = given - set(SCOPES)
    if unknown or not given:
        raise ValueError(f"scopes are {', '.join(SCOPES)} (got {', '.join(sorted(texts))})")
    return tuple(scope for scope in SCOPES if scope in given)


def _on_store(backend: Backend, operation: Any, *args: Any) -> Any:
    """``operation(conn, *args)`` on a write connection of its own, after making sure the
    keys table exists; retried as the server's writers retry (:class:`BusyRetry`) while
    a running server's writer holds the lock, for :data:`_BUSY_SECONDS`."""
    retry = BusyRetry(backend, _BUSY_SECONDS, time.monotonic())
    conn = backend.connect(write=True)
    try:
        while True:
            try:
                backend.create_keys_table(conn)
                return operation(conn, *args)
            except Exception as error:
                wait = retry.wait(error, time.monotonic())
                if wait is None:
                    raise
                time.sleep(wait)  # blocking: the key commands run outside any event loop
    finally:
        backend.close(conn)


def create_key(
    backend: Backend,
    name: str,
    scopes: tuple[str, ...],
    *,
    tenant: str | None = None,
    lifetime: float | None = None,
    now: float | None = None,
    secret: str | None = None,
) -> str:
    """Store a new key and return its secret (shown once: only its digest is kept).
    ``secret`` is a fresh one unless given (the bench renders its requests first)."""
    now = time.time() if now is None else now
    secret = secret or new_secret()
    expires = None if lifetime is None else now + lifetime
    row = (name, digest_of(secret), ",".join(scopes), tenant, now, expires, None, None)
    if not _on_store(backend, backend.insert_api_key, row):
        raise ConfigError(f"a key named {name!r} exists already: pick another name")
    return secret


def list_keys(backend: Backend) -> list[ApiKey]:
    return [ApiKey.from_row(row) for row in _on_store(backend, backend.list_api_keys)]


def revoke_key(backend: Backend, name: str) -> None:
    if not _on_store(backend, backend.revoke_api_key, name, time.time()):
        raise ConfigError(f"no key named {name!r} is active")
