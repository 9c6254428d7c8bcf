"""API keys, scopes and tenants: the pure parts directly, the cache under a MockClock, and
real servers over real HTTP (SQLite and PostgreSQL) for every endpoint and every kind
of key, with the store checked unchanged after every refused request."""

from __future__ import annotations

import json
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from click.testing import CliRunner

from trioagg.cli import main
from trioagg.core.errors import ConfigError, Forbidden, Overloaded, StoreBusy, Unauthorized
from trioagg.core.events import Point
from trioagg.core.settings import Settings
from trioagg.http.endpoints import SCOPES_BY_PATH
from trioagg.ingest.decode import stamp_tenant
from trioagg.keys import admin as api_keys
from trioagg.keys import auth
from trioagg.store import make_backend, open_store
from trioagg.store.base import BusyRetry

from . import clock
from .conftest import (
    SHARDED,
    Server,
    ServerProcess,
    StartServer,
    public_address,
    sql,
    stored_counts,
    stored_series,
)

TS = 1795514400  # 2026-11-24T10:00:00Z
DAY = {"from": "2026-11-24T00:00:00Z", "to": "2026-11-25T00:00:00Z"}


def make_key(db: str | Path, name: str, *scopes: str, **options: Any) -> str:
    return api_keys.create_key(make_backend(Settings(db=str(db))), name, scopes, **options)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def checked_name(checker: auth.Authenticator, secret: str) -> str:
    """The name of the key ``secret`` is, as ``checker`` finds it for a read."""
    key = await checker.check(f"Bearer {secret}", "read")
    assert key is not None
    return key.name


def snapshot(db: str) -> tuple[Any, ...]:
    """Everything a request could have changed in the store."""
    return (
        stored_counts(db),
        stored_series(db),
        sql(db, "SELECT id FROM event_ids ORDER BY id"),
    )


# -- pure parts ----------------------------------------------------------------


def test_secrets_are_prefixed_high_entropy_and_stored_as_their_digest() -> None:
    first, second = api_keys.new_secret(), api_keys.new_secret()
    assert first.startswith("tgk_") and len(first) == 4 + 43 and first != second
    assert api_keys.digest_of(first) == api_keys.digest_of(first) != api_keys.digest_of(second)
    assert first not in api_keys.digest_of(first) and len(api_keys.digest_of(first)) == 64


#: Strings that are not secrets: each breaks the form of one in one way.
NOT_SECRETS = [
    "nope",
    "tgk_",
    "tgk_short",
    "tgk_" + "x" * 200,
    "TGK_" + "A" * 43,
    "tgk_" + "A" * 42,  # one character short
    "tgk_" + "A" * 44,  # one too many
    "tgk_" + "A" * 42 + "=",  # padding
    "tgk_" + "A" * 42 + "+",  # standard base64, not URL-safe
    "tgk_" + "A" * 42 + "/",
    "tgk_" + "A" * 42 + "\u0663",  # a digit, but not an ASCII one
    "tgk_" + "A" * 42 + "\u00e9",
]


def test_only_strings_of_the_form_of_a_secret_can_be_keys() -> None:
    made = [api_keys.new_secret() for _ in range(200)]
    assert (
        {len(secret) for secret in made} == {len(api_keys.PREFIX) + api_keys.SECRET_CHARS} == {47}
    )
    assert all(api_keys.has_secret_form(secret) for secret in made)
    assert api_keys.has_secret_form("tgk_" + "-_09azAZ" * 5 + "abc")
    for bogus in [*NOT_SECRETS, made[0] + "\n", " " + made[0]]:
        assert not api_keys.has_secret_form(bogus), bogus


def test_scopes_and_states() -> None:
    assert api_keys.parse_scopes(["read,ingest"]) == ("ingest", "read")
    assert api_keys.parse_scopes(["admin", "read"]) == ("read", "admin")
    for bad in (["write"], [""], []):
        with pytest.raises(ValueError, match="scopes are ingest, read, admin"):
            api_keys.parse_scopes(bad)
    key = api_keys.ApiKey("k", "d", ("read",), None, 0.0, 100.0, None, None)
    assert key.allows("read") and not key.allows("ingest") and not key.allows("admin")
    assert api_keys.ApiKey("a", "d", ("admin",), None, 0, None, None, None).allows("ingest")
    assert key.state(99.9) == "active" and key.state(100.0) == "expired"
    revoked = api_keys.ApiKey("k", "d", ("read",), None, 0.0, None, 5.0, None)
    assert revoked.state(1.0) == "revoked"


def test_the_tenant_is_stamped_on_every_event_and_another_one_is_refused() -> None:
    points: list[Point] = [
        ("k", 1.0, 1.0, "{}", None, None),
        ("k", 1.0, 1.0, '{"region":"eu"}', None, "id-1"),
        ("k", 1.0, 1.0, '{"tenant":"acme","z":"1"}', None, None),
    ]
    stamped = stamp_tenant(points, "acme")
    assert [p[3] for p in stamped] == [
        '{"tenant":"acme"}',
        '{"region":"eu","tenant":"acme"}',
        '{"tenant":"acme","z":"1"}',
    ]
    with pytest.raises(Forbidden) as refused:
        stamp_tenant([*points, ("k", 1.0, 1.0, '{"tenant":"globex"}', None, None)], "acme")
    assert refused.value.reason == "tenant" and refused.value.status == 403
    # Ids are the tenant's own: the tenant as a JSON string, then the id.
    assert [p[5] for p in stamped] == [None, '"acme":id-1', None]
    assert stamp_tenant([("k", 1.0, 1.0, "{}", None, "x")], 'a":"b')[0][5] == '"a\\":\\"b":x'
    assert auth.tenant_tags({"region": "eu"}, "acme") == {"region": "eu", "tenant": "acme"}
    assert auth.tenant_tags({"tenant": "acme"}, "acme") == {"tenant": "acme"}
    with pytest.raises(Forbidden):
        auth.tenant_tags({"tenant": "globex"}, "acme")


