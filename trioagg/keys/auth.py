"""Checking every request's API key: the cache of keys read, the modes of ``--auth``,
and tenants. What a key is and the key commands' administration are
:mod:`trioagg.keys.admin`'s.

**Cache.** Each process keeps what it read of a key for :data:`CACHE_SECONDS` (5 s), in
at most :data:`CACHE_SIZE` entries (the least recently used go first), so a revoked key
stops working on every process within 5 s, and a request with a known key costs a
dictionary lookup. Secrets the store does not know are kept apart, in at most
:data:`UNKNOWN_CACHE_SIZE` entries of their own, so a flood of made-up secrets can never
evict a real key; a string without the form of a secret (:func:`has_secret_form`) is
refused before any of this, so it costs neither a look-up nor a cache entry.
Expiry is checked against the clock at every request, so it is exact.
Key lookups run on the store's read pool (a worker thread), never on the event loop or
the writer's connection, at most two at once and always leaving one read connection
free (see :func:`lookup_slots`); a request waits at most :data:`LOOKUP_WAIT_SECONDS`
for its turn, then is answered 503 ``overloaded``. Requests with the same secret share
one look-up (:meth:`Authenticator.lookup`), so a busy key whose entry just aged costs
one store query, not one per request. When keys were last used is written
at most every :data:`TOUCH_SECONDS` (60 s), in one small transaction.

**Modes** (``--auth``): ``on`` requires a key; ``off`` requires none (keys sent are
ignored, tenants too); ``auto`` requires one as soon as the store holds any key (even
revoked ones: revoking every key never opens the server again), which a background
task asks every :data:`CACHE_SECONDS` (:meth:`Authenticator.watch_keys`). ``trioagg
serve`` turns ``auto`` into ``on`` when it listens on a non-loopback address (see
:func:`settle_mode`).

**Tenants.** A key with a tenant stamps ``tenant=<value>`` on every event it sends
(:func:`trioagg.ingest.decode.stamp_tenant`, which also makes its event ids its own) and reads
only series with that tag (:func:`tenant_tags` and
the store's ``tenant`` filters).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio
from quart import g

from ..core.errors import ConfigError, Forbidden, Overloaded, StoreOutage, Unauthorized
from ..core.events import TENANT_TAG
from ..core.settings import BUCKET_NAMES, Settings, flag_name
from ..http.hosts import address_of
from ..store import Store
from .admin import ApiKey, digest_of, has_secret_form

log = logging.getLogger("trioagg.auth")

CACHE_SECONDS: Final = 5.0
CACHE_SIZE: Final = 10_000
UNKNOWN_CACHE_SIZE: Final = 1_000
#: The longest a request waits for a turn to look its key up in the store.
LOOKUP_WAIT_SECONDS: Final = 2.0
TOUCH_SECONDS: Final = 60.0
#: The most the last uses are written for at shutdown.
_LAST_FLUSH_SECONDS: Final = 1.0


# -- the mode trioagg serve starts in -----------------------------------------


# The hosts asked about are the server's own addresses (a handful): remembering them
# saves the 4.5 us that parsing one costs on every request of --auth auto.
@functools.lru_cache(maxsize=64)
def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    address = address_of(host.strip("[]"))  # a host name (None) may resolve anywhere
    return address is not None and address.is_loopback


def reached_locally(server: Sequence[Any] | None) -> bool:
    """Whether a connection reached the server on a loopback address: ``server`` is the
    ASGI scope's (host, port) of the server's end, None on a Unix socket (which only
    this machine can reach)."""
    return server is None or is_loopback(str(server[0]))


def key_required_to_start(settings: Settings) -> bool:
    """Whether ``trioagg serve`` starts only on a store that holds a key: ``auto`` on a
    non-loopback address (see :func:`settle_mode`)."""
    return settings.auth == "auto" and not is_loopback(settings.host)


def settle_mode(settings: Settings, *, keys_exist: bool, store_exists: bool = True) -> Settings:
    """The settings ``trioagg serve`` runs with: ``auto`` on a non-loopback address is
    ``on``, and refuses to start (ConfigError) while the store holds no key, or while
    there is no store (then the command it names creates one as these settings need)."""
    if not key_required_to_start(settings):
        return settings
    if not keys_exist:
        missing, command = "the store holds no API key", "create one"
        if not store_exists:
            missing, command = f"there is no store at {settings.db} yet", "create both"
        raise ConfigError(
            f"{flag_name('host')} {settings.host} is not a loopback address and {missing}: "
            f"{command} (trioagg keys create --name NAME --scope admin --db {settings.db}"
            f"{'' if store_exists else _creation_flags(settings)}) or pass "
            f"{flag_name('auth')} off to serve without keys"
        )
    return dataclasses.replace(settings, auth="on")


def _creation_flags(settings: Settings) -> str:
    """The flags with which ``trioagg keys create`` makes the store ``settings`` open: the
    settings a store records when it is created, where they are not the defaults."""
    flags = " --create-store"
    if settings.bucket != Settings().bucket:
        flags += f" {flag_name('bucket')} {BUCKET_NAMES[settings.bucket]}"
    if settings.writers != Settings().writers:
        flags += f" {flag_name('writers')} {settings.writers}"
    return flags


# -- checking requests ---------------------------------------------------------


def lookup_slots(readers: int) -> int:
    """Store look-ups of keys at once with ``readers`` read connections: at most two,
    and one fewer than the connections (where there are two or more), so a flood of
    made-up keys can never take every read connection."""
    return max(1, min(2, readers - 1))


class _TimedLRU:
    """At most ``size`` values, each fresh for :data:`CACHE_SECONDS` after it was put;
    the least recently used go first. Times are ``trio.current_time()``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def get(self, digest: str) -> tuple[bool, Any]:
        """(whether a fresh value is here, the value)."""
        entry = self._entries.get(digest)
        if entry is None or trio.current_time() - entry[0] >= CACHE_SECONDS:
            return False, None
        self._entries.move_to_end(digest)
        return True, entry[1]

    def put(self, digest: str, value: Any) -> None:
        self._entries[digest] = (trio.current_time(), value)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, digest: str) -> None:
        self._entries.pop(digest, None)


