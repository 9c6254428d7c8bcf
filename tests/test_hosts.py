"""The Host check against DNS rebinding: the matching directly, and real servers over
real HTTP, with the store checked unchanged after every refused request."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import httpx
import pytest
import trio

from trioagg.core.errors import ConfigError, MisdirectedRequest
from trioagg.core.settings import Settings
from trioagg.http.hosts import AllowedHosts
from trioagg.keys import admin as api_keys
from trioagg.store import make_backend

from .conftest import StartServer, metric, public_address, stored_counts

TS = 1795514400  # 2026-11-24T10:00:00Z
READ = {"key": "k", "from": "2026-11-24T00:00:00Z", "to": "2026-11-25T00:00:00Z"}

# -- the matching ------------------------------------------------------------------

DEFAULT = AllowedHosts(())


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:8000",
        "localhost.",
        "localhost.:8000",
        "app.localhost",
        "a.b.Localhost:1",
        "127.0.0.1",
        "127.0.0.1:8000",
        "127.9.8.7:80",
        "[::1]",
        "[::1]:8000",
        "[0:0:0:0:0:0:0:1]:8000",
        "[::ffff:127.0.0.1]:8000",
        "localhost:",  # an empty port is the default one (RFC 3986)
    ],
)
def test_this_servers_own_names_are_allowed(host: str) -> None:
    assert DEFAULT.allows(host, "127.0.0.1")


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
        "evillocalhost",
        "localhost..",
        "::1",  # an IPv6 address must be in brackets
        "[::1",
        "[localhost]",
        "localhost:80:80",
        "localhost:http",
        "local host",
        "",
        "0.0.0.0:8000",  # a wildcard address names no server
        "10.0.0.5",
        "[2001:db8::1]",
        "127.0.0.1.evil.example",
    ],
)
def test_other_hosts_are_refused(host: str) -> None:
    assert not DEFAULT.allows(host, "127.0.0.1")
    with pytest.raises(MisdirectedRequest, match="--allowed-hosts"):
        DEFAULT.check(host, ("127.0.0.1", 8000))


def test_no_host_is_allowed() -> None:
    DEFAULT.check(None, ("127.0.0.1", 8000))  # HTTP/1.0: browsers always send one


def test_the_address_a_connection_reached_is_allowed() -> None:
    assert DEFAULT.allows("10.0.0.5:8000", "10.0.0.5")  # a pod's IP, under a wildcard bind
    assert DEFAULT.allows("10.0.0.5", "::ffff:10.0.0.5")  # a dual-stack socket
    assert DEFAULT.allows("[FD00::5]:8000", "fd00::5")
    assert not DEFAULT.allows("10.0.0.6:8000", "10.0.0.5")
    assert not DEFAULT.allows("10.0.0.5", None)  # a Unix socket reaches no address
    assert DEFAULT.allows("localhost", None)


def test_the_host_the_server_listens_on_is_allowed() -> None:
    named = AllowedHosts.of(Settings(host="Box.LAN."))
    assert named.allows("box.lan:8000", None)
    assert AllowedHosts.of(Settings(host="10.0.0.5")).allows("10.0.0.5", None)
    for wildcard in ("0.0.0.0", "::"):
        assert not AllowedHosts.of(Settings(host=wildcard)).allows(wildcard, None)


def test_allowed_hosts_add_names_patterns_and_addresses() -> None:
    settings = Settings.from_text(
        {"allowed_hosts": "Trioagg.Internal., *.example.com, 203.0.113.9, [2001:DB8::1]"}
    )
    assert settings.allowed_hosts == (
        "trioagg.internal",
        "*.example.com",
        "203.0.113.9",
        "2001:db8::1",
    )
    hosts = AllowedHosts.of(settings)
    for host in (
        "trioagg.internal",
        "TRIOAGG.internal.:8000",
        "a.example.com",
        "a.b.example.com:443",
        "203.0.113.9:8000",
        "[2001:db8:0::1]:8000",
        "localhost",
    ):
        assert hosts.allows(host, "127.0.0.1"), host
    for host in ("example.com", "badexample.com", "trioagg.internal.evil", "203.0.113.10"):
        assert not hosts.allows(host, "127.0.0.1"), host


def test_a_star_allows_any_host() -> None:
    anything = AllowedHosts.of(Settings.from_text({"allowed_hosts": "*"}))
    for host in ("evil.example", "", "[::1"):
        anything.check(host, ("127.0.0.1", 8000))


@pytest.mark.parametrize(
    "text", ["trioagg.internal:8000", "http://trioagg.internal", "a b", "[10.0.0.1]", "*.*.x"]
)
def test_a_bad_allowed_host_names_the_flag_and_the_variable(text: str) -> None:
    message = re.escape("--allowed-hosts / TRIOAGG_ALLOWED_HOSTS") + ".*is not a host"
    with pytest.raises(ConfigError, match=message):
        Settings.from_text({"allowed_hosts": text})


# -- real servers --------------------------------------------------------------------


def _host(server_url: str, name: str) -> dict[str, str]:
    return {"Host": f"{name}:{httpx.URL(server_url).port}"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_keyless_server_answers_only_requests_naming_it(
    start_server: StartServer,
) -> None:
    server = await start_server()  # auth auto, on loopback, no key: keys are not required
    client = server.client
    for name in ("evil.example", "EVIL.example.", "127.0.0.1.evil.example"):
        headers = _host(server.url, name)
        refused = [
            await client.post("/v1/events", json={"key": "k", "ts": TS}, headers=headers),
            await client.get("/v1/aggregates", params=READ, headers=headers),
            await client.get("/v1/status", headers={"Host": name}),
        ]
        for response in refused:
            assert response.status_code == 421, response.text
            error = response.json()["error"]
            assert error["code"] == "misdirected_request"
            assert "--allowed-hosts" in error["message"] and name in error["message"]
    assert stored_counts(server.db) == {}
    # Probes reach a server by whatever address: the endpoints without data are not checked.
    for path in ("/healthz", "/readyz", "/openapi.json"):
        response = await client.get(path, headers=_host(server.url, "evil.example"))
        assert response.status_code == 200, (path, response.text)
    for name in ("localhost", "127.0.0.1"):
        headers = _host(server.url, name)
        written = await client.post("/v1/events", json={"key": "k", "ts": TS}, headers=headers)
        assert written.status_code == 200, written.text
        read = await client.get("/v1/aggregates", params=READ, headers=headers)
        assert read.status_code == 200, read.text
    assert read.json()["results"][0]["buckets"][0]["count"] == 2
    assert stored_counts(server.db) == {"k": 2}
    assert await metric(server, "trioagg_requests_rejected_total", code="misdirected_request") == 9


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_an_http_1_0_request_without_host_is_let_in(start_server: StartServer) -> None:
    """As security.md says (browsers always send a Host): it was refused 421, because
    the empty Host Quart fills in for HTTP/1.0 was checked as a name."""
    server = await start_server()
    url = httpx.URL(server.url)
    assert url.host is not None and url.port is not None
    for path in (f"/v1/aggregates?{urlencode(READ)}", "/v1/keys"):  # hot path, Quart
        stream = await trio.open_tcp_stream(url.host, url.port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_allowed_hosts_admits_its_hosts(start_server: StartServer) -> None:
    listed = await start_server(allowed_hosts="trioagg.internal,*.example.com")
    for name, status in (
        ("trioagg.internal", 200),
        ("api.example.com", 200),
        ("example.com", 421),
        ("evil.example", 421),
    ):
        response = await listed.client.get("/v1/keys", headers=_host(listed.url, name))
        assert response.status_code == status, (name, response.text)
    anything = await start_server(allowed_hosts="*")
    response = await anything.client.get("/v1/keys", headers=_host(anything.url, "evil.example"))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_with_keys_required_the_key_decides_whatever_the_host(
    start_server: StartServer,
) -> None:
    server = await start_server(auth="on")
    secret = await trio.to_thread.run_sync(
        lambda: api_keys.create_key(make_backend(Settings(db=server.db)), "ci", ("ingest",))
    )
    foreign = _host(server.url, "evil.example")
    response = await server.client.post("/v1/events", json={"key": "k", "ts": TS}, headers=foreign)
    assert response.status_code == 401, response.text  # a rebinding page has no key
    keyed = {**foreign, "Authorization": f"Bearer {secret}"}
    response = await server.client.post("/v1/events", json={"key": "k", "ts": TS}, headers=keyed)
    assert response.status_code == 200, response.text
    assert stored_counts(server.db) == {"k": 1}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_wildcard_bind_answers_the_address_each_connection_reached(
    start_server: StartServer,
) -> None:
    server = await start_server(host="0.0.0.0", auth="off")
    port = httpx.URL(server.url).port
    address = public_address()
    async with httpx.AsyncClient(base_url=f"http://{address}:{port}") as public:
        assert (await public.get("/v1/keys")).status_code == 200  # Host: ADDRESS:PORT
        refused = await public.get("/v1/keys", headers={"Host": "evil.example"})
        assert refused.status_code == 421, refused.text
    local = await server.client.get(f"http://127.0.0.1:{port}/v1/keys")
    assert local.status_code == 200, local.text