def test_auto_is_on_off_loopback_and_refuses_to_start_there_without_a_key() -> None:
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1")
    assert auth.is_loopback("[::1]") and auth.is_loopback("localhost")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("example.com")
    local = Settings(host="127.0.0.1")
    assert auth.settle_mode(local, keys_exist=False).auth == "auto"
    public = Settings(host="0.0.0.0")
    assert auth.settle_mode(public, keys_exist=True).auth == "on"
    with pytest.raises(ConfigError, match=r"trioagg keys create .* --auth off"):
        auth.settle_mode(public, keys_exist=False)
    # With no store yet, the command named creates one that these settings open.
    sharded = Settings(host="0.0.0.0", bucket=300, writers=2)
    named = r"no store at trioagg\.db yet: .* --create-store --bucket 5m --writers 2\) or"
    with pytest.raises(ConfigError, match=named):
        auth.settle_mode(sharded, keys_exist=False, store_exists=False)
    explicit = Settings(host="0.0.0.0", auth="off")
    assert auth.settle_mode(explicit, keys_exist=False).auth == "off"


def test_auto_without_keys_serves_only_connections_that_reached_a_loopback_address() -> None:
    assert auth.reached_locally(("127.0.0.1", 8000)) and auth.reached_locally(("::1", 8000))
    assert auth.reached_locally(("::ffff:127.0.0.1", 8000))
    assert auth.reached_locally(None), "a Unix socket: only this machine reaches it"
    for public in ("192.0.2.2", "10.0.0.5", "2001:db8::1", "::ffff:192.0.2.2"):
        assert not auth.reached_locally((public, 8000))


