"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import itertools
import platform
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trioagg import __version__
from trioagg.core.settings import Settings
from trioagg.http.app import TrioaggApp, api_views, route
from trioagg.http.dashboard import dashboard_views
from trioagg.service.metrics import Coalesced

from .conftest import Server, post, wait_until


async def test_healthz_and_readyz(server: Server) -> None:
    assert (await server.client.get("/healthz")).json() == {"status": "ok"}
    response = await server.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"store": "ok", "writer": "running", "queue": "ok"}


async def test_metrics_count_what_happened(server: Server) -> None:
    await post(server.client, [{"key": "m"}] * 3)
    await post(server.client, [{"key": "m"}, {"key": "m", "value": "x"}])
    await server.client.get("/v1/aggregates", params={"key": "m"})
    await server.app.service.writers.flushed()
    text = (await server.client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("trioagg_events_accepted_total", ())] == 3
    assert samples[("trioagg_events_committed_total", ())] == 3
    assert samples[("trioagg_events_rejected_total", ())] == 2
    assert samples[("trioagg_requests_rejected_total", (("code", "invalid_events"),))] == 1
    assert samples[("trioagg_rows_upserted_total", ())] == 1
    assert samples[("trioagg_batch_events_count", ())] == 1
    assert samples[("trioagg_commit_seconds_count", ())] == 1
    assert samples[("trioagg_queue_depth", ())] == 0
    assert samples[("trioagg_queue_capacity", ())] == 1024
    assert samples[("trioagg_queue_waiting_senders", ())] == 0

    def timed(endpoint: str, status: str) -> float:
        return samples[
            ("trioagg_request_seconds_count", (("endpoint", endpoint), ("status", status)))
        ]

    assert timed("/v1/events", "200") == 1
    assert timed("/v1/events", "422") == 1
    assert timed("/v1/aggregates", "200") == 1
    assert (
        samples[
            (
                "trioagg_build_info",
                (("python", platform.python_version()), ("version", __version__)),
            )
        ]
        == 1
    )
    assert samples[("process_cpu_seconds_total", ())] > 0


async def test_every_answer_is_timed_errors_included(server: Server) -> None:
    await server.client.get("/v1/keys")
    await server.client.get("/v1/top", params={"stat": "nope"})
    await server.client.get("/nowhere")
    text = (await server.client.get("/metrics")).text
    timed = {
        (s.labels["endpoint"], s.labels["status"])
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "trioagg_request_seconds_count"
    }
    assert {("/v1/keys", "200"), ("/v1/top", "422"), ("unrouted", "404")} <= timed


