"""What the dashboard needs from the server, over HTTP: the page and its files with their
caching headers, ``GET /v1/status``, and CORS for the origins ``--cors-origin`` names.
The page itself is tested in a browser (test_dashboard_browser.py). And where the
screenshot tool writes."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from email.utils import parsedate_to_datetime
from importlib import resources
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trioagg import __version__
from trioagg.core.errors import ConfigError
from trioagg.core.settings import Settings, parse_origins

from .conftest import Server, StartServer, post


async def test_the_page_is_served_with_its_files(server: Server) -> None:
    page = await server.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    prefix = re.search(r'src="(static/[0-9a-f]{16})/dashboard.js"', page.text)
    assert prefix is not None, page.text
    assert "{{static}}" not in page.text

    again = await server.client.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    script = await server.client.get(f"/{prefix[1]}/dashboard.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert script.headers["x-content-type-options"] == "nosniff"
    shipped = resources.files("trioagg.http") / "web" / "dashboard.js"
    assert script.content == shipped.read_bytes()
    cached = await server.client.get(
        f"/{prefix[1]}/dashboard.js", headers={"If-None-Match": script.headers["etag"]}
    )
    assert cached.status_code == 304

    chart_library = await server.client.get(f"/{prefix[1]}/uplot/uPlot.esm.js")
    assert chart_library.status_code == 200 and b"uPlot" in chart_library.content
    license_text = await server.client.get(f"/{prefix[1]}/uplot/LICENSE")
    assert license_text.headers["content-type"] == "text/plain; charset=utf-8"
    assert "MIT" in license_text.text


@pytest.mark.parametrize(
    "path",
    [
        "/static/0000000000000000/dashboard.js",  # another version's address
        "/static/{version}/missing.js",
        "/static/{version}/../app.py",
        "/static/{version}/index.html",  # the page is served at / only
        "/static/dashboard.js",  # no other way to the files (Quart's own static folder)
        "/web/dashboard.js",
    ],
)
async def test_unknown_files_are_404_in_the_error_envelope(server: Server, path: str) -> None:
    page = (await server.client.get("/")).text
    version = re.search(r"static/([0-9a-f]{16})/", page)
    assert version is not None
    response = await server.client.get(path.format(version=version[1]))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_status_reads_what_metrics_count(start_server: StartServer) -> None:
    server = await start_server(quantiles="api.*,db.?", bucket="15m")
    assert (await post(server.client, [{"key": "a"}] * 3)).status_code == 200
    assert (await post(server.client, [{"key": "a", "value": "x"}])).status_code == 422
    answered = await server.client.get("/v1/status")
    status = answered.json()
    metrics = {
        sample.name: sample.value
        for family in text_string_to_metric_families((await server.client.get("/metrics")).text)
        for sample in family.samples
        if not sample.labels
    }
    # The server's clock when it answered, as its Date header says it (to the second);
    # the figures are taken before, by as long as a loaded machine keeps the answer.
    date = parsedate_to_datetime(answered.headers["date"]).timestamp()
    assert date - 30 <= status.pop("time") < date + 1
    assert status == {
        "version": __version__,
        "bucket_seconds": 900,
        "quantiles": ["api.*", "db.?"],
        "events_accepted": 3,
        "events_committed": 3,
        "events_rejected": 1,
        "events_lost": 0,
        "queue_depth": 0,
        "queue_capacity": 1024,
        "commits": metrics["trioagg_commit_seconds_count"],
        "commit_seconds_sum": metrics["trioagg_commit_seconds_sum"],
        "loop_stall_max_seconds": metrics["trioagg_loop_stall_max_seconds"],
        "statsd_datagrams": 0,
        "statsd_lines_parsed": 0,
        "statsd_lines_refused": 0,
        "statsd_events_dropped": 0,
        "otlp_points_accepted": 0,
        "otlp_points_rejected": 0,
    }
    assert status["commits"] >= 1


async def test_status_refuses_parameters_it_does_not_take(server: Server) -> None:
    response = await server.client.get("/v1/status", params={"key": "a"})
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [
        {"parameter": "key", "message": "unknown parameter"}
    ]


GRAFANA = "https://grafana.example.com"


async def test_cors_lets_the_named_origins_read(start_server: StartServer) -> None:
    server = await start_server(cors_origin=f"{GRAFANA}, http://localhost:3000")
    keys = await server.client.get("/v1/keys", headers={"Origin": GRAFANA})
    assert keys.status_code == 200
    assert keys.headers["access-control-allow-origin"] == GRAFANA
    assert "Origin" in keys.headers["vary"]
    refused = await server.client.get("/v1/aggregates", headers={"Origin": GRAFANA})
    assert refused.status_code == 422  # errors are readable too, or the page sees nothing
    assert refused.headers["access-control-allow-origin"] == GRAFANA
    other = await server.client.get("/v1/keys", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers

    preflight = await server.client.options(
        "/v1/events",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"].lower() == "content-type"
    assert preflight.headers["access-control-max-age"] == "600"


async def test_any_origin_with_a_star(start_server: StartServer) -> None:
    server = await start_server(cors_origin="*")
    response = await server.client.get("/v1/status", headers={"Origin": "https://a.example"})
    assert response.headers["access-control-allow-origin"] == "*"


async def test_no_cors_headers_by_default(server: Server) -> None:
    response = await server.client.get("/v1/keys", headers={"Origin": GRAFANA})
    assert response.status_code == 200
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_origins_are_checked() -> None:
    assert parse_origins("none") == ()
    assert parse_origins("*") == ("*",)
    assert parse_origins("HTTPS://Grafana.example.com:3000,http://[::1]:8080") == (
        "https://grafana.example.com:3000",
        "http://[::1]:8080",
    )
    for bad in ("grafana.example.com", "https://grafana.example.com/", "https://a.b/path"):
        with pytest.raises(ValueError, match="is not an origin"):
            parse_origins(bad)
    with pytest.raises(ConfigError, match="--cors-origin / TRIOAGG_CORS_ORIGIN"):
        Settings.from_text({"cors_origin": "example.com"})


def test_the_screenshot_goes_where_git_does_not_look_unless_told() -> None:
    """`just screenshot` is for looking at the page: by default it must not overwrite the
    README's tracked picture; ``--out docs/dashboard.png`` is how that is updated."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("screenshot", root / "tools" / "screenshot.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tool.parse_args([]).out
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=root, check=False)
    assert ignored.returncode == 0, f"{out} is not ignored by git"
    told = tool.parse_args(["--out", "docs/dashboard.png"]).out
    assert told == Path("docs/dashboard.png")