def test_the_start_up_log_says_what_auth_does() -> None:
    from trioagg.service.lifecycle import _auth_state

    assert _auth_state("off", required=False) == "keys never required"
    assert _auth_state("on", required=True) == "keys required"
    assert _auth_state("auto", required=True) == "keys required"
    assert "loopback connections only" in _auth_state("auto", required=False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_auto_without_keys_refuses_requests_that_reached_a_public_address(
    start_server: StartServer,
) -> None:
    server = await start_server(host="0.0.0.0")  # as under hypercorn --bind 0.0.0.0:PORT
    port = httpx.URL(server.url).port
    assert (await server.client.get(f"http://127.0.0.1:{port}/v1/keys")).status_code == 200
    async with httpx.AsyncClient(base_url=f"http://{public_address()}:{port}") as public:
        for method, path in (("GET", "/v1/keys"), ("POST", "/v1/events")):
            refused = await public.request(method, path, json={"key": "k", "ts": TS})
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "unauthorized"
            assert "trioagg keys create" in refused.json()["error"]["message"]
            assert refused.headers["WWW-Authenticate"] == 'Bearer realm="trioagg"'
        assert (await public.get("/healthz")).status_code == 200
    metrics = (await server.client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert 'trioagg_auth_refused_total{reason="public_without_keys"} 2.0' in metrics
    assert stored_counts(server.db) == {}


# -- the cache, under a mock clock -----------------------------------------------


async def test_revocation_and_new_keys_reach_a_process_when_its_cache_entry_ages(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "trioagg.db"
    store = await open_store(Settings(db=str(db)))
    try:
        checker = auth.Authenticator("auto", store)
        async with trio.open_nursery() as nursery:
            await nursery.start(checker.watch_keys)
            assert not checker.required
            assert await checker.check(None, "read") is None  # auto, no key: open
            secret = make_key(db, "reader", "read")
            mock_clock.jump(auth.CACHE_SECONDS - 0.1)
            await trio.testing.wait_all_tasks_blocked()
            assert not checker.required  # the store is asked every CACHE_SECONDS
            mock_clock.jump(0.1)
            deadline = time.monotonic() + 10  # (real time: the store's thread)
            while not checker.required and time.monotonic() < deadline:
                await trio.sleep(0)
            assert checker.required
            await trio.testing.wait_all_tasks_blocked()
            assert not nursery.child_tasks  # required for good: no more asking
        with pytest.raises(Unauthorized) as missing:
            await checker.check(None, "read")
        assert missing.value.reason == "missing"

        assert (await checker.check(f"Bearer {secret}", "read")).name == "reader"
        with pytest.raises(Forbidden):
            await checker.check(f"Bearer {secret}", "ingest")
        api_keys.revoke_key(make_backend(Settings(db=str(db))), "reader")
        mock_clock.jump(auth.CACHE_SECONDS - 0.1)
        assert (await checker.check(f"bearer {secret}", "read")).name == "reader"  # cached
        mock_clock.jump(0.1)
        with pytest.raises(Unauthorized) as revoked:
            await checker.check(f"Bearer {secret}", "read")
        assert revoked.value.reason == "revoked"
        assert checker.required  # revoking every key never opens the server again

        # An unknown secret is cached too: a key made with it later waits for the entry.
        unknown = api_keys.new_secret()
        assert await checker.lookup(unknown) is None
        row = ("late", api_keys.digest_of(unknown), "read", None, clock.now(), None, None, None)
        backend = make_backend(Settings(db=str(db)))
        api_keys._on_store(backend, backend.insert_api_key, row)
        assert await checker.lookup(unknown) is None
        mock_clock.jump(auth.CACHE_SECONDS)
        assert (await checker.lookup(unknown)).name == "late"
    finally:
        await store.aclose()


async def test_the_cache_is_bounded_and_forgets_the_least_recently_used(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "trioagg.db"
    secrets = [make_key(db, f"k{n}", "read") for n in range(3)]
    store = await open_store(Settings(db=str(db)))
    try:
        checker = auth.Authenticator("on", store, cache_size=2)
        for secret in secrets:
            await checker.lookup(secret)
        assert len(checker._known) == 2
        assert api_keys.digest_of(secrets[0]) not in checker._known
        # Not of the form of a secret: refused without asking the store or caching.
        queries = await key_queries(store)
        for bogus in NOT_SECRETS:
            with pytest.raises(Unauthorized) as refused:
                await checker.check(f"Bearer {bogus}", "read")
            assert refused.value.reason == "unknown"
        assert len(checker._known) == 2 and len(checker._unknown) == 0 and not queries
        with pytest.raises(Unauthorized) as malformed:
            await checker.check(f"Basic {secrets[0]}", "read")
        assert malformed.value.reason == "malformed"
    finally:
        await store.aclose()


async def test_made_up_secrets_never_evict_known_keys(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "trioagg.db"
    secrets = [make_key(db, f"k{n}", "read") for n in range(2)]
    store = await open_store(Settings(db=str(db)))
    try:
        checker = auth.Authenticator("on", store, cache_size=2, unknown_cache_size=3)
        for secret in secrets:
            assert (await checker.lookup(secret)) is not None
        flood = [api_keys.new_secret() for _ in range(20)]
        for secret in flood:
            assert await checker.lookup(secret) is None
        assert len(checker._unknown) == 3 and api_keys.digest_of(flood[-1]) in checker._unknown
        assert all(api_keys.digest_of(secret) in checker._known for secret in secrets)
        # Still answered from the cache: with every look-up slot taken, they need none.
        holders = [object() for _ in range(int(checker._lookups.total_tokens))]
        for holder in holders:
            checker._lookups.acquire_on_behalf_of_nowait(holder)
        for secret in secrets:
            assert (await checker.lookup(secret)) is not None
    finally:
        await store.aclose()


async def key_queries(store: Any) -> list[str]:
    """Every API key look-up a SQLite store's read connections run from now on, as
    traced by SQLite itself."""
    for _ in store._read_links:
        await store.ping()  # opens the next connection: idle ones are taken in turn
    queries: list[str] = []
    for link in store._read_links:
        link.conn.set_trace_callback(
            lambda statement: queries.append(statement) if "WHERE digest" in statement else None
        )
    return queries


async def test_concurrent_requests_with_one_key_share_one_store_query(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "trioagg.db"
    secret = make_key(db, "busy", "read")
    store = await open_store(Settings(db=str(db)))
    try:
        checker = auth.Authenticator("on", store)
        queries = await key_queries(store)
        assert await checked_name(checker, secret) == "busy"
        assert len(queries) == 1
        mock_clock.jump(auth.CACHE_SECONDS)  # the entry aged: the next request asks
        names: list[str] = []

        async def request() -> None:
            names.append(await checked_name(checker, secret))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(request)
        assert names == ["busy"] * 50
        assert len(queries) == 2, "one store query for the 50 requests"
        assert not checker._flights

        # Made-up secrets too: one query each, however many requests send it.
        unknown = [api_keys.new_secret() for _ in range(3)]
        async with trio.open_nursery() as nursery:
            for made_up in unknown * 10:
                nursery.start_soon(checker.lookup, made_up)
        assert len(queries) == 5 and len(checker._unknown) == 3
    finally:
        await store.aclose()


async def test_requests_waiting_on_a_look_up_share_its_refusal_or_ask_again(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "trioagg.db"
    secret = make_key(db, "k", "read")
    store = await open_store(Settings(db=str(db), readers=2))
    try:
        checker = auth.Authenticator("on", store)
        queries = await key_queries(store)
        holder = object()
        checker._lookups.acquire_on_behalf_of_nowait(holder)  # the one slot is taken
        refusals: list[float] = []

        async def refused() -> None:
            with pytest.raises(Overloaded):
                await checker.check(f"Bearer {secret}", "read")
            refusals.append(trio.current_time())

        # Requests waiting on a look-up that waited its 2 s for a slot share its 503:
        # they never wait longer than it.
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(refused)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(auth.LOOKUP_WAIT_SECONDS)
        assert refusals == [started + auth.LOOKUP_WAIT_SECONDS] * 5
        assert checker._lookups.borrowed_tokens == 1 and not queries

        # The request that asks is cancelled (its client left): the others ask again,
        # once, for all of them.
        names: list[str] = []

        async def request() -> None:
            names.append(await checked_name(checker, secret))

        leaving = trio.CancelScope()

        async def leaving_request() -> None:
            with leaving:
                await request()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(leaving_request)
            await trio.testing.wait_all_tasks_blocked()  # it asks: it waits for the slot
            for _ in range(5):
                nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()  # they wait for its answer
            assert len(checker._flights) == 1
            leaving.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert len(checker._flights) == 1, "one of those waiting asks now"
            checker._lookups.release_on_behalf_of(holder)
        assert names == ["k"] * 5 and len(queries) == 1
        assert not checker._flights and checker._lookups.borrowed_tokens == 0
    finally:
        await store.aclose()


def test_key_lookups_always_leave_a_read_connection_free() -> None:
    assert [auth.lookup_slots(readers) for readers in (1, 2, 3, 4, 16)] == [1, 1, 2, 2, 2]


async def test_a_request_waits_for_a_lookup_slot_at_most_two_seconds(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "trioagg.db"
    secret = make_key(db, "k", "read")
    store = await open_store(Settings(db=str(db), readers=2))
    try:
        checker = auth.Authenticator("on", store)
        assert checker._lookups.total_tokens == 1
        holder = object()
        checker._lookups.acquire_on_behalf_of_nowait(holder)
        started = trio.current_time()
        mock_clock.autojump_threshold = 0  # nothing else runs: the wait is all there is
        with pytest.raises(Overloaded) as refused:
            await checker.check(f"Bearer {secret}", "read")
        mock_clock.autojump_threshold = float("inf")
        assert trio.current_time() - started == pytest.approx(auth.LOOKUP_WAIT_SECONDS)
        assert refused.value.status == 503 and refused.value.headers() == {"Retry-After": "1"}
        assert checker._lookups.borrowed_tokens == 1, "a refused wait holds no slot"
        checker._lookups.release_on_behalf_of(holder)
        assert (await checker.check(f"Bearer {secret}", "read")) is not None
    finally:
        await store.aclose()


async def test_last_use_is_written_when_uses_are_flushed(tmp_path: Path) -> None:
    db = tmp_path / "trioagg.db"
    secret = make_key(db, "k", "read")
    store = await open_store(Settings(db=str(db)))
    try:
        checker = auth.Authenticator("on", store)
        await checker.check(f"Bearer {secret}", "read")
        (listed,) = api_keys.list_keys(make_backend(Settings(db=str(db))))
        assert listed.last_used is None  # not written per request
        await checker.flush_uses()
        (listed,) = api_keys.list_keys(make_backend(Settings(db=str(db))))
        assert listed.last_used is not None and listed.created <= listed.last_used <= clock.now()

        async with trio.open_nursery() as nursery:  # and once more when the service stops
            nursery.start_soon(checker.record_uses)
            await trio.testing.wait_all_tasks_blocked()
            await checker.check(f"Bearer {secret}", "read")
            nursery.cancel_scope.cancel()
        (again,) = api_keys.list_keys(make_backend(Settings(db=str(db))))
        assert again.last_used is not None and again.last_used > listed.last_used
    finally:
        await store.aclose()


async def test_a_store_of_the_previous_version_opens_and_gains_the_keys_table(
    tmp_path: Path,
) -> None:
    db = tmp_path / "trioagg.db"
    store = await open_store(Settings(db=str(db)))
    await store.aclose()
    sql(db, "DROP TABLE api_keys")
    store = await open_store(Settings(db=str(db)))
    try:
        assert not await store.any_api_key()
    finally:
        await store.aclose()


# -- every endpoint x every kind of key, over HTTP --------------------------------


def otlp_export(**attributes: str) -> dict[str, Any]:
    """An OTLP/JSON export of one data point of t.m, with these attributes."""
    point = {
        "timeUnixNano": str(TS * 1_000_000_000),
        "asDouble": 1.0,
        "attributes": [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()],
    }
    metric = {"name": "t.m", "sum": {"aggregationTemporality": 1, "dataPoints": [point]}}
    return {"resourceMetrics": [{"scopeMetrics": [{"metrics": [metric]}]}]}


#: (method, path, params, body) of a request that only its key decides.
ENDPOINTS: dict[str, tuple[str, str, dict[str, str], Any]] = {
    "events": ("POST", "/v1/events", {}, [{"key": "t.k", "ts": TS, "id": "e-1"}]),
    "aggregates": ("GET", "/v1/aggregates", {"key": "t.k", **DAY}, None),
    "keys": ("GET", "/v1/keys", {}, None),
    "top": ("GET", "/v1/top", DAY, None),
    "status": ("GET", "/v1/status", {}, None),
    "metrics": ("GET", "/metrics", {}, None),
    "healthz": ("GET", "/healthz", {}, None),
    "readyz": ("GET", "/readyz", {}, None),
    "openapi": ("GET", "/openapi.json", {}, None),
    "page": ("GET", "/", {}, None),
    "otlp": ("POST", "/v1/metrics", {}, otlp_export()),
}
#: What the "other tenant" request asks: data of tenant=acme, with globex's key.
OTHER_TENANT: dict[str, Any] = {
    "events": [{"key": "t.k", "ts": TS, "id": "e-2", "tags": {"tenant": "acme"}}],
    "otlp": otlp_export(tenant="acme"),
    "aggregates": {"key": "t.k", "tag.tenant": "acme", **DAY},
}
KINDS = ["none", "unknown", "revoked", "expired", "wrong scope", "right scope", "other tenant"]
# The exact status per endpoint and kind of key (same order as KINDS).
GUARDED = {
    "events": [401, 401, 401, 401, 403, 200, 403],
    "aggregates": [401, 401, 401, 401, 403, 200, 403],
    "keys": [401, 401, 401, 401, 403, 200, 200],
    "top": [401, 401, 401, 401, 403, 200, 200],
    "status": [401, 401, 401, 401, 403, 200, 403],
    "metrics": [401, 401, 401, 401, 403, 200, 403],
    "otlp": [401, 401, 401, 401, 403, 200, 403],
}
#: The scope each endpoint needs, and one that is not it.
NEEDS = {
    "events": ("ingest", "read"),
    "aggregates": ("read", "ingest"),
    "keys": ("read", "ingest"),
    "top": ("read", "ingest"),
    "status": ("read", "ingest"),
    "metrics": ("admin", "read"),
    "otlp": ("ingest", "read"),
}


@pytest.mark.slow
async def test_every_endpoint_answers_every_kind_of_key_exactly(
    start_server: StartServer,
) -> None:
    server = await start_server(auth="on")
    db = server.db
    keys = {
        scope: await trio.to_thread.run_sync(make_key, db, scope, scope)
        for scope in ("ingest", "read", "admin")
    }
    revoked = await trio.to_thread.run_sync(make_key, db, "revoked", "admin")
    await trio.to_thread.run_sync(
        lambda: api_keys.revoke_key(make_backend(Settings(db=db)), "revoked")
    )
    expired = await trio.to_thread.run_sync(
        lambda: make_key(db, "expired", "admin", lifetime=60.0, now=clock.now() - 61)
    )
    globex = await trio.to_thread.run_sync(
        lambda: make_key(db, "globex", "ingest", "read", tenant="globex")
    )
    admin = bearer(keys["admin"])

    async def ask(name: str, kind: str) -> httpx.Response:
        method, path, params, body = ENDPOINTS[name]
        secret = {
            "none": None,
            "unknown": api_keys.new_secret(),
            "revoked": revoked,
            "expired": expired,
            "wrong scope": keys[NEEDS.get(name, ("read", "read"))[1]],
            "right scope": keys[NEEDS.get(name, ("read", "read"))[0]],
            "other tenant": globex,
        }[kind]
        if kind == "other tenant" and name in ("events", "otlp"):
            body = OTHER_TENANT[name]
        elif kind == "other tenant":
            params = OTHER_TENANT.get(name, params)
        return await server.client.request(
            method,
            path,
            params=params,
            json=body,
            headers=bearer(secret) if secret else {},
        )

    for name in ENDPOINTS:
        for number, kind in enumerate(KINDS):
            before = snapshot(db)
            response = await ask(name, kind)
            expected = GUARDED[name][number] if name in GUARDED else 200
            assert response.status_code == expected, (name, kind, response.text)
            if expected in (401, 403):
                error = response.json()["error"]
                assert error["code"] == ("unauthorized" if expected == 401 else "forbidden")
                assert snapshot(db) == before, (name, kind)  # a refused request stored nothing
                secret_sent = response.request.headers.get("Authorization", "")[7:]
                assert not secret_sent or secret_sent not in response.text
            if expected == 401:
                challenge = response.headers["WWW-Authenticate"]
                assert challenge.startswith('Bearer realm="trioagg"')
                assert ('error="invalid_token"' in challenge) == (kind != "none")
    assert stored_counts(db) == {"t.k": 1, "t.m": 1}

    metrics = (await server.client.get("/metrics", headers=admin)).text
    refused = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("trioagg_auth_refused_total{")
    }
    # Per guarded endpoint: one missing, unknown, revoked, expired and wrong scope each;
    # other tenants refused on events, OTLP, aggregates, status and metrics (its scopes).
    assert refused == {
        "missing": 7.0,
        "unknown": 7.0,
        "revoked": 7.0,
        "expired": 7.0,
        "scope": 8.0,
        "tenant": 4.0,
    }
    for secret in (*keys.values(), revoked, expired, globex):
        assert secret not in metrics


async def test_metrics_can_be_public(start_server: StartServer) -> None:
    server = await start_server(auth="on", metrics_public="true")
    assert (await server.client.get("/metrics")).status_code == 200
    assert (await server.client.get("/v1/keys")).status_code == 401


async def test_auth_off_lets_everything_in_and_ignores_keys(start_server: StartServer) -> None:
    server = await start_server(auth="off")
    await trio.to_thread.run_sync(make_key, server.db, "k", "read")
    await trio.sleep(0)
    for path in ("/v1/keys", "/metrics", "/v1/status"):
        assert (await server.client.get(path)).status_code == 200


# -- tenants ------------------------------------------------------------------------


async def test_one_tenants_ids_never_drop_another_tenants_events(
    start_server: StartServer,
) -> None:
    server = await start_server(auth="on")
    tenants = {"acme": "acme", "beta": "beta", "tricky": 'acme":"x'}
    made = {
        name: await trio.to_thread.run_sync(
            partial(make_key, server.db, name, "ingest", tenant=tenants[name])
        )
        for name in tenants
    }

    async def send(who: str, event_id: str) -> Any:
        event = {"key": "orders", "ts": TS, "id": event_id}
        response = await server.client.post("/v1/events", json=event, headers=bearer(made[who]))
        assert response.status_code == 200, response.text
        return response.json()["duplicates"]

    assert await send("acme", "order-1") == 0
    assert await send("beta", "order-1") == 0  # was a duplicate of acme's
    assert await send("tricky", "order-1") == 0
    assert await send("acme", '"x":order-1') == 0
    assert await send("beta", "order-1") == 1  # a tenant's own repeat still counts once
    assert stored_counts(server.db) == {"orders": 4}


@pytest.mark.parametrize("db_url", ["sqlite", SHARDED, "postgres"], indirect=True)
async def test_tenants_see_only_their_own_series_everywhere(start_server: StartServer) -> None:
    # Events over two hours: on the store of two shard files, each tenant's series live
    # in both, and every read goes through the union of the shards.
    server = await start_server(auth="on")
    db = server.db
    made = {
        name: await trio.to_thread.run_sync(
            partial(make_key, db, name, "ingest", "read", tenant=name)
        )
        for name in ("acme", "acme2", 'we"ird')
    }
    admin = await trio.to_thread.run_sync(make_key, db, "admin", "admin")

    async def send(who: str, events: list[dict[str, Any]]) -> httpx.Response:
        secret = admin if who == "admin" else made[who]
        return await server.client.post("/v1/events", json=events, headers=bearer(secret))

    acme = [
        {"key": "shared", "ts": TS, "value": 1, "tags": {"region": "eu"}},
        {"key": "shared", "ts": TS + 3600, "value": 2, "tags": {"region": "us", "tenant": "acme"}},
        {"key": "acme.only", "ts": TS + 3600, "value": 4},
    ]
    assert (await send("acme", acme)).status_code == 200
    other = [
        {"key": "shared", "ts": TS, "value": 100, "tags": {"region": "eu"}},
        {"key": "acme2.only", "ts": TS, "value": 100},
    ]
    assert (await send("acme2", other)).status_code == 200
    assert (await send('we"ird', other)).status_code == 200
    # Tag values that merely contain the text of acme's tag are other series.
    tricky = [
        {"key": "shared", "ts": TS, "value": 1000, "tags": {"note": ',"tenant":"acme"'}},
        {"key": "shared", "ts": TS + 3600, "value": 1000, "tags": {"note": '{"tenant":"acme"}'}},
        {"key": "shared", "ts": TS, "value": 1000, "tags": {"tenant": "acme2"}},
        {"key": "admin.only", "ts": TS, "value": 1000},
    ]
    assert (await send("admin", tricky)).status_code == 200

    async def read(who: str, path: str, **params: str) -> Any:
        secret = admin if who == "admin" else made[who]
        response = await server.client.get(path, params=params, headers=bearer(secret))
        assert response.status_code == 200, response.text
        return response.json()

    grouped = await read(
        "acme",
        "/v1/aggregates",
        key="shared",
        group_by="region",
        granularity="all",
        stats="count,sum",
        **DAY,
    )
    assert {
        (s["tags"]["region"], s["tags"]["tenant"], s["buckets"][0]["sum"])
        for s in grouped["results"]
    } == {("eu", "acme", 1.0), ("us", "acme", 2.0)}
    merged = await read("acme", "/v1/aggregates", key="shared", granularity="all", **DAY)
    assert merged["results"][0]["buckets"][0]["sum"] == 3.0
    by_tenant = await read(
        "admin", "/v1/aggregates", key="shared", group_by="tenant", granularity="all", **DAY
    )
    assert {s["tags"].get("tenant"): s["buckets"][0]["sum"] for s in by_tenant["results"]} == {
        "acme": 3.0,
        "acme2": 1100.0,
        'we"ird': 100.0,
        None: 2000.0,
    }

    listed = await read("acme", "/v1/keys")
    assert [(k["key"], k["series"]) for k in listed["keys"]] == [("acme.only", 1), ("shared", 2)]
    assert [k["key"] for k in (await read("acme2", "/v1/keys"))["keys"]] == [
        "acme2.only",
        "shared",
    ]
    assert len((await read("admin", "/v1/keys"))["keys"]) == 4

    top = await read("acme", "/v1/top", stat="sum", **DAY)
    assert top["results"] == [{"key": "acme.only", "sum": 4.0}, {"key": "shared", "sum": 3.0}]
    weird = await read('we"ird', "/v1/top", stat="sum", **DAY)
    assert weird["results"] == [
        {"key": "acme2.only", "sum": 100.0},
        {"key": "shared", "sum": 100.0},
    ]


# -- keys made and revoked while servers run --------------------------------------


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


@pytest.mark.slow
async def test_a_key_created_while_serving_switches_auto_on(start_server: StartServer) -> None:
    server = await start_server()  # auth auto, on loopback
    assert (await server.client.get("/v1/keys")).status_code == 200
    made = await trio.to_thread.run_sync(
        _cli, "keys", "create", "--name", "first", "--scope", "read", "--db", server.db
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert secret.startswith("tgk_")

    async def refused() -> bool:
        return (await server.client.get("/v1/keys")).status_code == 401

    await wait_until_async(refused, timeout=auth.CACHE_SECONDS * 3)
    answer = await server.client.get("/v1/keys", headers=bearer(secret))
    assert answer.status_code == 200
    listed = await trio.to_thread.run_sync(_cli, "keys", "list", "--db", server.db)
    assert "first" in listed.stdout and "read" in listed.stdout
    assert secret not in listed.stdout
    assert secret not in "".join(map(str, sql(server.db, "SELECT * FROM api_keys")))


async def wait_until_async(condition: Any, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not await condition():
            await trio.sleep(0.1)


async def test_two_processes_agree_on_revocation(server_process: Any, tmp_path: Path) -> None:
    db = tmp_path / "trioagg.db"
    secret = make_key(db, "shared", "read")
    servers: list[ServerProcess] = [server_process("--log-level", "warning") for _ in range(2)]
    for process in servers:
        assert process.start().url, process.output
    async with httpx.AsyncClient(timeout=10) as client:
        for process in servers:
            answer = await client.get(f"{process.url}/v1/keys", headers=bearer(secret))
            assert answer.status_code == 200
        revoked = await trio.to_thread.run_sync(_cli, "keys", "revoke", "shared", "--db", str(db))
        assert revoked.exit_code == 0, revoked.output

        async def both_refuse() -> bool:
            statuses = [
                (await client.get(f"{p.url}/v1/keys", headers=bearer(secret))).status_code
                for p in servers
            ]
            return statuses == [401, 401]

        await wait_until_async(both_refuse, timeout=auth.CACHE_SECONDS * 3)
    for process in servers:
        assert process.stop() == 0


def test_a_public_address_without_a_key_refuses_to_start(
    server_process: Any, tmp_path: Path
) -> None:
    trio.run(new_store, str(tmp_path / "trioagg.db"))
    refused = server_process("--host", "0.0.0.0").start()
    assert refused.wait() == 2
    lines = [line for line in refused.output.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "trioagg keys create" in lines[0] and "--auth off" in lines[0]

    secret = make_key(tmp_path / "trioagg.db", "admin", "admin")
    started = server_process("--host", "0.0.0.0", "--log-level", "warning").start()
    assert started.url, started.output
    port = started.url.rsplit(":", 1)[1]
    assert httpx.get(f"http://127.0.0.1:{port}/v1/keys").status_code == 401
    answer = httpx.get(f"http://127.0.0.1:{port}/v1/keys", headers=bearer(secret))
    assert answer.status_code == 200
    assert started.stop() == 0


# -- the command line tools and TLS ------------------------------------------------


@pytest.mark.slow
async def test_the_client_commands_send_their_key(server: Server, tmp_path: Path) -> None:
    secret = await trio.to_thread.run_sync(make_key, server.db, "cli", "ingest", "read")
    path = tmp_path / "e.ndjson"
    path.write_text(f'{{"key": "cli.k", "ts": {TS}}}\n')

    async def cli(*args: str) -> Any:
        return await trio.to_thread.run_sync(lambda: _cli(*args, "--url", server.url))

    await wait_until_async(lambda: _status(server, "/v1/keys", 401), timeout=auth.CACHE_SECONDS * 3)
    without = await cli("ingest", str(path), "--no-progress")
    assert without.exit_code == 1 and "401" in without.stderr
    assert stored_counts(server.db) == {}
    sent = await cli("ingest", str(path), "--no-progress", "--api-key", secret)
    assert sent.exit_code == 0, sent.stderr
    assert stored_counts(server.db) == {"cli.k": 1}
    listed = await cli("series", "--format", "csv", "--api-key", secret)
    assert listed.exit_code == 0 and "cli.k" in listed.stdout
    refused = await cli("series")
    assert refused.exit_code == 1 and "401 unauthorized" in refused.stderr


async def _status(server: Server, path: str, status: int) -> bool:
    return (await server.client.get(path)).status_code == status


def test_https_with_certfile_and_keyfile(server_process: Any, tmp_path: Path) -> None:
    import trustme

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    certificate.private_key_pem.write_to_path(str(keyfile))
    secret = make_key(tmp_path / "trioagg.db", "tls", "ingest")
    process = server_process(
        "--certfile", str(certfile), "--keyfile", str(keyfile), "--log-level", "warning"
    ).start()
    assert process.url.startswith("https://"), process.output
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    with httpx.Client(verify=trusting, timeout=10) as client:
        posted = client.post(
            f"{process.url}/v1/events", json={"key": "tls", "ts": TS}, headers=bearer(secret)
        )
        assert posted.status_code == 200, posted.text
    with pytest.raises(httpx.ConnectError):  # not trusted without the authority
        httpx.get(f"{process.url}/healthz", timeout=5)
    with pytest.raises(httpx.TransportError):  # plain HTTP is not served
        httpx.get(process.url.replace("https://", "http://") + "/healthz", timeout=5)
    assert process.stop() == 0
    assert stored_counts(tmp_path / "trioagg.db") == {"tls": 1}


async def test_cors_preflights_need_no_key_and_allow_the_authorization_header(
    start_server: StartServer,
) -> None:
    server = await start_server(auth="on", cors_origin="https://grafana.example.com")
    preflight = await server.client.options(
        "/v1/keys",
        headers={
            "Origin": "https://grafana.example.com",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed
    refused = await server.client.get("/v1/keys", headers={"Origin": "https://grafana.example.com"})
    assert refused.status_code == 401  # the answer itself still needs a key, CORS or not
    assert refused.headers["Access-Control-Allow-Origin"] == "https://grafana.example.com"


def test_the_document_declares_the_bearer_scheme_and_its_refusals() -> None:
    from trioagg.http.openapi import openapi_document

    document = openapi_document()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for operation in item.values():
            guarded = path in SCOPES_BY_PATH
            assert ("security" in operation) == guarded, path
            assert ("401" in operation["responses"]) == guarded, path
            assert ("403" in operation["responses"]) == guarded, path


async def new_store(db: str) -> None:
    await (await open_store(Settings(db=db))).aclose()


def test_the_key_commands_refuse_what_they_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default --db is ./trioagg.db
    monkeypatch.delenv("TRIOAGG_DB", raising=False)
    db = str(tmp_path / "other.db")
    for command in (["create", "--name", "a", "--scope", "read"], ["list"], ["revoke", "a"]):
        typo = _cli("keys", *command, "--db", db)
        assert typo.exit_code == 2, typo.output
        assert f"no trioagg store at {db}" in typo.output and "--create-store" in typo.output
        assert not (tmp_path / "other.db").exists(), "a key command created a store"
    Path(db).write_bytes(b"")  # a file, but no store in it
    empty = _cli("keys", "list", "--db", db)
    assert empty.exit_code == 2 and f"no trioagg store at {db}" in empty.output
    Path(db).unlink()
    for path in (db, "trioagg.db"):
        trio.run(new_store, path)
    made = _cli("keys", "create", "--name", "a", "--scope", "read", "--tenant", "acme", "--db", db)
    assert made.exit_code == 0 and made.stdout.startswith("tgk_")
    again = _cli("keys", "create", "--name", "a", "--scope", "ingest", "--db", db)
    assert again.exit_code == 1 and "a key named 'a' exists already" in again.output
    bad = _cli("keys", "create", "--name", "b", "--scope", "write", "--db", db)
    assert bad.exit_code == 2 and "scopes are ingest, read, admin" in bad.output
    lasting = _cli("keys", "create", "--name", "b", "--scope", "admin", "--expires", "2d")
    assert lasting.exit_code == 0
    assert " b " in _cli("keys", "list").stdout  # in ./trioagg.db, not in the other store
    assert " b " not in _cli("keys", "list", "--db", db).stdout
    assert _cli("keys", "revoke", "nobody", "--db", db).exit_code == 1
    assert _cli("keys", "revoke", "a", "--db", db).exit_code == 0
    assert _cli("keys", "revoke", "a", "--db", db).exit_code == 1  # revoked already
    listed = _cli("keys", "list", "--db", db).stdout
    assert "acme" in listed and "revoked" in listed and "tgk_" not in listed


def test_the_key_commands_retry_a_locked_store_as_the_server_does(
    tmp_path: Path, hold_write_lock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = str(tmp_path / "trioagg.db")
    trio.run(new_store, db)
    backend = make_backend(Settings(db=db))
    hold_write_lock.acquire(db)  # as a running server's writer does, mid-commit
    conn = backend.connect(write=True)
    try:
        with pytest.raises(Exception) as caught:
            backend.begin(conn)
    finally:
        backend.close(conn)
    busy = caught.value
    assert backend.is_busy(busy)
    # The one policy (BusyRetry): waits doubling from 10 ms to 1 s, then StoreBusy.
    retry, now, waits = BusyRetry(backend, 3.0, 100.0), 100.0, []
    with pytest.raises(StoreBusy, match="the database stayed locked for 3s"):
        while (wait := retry.wait(busy, now)) is not None:
            waits.append(wait)
            now += wait
    assert waits == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0]
    assert BusyRetry(backend, 3.0, 0.0).wait(ValueError("not busy"), 0.0) is None

    monkeypatch.setattr(api_keys, "_BUSY_SECONDS", 0.2)  # not 10 s: only the last answer matters
    locked = _cli("keys", "create", "--name", "a", "--scope", "read", "--db", db)
    assert locked.exit_code == 1
    assert locked.output.splitlines() == [
        f"Error: the store {db} cannot be used: the database stayed locked for 0.2s"
    ]
    hold_write_lock.release()
    made = _cli("keys", "create", "--name", "a", "--scope", "read", "--db", db)
    assert made.exit_code == 0 and made.stdout.startswith("tgk_")


def test_a_tenant_must_be_a_tag_value(tmp_path: Path) -> None:
    db = str(tmp_path / "trioagg.db")
    trio.run(new_store, db)
    for tenant, why in (
        ("", "(Expected `str` of length >= 1)"),
        ("\u00e9" * 128, "(it has 256 bytes, over 255)"),
    ):
        refused = _cli(
            "keys", "create", "--name", "t", "--scope", "ingest", "--tenant", tenant, "--db", db
        )
        assert refused.exit_code == 2
        assert refused.output.splitlines() == [
            "Error: --tenant must be a tag value, 1-255 bytes of UTF-8, as the key stamps "
            f"tenant=VALUE on every event it sends {why}"
        ]
    assert api_keys.list_keys(make_backend(Settings(db=db))) == []
    longest = "\u00e9" * 127 + "x"  # 255 bytes
    made = _cli(
        "keys", "create", "--name", "t", "--scope", "ingest", "--tenant", longest, "--db", db
    )
    assert made.exit_code == 0, made.output
    assert [key.tenant for key in api_keys.list_keys(make_backend(Settings(db=db)))] == [longest]


async def test_a_tenants_event_with_the_most_tags_of_its_own_is_refused_whole(
    start_server: StartServer,
) -> None:
    server = await start_server(auth="on")
    secret = await trio.to_thread.run_sync(
        lambda: make_key(server.db, "acme", "ingest", tenant="acme")
    )
    fifteen = {f"t{n}": "v" for n in range(15)}
    events = [
        {"key": "k", "ts": TS, "tags": fifteen},
        {"key": "k", "ts": TS, "tags": {**fifteen, "t15": "v"}},
    ]
    before = snapshot(server.db)
    refused = await server.client.post("/v1/events", json=events, headers=bearer(secret))
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_events"
    assert [(d["index"], d["field"]) for d in error["details"]] == [(1, "tags")]
    assert "at most 15 tags besides tenant" in error["details"][0]["message"]
    assert snapshot(server.db) == before
    sent = await server.client.post("/v1/events", json=events[:1], headers=bearer(secret))
    assert sent.status_code == 200, sent.text
    ((_, tags, _, _),) = stored_series(server.db)
    assert len(json.loads(tags)) == 16


async def test_a_request_without_a_key_is_refused_before_its_body_is_sent(
    start_server: StartServer,
) -> None:
    server = await start_server(auth="on")
    host, port = server.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        head = (
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 5000000\r\n\r\n"
        )
        await stream.send_all(head.encode())  # and not one byte of the 5 MB body
        answer = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive_some()
    status, *headers = answer.split(b"\r\n\r\n")[0].decode().lower().split("\r\n")
    assert status.startswith("http/1.1 401")
    assert "connection: close" in headers  # the unread body never becomes a request
    assert stored_counts(server.db) == {}


async def test_the_python_client_sends_its_key(start_server: StartServer) -> None:
    from trioagg.client import Client, ServerError

    server = await start_server(auth="on")
    secret = await trio.to_thread.run_sync(make_key, server.db, "py", "ingest", "read")

    def use_the_client() -> tuple[Any, Any, str]:
        with Client(server.url, api_key=secret) as client:
            client.send("py.k", 2.0, ts=TS)
            client.flush()
            listed = client.keys()
        with Client(server.url) as anonymous:
            anonymous.send("py.k", 3.0, ts=TS)
            anonymous.flush()
            with pytest.raises(ServerError) as refused:
                anonymous.keys()
        return listed, anonymous.counters, f"{refused.value.status} {refused.value.code}"

    listed, counters, refusal = await trio.to_thread.run_sync(use_the_client)
    assert [info.key for info in listed] == ["py.k"]
    assert counters.failed == 1 and counters.acknowledged == 0  # 401: not retried
    assert refusal == "401 unauthorized"
    assert stored_counts(server.db) == {"py.k": 1}
