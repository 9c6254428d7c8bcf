"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import platform

from prometheus_client.parser import text_string_to_metric_families

from trioagg import __version__

from .conftest import Server, post


async def test_healthz_and_readyz(server: Server) -> None:
    assert (await server.client.get("/healthz")).json() == {"status": "ok"}
    response = await server.client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"store": "ok", "writer": "running", "queue": "ok"}


async def test_metrics_count_what_happened(server: Server) -> None:
    await post(server.client, [{"key": "m"}] * 3)
    await post(server.client, [{"key": "m"}, {"key": "m", "value": "x"}])
    await server.client.get("/v1/aggregates", params={"key": "m"})
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
        for method in rule.methods - {"HEAD", "OPTIONS"}
        if rule.endpoint not in ("static", "dashboard_file")  # files, not API
    }
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == described
    event = document["components"]["schemas"]["Event"]
    assert set(event["properties"]) == {"key", "ts", "value", "tags", "distinct_id", "id"}
    assert event["additionalProperties"] is False


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