@dataclass(slots=True)
class _Flight:
    """One store query of a digest under way, and then its outcome, for every request
    that waited on it: answered (the key, or None: unknown), an error, or neither (the
    request that asked was cancelled)."""

    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    answered: bool = False
    key: ApiKey | None = None
    error: Exception | None = None


class Authenticator:
    """Checks the ``Authorization`` header of requests against the store's keys, with a
    short-lived, bounded cache (see the module docstring). Times of the cache are
    ``trio.current_time()``, so tests drive them with ``trio.testing.MockClock``."""

    def __init__(
        self,
        mode: str,
        store: Store,
        *,
        cache_size: int = CACHE_SIZE,
        unknown_cache_size: int = UNKNOWN_CACHE_SIZE,
    ) -> None:
        self.mode = mode
        self.store = store
        #: Keys the store holds (revoked and expired ones too), and secrets it does not.
        self._known = _TimedLRU(cache_size)
        self._unknown = _TimedLRU(unknown_cache_size)
        #: Whether a key is required (``auto``: whether the store held a key when last
        #: asked; see :meth:`watch_keys`).
        self.required = mode == "on"
        self._used: dict[str, float] = {}
        # Keys the cache does not know take at most this many of the store's read
        # connections at once, so a flood of made-up keys cannot take them all.
        self._lookups = trio.CapacityLimiter(lookup_slots(store.readers))
        #: The store queries under way, by digest: one per digest (see :meth:`lookup`).
        self._flights: dict[str, _Flight] = {}

    async def watch_keys(
        self, interval: float = CACHE_SECONDS, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """``auto``: ask the store whether it holds a key, then every ``interval`` seconds
        until it does; from then on a key is required. Started (``nursery.start``) once the
        first answer is in. The request path only reads the answer, so it never waits for
        the store, and a store out of reach fails no request here (it keeps the last
        answer: while the store is out, no key can be made in it either)."""
        self.required = await self.store.any_api_key()
        task_status.started()
        while not self.required:
            await trio.sleep(interval)
            try:
                self.required = await self.store.any_api_key()
            except StoreOutage as error:
                log.warning("cannot tell whether the store holds API keys now: %s", error)

    async def check(
        self, authorization: str | None, scope: str, server: Sequence[Any] | None = None
    ) -> ApiKey | None:
        """The key of a request that may use ``scope``, which reached the server's address
        ``server`` (the ASGI scope's); None when no key is required. Raises
        :class:`Unauthorized` or :class:`Forbidden`, with the reason."""
        if not self.required:
            if self.mode == "auto" and not reached_locally(server):
                # Under the hypercorn CLI nothing settled ``auto`` for the address it binds:
                # without keys, only loopback connections are served.
                raise Unauthorized(
                    "this server holds no API key yet and serves without one only on "
                    "loopback addresses: create a key (trioagg keys create --name NAME "
                    "--scope admin --db DB) or set --auth off (TRIOAGG_AUTH=off) to serve "
                    "without keys",
                    "public_without_keys",
                )
            return None
        kind, _, secret = (authorization or "").strip().partition(" ")
        if not authorization:
            raise Unauthorized(
                "this endpoint needs an API key: send Authorization: Bearer <key>", "missing"
            )
        if kind.lower() != "bearer" or not secret.strip():
            raise Unauthorized("the Authorization header must be Bearer <key>", "malformed")
        key = await self.lookup(secret.strip())
        if key is None:
            raise Unauthorized("the API key is not known", "unknown")
        state = key.state(time.time())
        if state != "active":
            raise Unauthorized(f"the API key is {state}", state)
        if not key.allows(scope):
            raise Forbidden(
                f"the API key {key.name!r} does not have the {scope} scope "
                f"(it has {', '.join(key.scopes)})",
                "scope",
            )
        self._used[key.digest] = time.time()
        return key

    async def lookup(self, secret: str) -> ApiKey | None:
        """The stored key of ``secret`` (None: unknown), from the cache when fresh.

        A secret without the form of one (:func:`has_secret_form`) is unknown at once:
        no look-up, no cache entry. Concurrent requests with the same secret that the
        cache cannot answer share one store query (:meth:`_ask_store`): the first asks,
        the others wait for its answer, or its error (a 503 after the same wait for a
        look-up slot, or the store's outage). Should the request asking be cancelled
        (its client left), those waiting ask again: one of them asks the store. A
        shared answer comes from a query that ended after the request arrived, and is
        the cache entry from then on: the revocation bound (CACHE_SECONDS) is unchanged."""
        if not has_secret_form(secret):
            return None
        digest = digest_of(secret)
        while True:
            fresh, key = self._known.get(digest)
            if fresh:
                return key  # type: ignore[no-any-return]
            if self._unknown.get(digest)[0]:
                return None
            flight = self._flights.get(digest)
            if flight is None:
                return await self._ask_store(digest)
            await flight.done.wait()
            if flight.error is not None:
                # The one error raised again in every waiting request: each answers it,
                # with a traceback of its own rather than every earlier raiser's frames.
                raise flight.error.with_traceback(None)
            if flight.answered:
                return flight.key

    async def _ask_store(self, digest: str) -> ApiKey | None:
        """Look ``digest`` up in the store, for every request waiting on it, and cache
        the answer."""
        flight = self._flights[digest] = _Flight()
        try:
            with trio.move_on_after(LOOKUP_WAIT_SECONDS) as waiting:
                await self._lookups.acquire()
            if waiting.cancelled_caught:
                raise Overloaded(
                    "too many API keys are being looked up at once; retry shortly", retry_after=1
                )
            try:
                row = await self.store.find_api_key(digest)
            finally:
                self._lookups.release()
            if row is None:
                self._known.drop(digest)
                self._unknown.put(digest, None)
            else:
                flight.key = ApiKey.from_row(row)
                self._unknown.drop(digest)
                self._known.put(digest, flight.key)
            flight.answered = True
            return flight.key
        except Exception as error:  # not Cancelled: a cancelled request leaves no answer
            flight.error = error
            raise
        finally:
            del self._flights[digest]
            flight.done.set()

    async def record_uses(self, interval: float = TOUCH_SECONDS) -> None:
        """Write when keys were last used, every ``interval`` seconds until cancelled,
        and once more then (for at most a second: shutdown must not wait on it). A
        failure is logged and retried next time (usage times are informative)."""
        try:
            while True:
                await trio.sleep(interval)
                await self.flush_uses()
        finally:
            with trio.move_on_after(_LAST_FLUSH_SECONDS, shield=True):
                await self.flush_uses()

    async def flush_uses(self) -> None:
        """Write the last uses recorded since the previous flush."""
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await self.store.touch_api_keys([(when, d) for d, when in used.items()])
        except Exception as error:
            log.warning("could not record when API keys were last used: %s", error)
            for digest, when in used.items():
                self._used.setdefault(digest, when)


def current_key() -> ApiKey | None:
    """The key the current request was let in with (None: auth is off)."""
    key: ApiKey | None = g.get("trioagg_key")
    return key


def current_tenant() -> str | None:
    key = current_key()
    return None if key is None else key.tenant


def tenant_tags(tags: Mapping[str, str], tenant: str) -> dict[str, str]:
    """A read's tag filters restricted to ``tenant``; Forbidden when they name another."""
    named = tags.get(TENANT_TAG)
    if named is not None and named != tenant:
        raise Forbidden(f"this API key reads only {TENANT_TAG}={tenant}", "tenant")
    return {**tags, TENANT_TAG: tenant}