async def test_openapi_describes_every_endpoint(server: Server) -> None:
    document = (await server.client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    routes = {
        (rule.rule, method.lower())
        for rule in server.app.url_map.iter_rules()
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
        if rule.endpoint not in ("static", "dashboard_file")  # files, not API
    }
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == described
    event = document["components"]["schemas"]["Event"]
    assert set(event["properties"]) == {"key", "ts", "value", "tags", "distinct_id", "id"}
    assert event["additionalProperties"] is False


def test_an_endpoint_without_its_view_or_a_view_without_one_fails_as_the_app_is_made(
    tmp_path: Path,
) -> None:
    def app() -> TrioaggApp:
        return TrioaggApp(Settings(db=str(tmp_path / "t.db")))

    made = app()
    views = {**api_views(made), **dashboard_views(made)}
    route(app(), views)  # the table and the views agree
    del views["get_top"]
    with pytest.raises(RuntimeError, match="no view answers GET /v1/top"):
        route(app(), views)
    views["get_top"] = views["get_keys"]
    views["get_everything"] = views["get_keys"]
    with pytest.raises(RuntimeError, match="views of no endpoint: get_everything"):
        route(app(), views)


async def test_every_openapi_parameter_has_a_description_and_an_example(server: Server) -> None:
    document = (await server.client.get("/openapi.json")).json()
    parameters = [
        parameter
        for item in document["paths"].values()
        for operation in item.values()
        for parameter in operation.get("parameters", [])
    ]
    assert len(parameters) == 18  # wait; 9 of aggregates; 3 of keys; 5 of top
    for parameter in parameters:
        assert parameter["description"], parameter["name"]
        assert "example" in parameter, parameter["name"]


async def test_concurrent_callers_share_runs_started_after_their_call() -> None:
    """However many callers come, one run is under way and one waits; each caller's result
    comes from a run that started after its call."""
    order = itertools.count()  # calls and run starts, in the order they happen
    gates: list[trio.Event] = []

    async def run() -> int:
        started = next(order)
        gates.append(trio.Event())
        await gates[-1].wait()
        return started

    shared = Coalesced(run)
    results: list[tuple[int, int]] = []

    async def call() -> None:
        called = next(order)
        results.append((called, await shared()))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(gates), shared.callers) == (1, 20)  # the first caller's run, under way
        for _ in range(20):  # more callers meanwhile: they share the one run waiting
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(gates), shared.callers) == (1, 40)
        gates[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert (len(gates), shared.callers) == (2, 39)
        for _ in range(5):
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert (len(gates), shared.callers) == (2, 44)
        gates[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert (len(gates), shared.callers) == (3, 5)
        gates[2].set()
    assert len(results) == 45 and len(gates) == 3 and shared.callers == 0
    assert all(started > called for called, started in results), results
    assert len({started for _, started in results}) == 3


def _echo(value: int) -> int:
    return value


async def test_a_cancelled_caller_breaks_no_other() -> None:
    """A run's caller cancelled before its worker thread started (waiting for the
    limiter): the callers sharing the run start another one; a waiting caller cancelled
    leaves the others be."""
    order = itertools.count()
    limiter = trio.CapacityLimiter(1)
    starts: list[tuple[int, str]] = []  # (order, caller) of each run
    names: dict[trio.lowlevel.Task, str] = {}

    async def run() -> int:
        starts.append((next(order), names[trio.lowlevel.current_task()]))
        return await trio.to_thread.run_sync(_echo, starts[-1][0], limiter=limiter)

    shared = Coalesced(run)
    answers: dict[str, int] = {}
    scopes: dict[str, trio.CancelScope] = {}

    async def call(name: str) -> None:
        names[trio.lowlevel.current_task()] = name
        called = next(order)
        with trio.CancelScope() as scopes[name]:
            answers[name] = await shared()
            assert answers[name] > called

    async def arrive(*names: str) -> None:
        for name in names:
            nursery.start_soon(call, name)
            await trio.testing.wait_all_tasks_blocked()

    async def cancel(name: str) -> None:
        scopes[name].cancel()
        await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery, limiter:  # no run's thread can start yet
        await arrive("a")  # a's run, waiting for the limiter
        await arrive("b", "c", "d")  # they wait for the next run
        await cancel("a")
        assert [caller for _, caller in starts[1:]] in (["b"], ["c"], ["d"])
        await cancel(starts[1][1])  # the others of b, c, d start a third run and share it
        assert len(starts) == 3
        sharing = {"b", "c", "d"} - {starts[1][1]}
        assert starts[2][1] in sharing
        await arrive("e", "f")  # they wait for the next run
        await cancel("e")
        assert shared.callers == 3 and len(starts) == 3
    assert answers == {**dict.fromkeys(sharing, starts[2][0]), "f": starts[3][0]}
    assert len(starts) == 4 and shared.callers == 0


async def test_a_failed_run_fails_only_its_caller() -> None:
    gates: list[trio.Event] = []

    async def run() -> int:
        gates.append(trio.Event())
        await gates[-1].wait()
        if len(gates) == 2:
            raise RuntimeError("the second run fails")
        return len(gates)

    shared = Coalesced(run)
    answers: list[int | str] = []

    async def call() -> None:
        try:
            answers.append(await shared())
        except RuntimeError as error:
            answers.append(str(error))

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # the first starts a run, the others share the next one
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
        gates[0].set()
        await trio.testing.wait_all_tasks_blocked()
        gates[1].set()  # the second run, started by one caller, fails: the other runs again
        await trio.testing.wait_all_tasks_blocked()
        gates[2].set()
    assert answers == [1, "the second run fails", 3]


async def test_runs_rest_in_proportion_to_their_length(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Callers that keep coming find a run under way at most 1 / (1 + rest) of the time;
    a lone caller after a pause is not kept waiting."""
    mock_clock.autojump_threshold = 0
    spans: list[tuple[float, float]] = []

    async def run() -> float:
        started = trio.current_time()
        await trio.sleep(2)
        spans.append((started, trio.current_time()))
        return started

    shared = Coalesced(run, rest=0.5)

    async def keep_calling() -> None:
        for _ in range(4):
            called = trio.current_time()
            assert await shared() >= called

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(keep_calling)
    assert len(spans) >= 4
    assert [later[0] - earlier[1] for earlier, later in itertools.pairwise(spans)] == [1.0] * (
        len(spans) - 1
    )
    await trio.sleep(1)  # as long as a rest: the next run starts at once
    called = trio.current_time()
    assert await shared() == called


async def test_a_burst_of_scrapes_waits_for_one_render_and_counts_exactly(
    server: Server,
) -> None:
    """Scrapes made while no render can start (its thread's limiter is held) wait for one
    render thread between them (and one sum for /v1/status), and every answer counts what
    happened before it."""
    assert (await post(server.client, [{"key": "m"}] * 3)).status_code == 200
    metrics = server.app.metrics
    answers: list[tuple[str, int, str]] = []

    async def ask(path: str) -> None:
        response = await server.client.get(path)
        answers.append((path, response.status_code, response.text))

    async with trio.open_nursery() as nursery, metrics.rendering:
        for _ in range(12):
            nursery.start_soon(ask, "/metrics")
            nursery.start_soon(ask, "/v1/status")
        await wait_until(lambda: (metrics.rendered.callers, metrics.totals.callers) == (12, 12))
        assert metrics.rendering.statistics().tasks_waiting == 2  # a render and a sum
    assert len(answers) == 24 and {status for _, status, _ in answers} == {200}
    for path, _, text in answers:
        if path == "/v1/status":
            figures = msgspec.json.decode(text)
            assert (figures["events_accepted"], figures["events_committed"]) == (3, 3)
        else:
            samples = {
                s.name: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if not s.labels
            }
            assert samples["trioagg_events_accepted_total"] == 3
            assert samples["trioagg_events_committed_total"] == 3
