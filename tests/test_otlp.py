"""OpenTelemetry metrics: the mapping of data points to events tested directly, then the
real SDK and OTLP/HTTP exporter exporting to a running trioagg, delta and cumulative,
the totals read back exactly over /v1/aggregates; malformed payloads refused whole."""

from __future__ import annotations

import gzip
import json
import math
from typing import Any, cast

import httpx
import pytest
import trio
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE as CUMULATIVE,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_DELTA as DELTA,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from trioagg.core.errors import Forbidden, MalformedBody
from trioagg.ingest.decode import Limits
from trioagg.ingest.otlp import Last, Mapping, Streams, decode, map_request

from . import clock
from .conftest import StartServer, stored_counts

NOW = 1_790_000_000.0
NS = 1_000_000_000
T = int(NOW * NS)
LIMITS = Limits(max_batch=10_000, max_future=3600.0, max_age=86400.0)


def attrs(**values: Any) -> list[KeyValue]:
    out = []
    for name, value in values.items():
        if isinstance(value, bool):
            any_value = AnyValue(bool_value=value)
        elif isinstance(value, int):
            any_value = AnyValue(int_value=value)
        elif isinstance(value, float):
            any_value = AnyValue(double_value=value)
        elif isinstance(value, list):
            any_value = AnyValue()
            any_value.array_value.values.add(string_value="x")
        else:
            any_value = AnyValue(string_value=value)
        out.append(KeyValue(key=name, value=any_value))
    return out


def request_of(
    *metrics: Metric, resource: dict[str, Any] | None = None
) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.extend(attrs(**(resource or {"service.name": "shop"})))
    scope = resource_metrics.scope_metrics.add()
    scope.scope.name = "test"
    scope.metrics.extend(metrics)
    return request


def sum_metric(
    name: str,
    *points: tuple[int, int, float],
    temporality: Any = DELTA,
    monotonic: bool = True,
    **tags: Any,
) -> Metric:
    """A Sum whose points are (start ns, time ns, value)."""
    metric = Metric(name=name)
    metric.sum.aggregation_temporality = temporality
    metric.sum.is_monotonic = monotonic
    for start, at, value in points:
        point = metric.sum.data_points.add(start_time_unix_nano=start, time_unix_nano=at)
        point.as_double = value
        point.attributes.extend(attrs(**tags))
    return metric


def histogram_metric(name: str, temporality: Any, *points: dict[str, Any]) -> Metric:
    metric = Metric(name=name)
    metric.histogram.aggregation_temporality = temporality
    for fields in points:
        metric.histogram.data_points.add(**fields)
    return metric


def mapped_events(
    request: ExportMetricsServiceRequest, streams: Streams | None = None, **how: Any
) -> Any:
    mapping = Mapping(LIMITS, **how)
    if streams is None:
        streams = Streams(now_ns=T - 3600 * NS)
    mapped = map_request(request, mapping, streams, NOW)
    events = [(key, ts, value, json.loads(tags)) for key, ts, value, tags, _, _ in mapped.points]
    return events, mapped


def test_sums_and_gauges_map_to_events_of_their_name() -> None:
    gauge = Metric(name="queue.depth")
    gauge.gauge.data_points.add(time_unix_nano=T, as_int=7).attributes.extend(attrs(shard=3))
    request = request_of(sum_metric("orders", (T - NS, T, 2.5), region="eu", vip=True), gauge)
    events, mapped = mapped_events(request)
    assert events == [
        ("orders", NOW, 2.5, {"region": "eu", "vip": "true"}),
        ("queue.depth", NOW, 7.0, {"shard": "3"}),
    ]
    assert (mapped.accepted, sum(mapped.rejected.values()), mapped.error_message()) == (2, 0, "")


def test_resource_attributes_are_tags_only_where_the_operator_keeps_them() -> None:
    request = request_of(
        sum_metric("orders", (T - NS, T, 1.0)),
        resource={"service.name": "shop", "host.name": "h1", "process.command_args": ["x"]},
    )
    assert mapped_events(request)[0][0][3] == {}
    events, _ = mapped_events(request, resource_attributes=("service.*", "host.name"))
    assert events[0][3] == {"service.name": "shop", "host.name": "h1"}
    events, mapped = mapped_events(request, resource_attributes=("process.*",))
    assert events == [] and "holds array_value" in mapped.error_message()


def test_a_delta_histogram_gives_count_sum_min_max_and_buckets_exactly() -> None:
    request = request_of(
        histogram_metric(
            "latency",
            DELTA,
            {
                "start_time_unix_nano": T - NS,
                "time_unix_nano": T,
                "count": 6,
                "sum": 61.5,
                "min": 0.5,
                "max": 30.0,
                "explicit_bounds": [1.0, 10.0],
                "bucket_counts": [2, 0, 4],
            },
        )
    )
    events, mapped = mapped_events(request)
    assert [(k, v, t) for k, _, v, t in events] == [
        ("latency.count", 6.0, {}),
        ("latency.sum", 61.5, {}),
        ("latency.min", 0.5, {}),
        ("latency.max", 30.0, {}),
        ("latency.bucket", 2.0, {"le": "1"}),
        ("latency.bucket", 4.0, {"le": "+Inf"}),
    ]
    assert mapped.accepted == 1


def test_cumulative_points_become_deltas_per_stream() -> None:
    streams = Streams(now_ns=T - 3600 * NS)
    start = T - 60 * NS
    first = request_of(sum_metric("hits", (start, T, 10.0), temporality=CUMULATIVE))
    events, mapped = mapped_events(first, streams)
    assert [v for *_, v, _ in events] == [10.0]  # the stream started after the server
    streams.keep(mapped.updates)
    second = request_of(
        sum_metric("hits", (start, T + NS, 15.0), (start, T + NS, 15.0), temporality=CUMULATIVE),
        sum_metric("hits", (start, T + NS, 4.0), temporality=CUMULATIVE, route="/a"),
    )
    events, mapped = mapped_events(second, streams)
    assert [(v, t) for _, _, v, t in events] == [(5.0, {}), (4.0, {"route": "/a"})]
    assert mapped.rejected == {"duplicate": 1}  # the same point twice
    streams.keep(mapped.updates)
    restarted = request_of(
        sum_metric("hits", (T + 2 * NS, T + 3 * NS, 2.0), temporality=CUMULATIVE)
    )
    events, mapped = mapped_events(restarted, streams)
    assert [v for *_, v, _ in events] == [2.0]  # a new start: all of it since then
    streams.keep(mapped.updates)
    down = request_of(sum_metric("hits", (T + 2 * NS, T + 4 * NS, 1.0), temporality=CUMULATIVE))
    events, mapped = mapped_events(down, streams)
    assert events == [] and mapped.rejected == {"value": 1}
    assert "went down without a new start time" in mapped.error_message()
    updown = request_of(
        sum_metric(
            "level", (start, T, 5.0), (start, T + NS, 3.0), temporality=CUMULATIVE, monotonic=False
        )
    )
    events, mapped = mapped_events(updown, streams)
    assert [v for *_, v, _ in events] == [5.0, -2.0]  # an up-down counter may go down


def test_a_stream_older_than_the_server_gives_a_baseline_first() -> None:
    streams = Streams(now_ns=T - 10 * NS)
    before = T - 3600 * NS
    events, mapped = mapped_events(
        request_of(sum_metric("hits", (before, T, 100.0), temporality=CUMULATIVE)), streams
    )
    assert events == [] and mapped.rejected == {"baseline": 1}
    assert "kept as the stream's baseline" in mapped.error_message()
    streams.keep(mapped.updates)
    events, _ = mapped_events(
        request_of(sum_metric("hits", (before, T + NS, 103.0), temporality=CUMULATIVE)), streams
    )
    assert [v for *_, v, _ in events] == [3.0]


def test_streams_are_bounded_and_forgetting_one_makes_old_streams_baselines() -> None:
    streams = Streams(limit=1, now_ns=T - 3600 * NS)
    streams.keep({b"a": _last(), b"b": _last()}, now_ns=T - 5 * NS)
    assert len(streams) == 1 and streams.complete_since == T - 5 * NS


def _last() -> Last:
    return Last(0, 1, (1.0,))


def test_a_cumulative_histogram_gives_deltas_of_count_sum_and_buckets() -> None:
    streams = Streams(now_ns=T - 3600 * NS)
    start = T - 60 * NS
    point = {"start_time_unix_nano": start, "explicit_bounds": [5.0], "min": 1.0, "max": 9.0}
    for at, count, total, buckets, expected in (
        (T, 3, 12.0, [2, 1], [3.0, 12.0, 2.0, 1.0]),
        (T + NS, 5, 30.0, [2, 3], [2.0, 18.0, 2.0]),  # the first bucket did not move
    ):
        request = request_of(
            histogram_metric(
                "size",
                CUMULATIVE,
                {
                    **point,
                    "time_unix_nano": at,
                    "count": count,
                    "sum": total,
                    "bucket_counts": buckets,
                },
            )
        )
        events, mapped = mapped_events(request, streams)
        assert [v for *_, v, _ in events] == expected
        assert "min and max of cumulative histograms are not stored" in mapped.error_message()
        streams.keep(mapped.updates)


def test_cumulative_points_are_refused_where_several_workers_cannot_follow_them() -> None:
    request = request_of(sum_metric("hits", (T - NS, T, 1.0), temporality=CUMULATIVE))
    events, mapped = mapped_events(request, follows_streams=False)
    assert events == [] and mapped.rejected == {"temporality": 1}
    assert "export with delta temporality" in mapped.error_message()


@pytest.mark.parametrize(
    ("metric", "reason"),
    [
        (sum_metric("x", (T - NS, T, math.nan)), "value"),
        (sum_metric("x", (T - NS, T, 1e101)), "value"),
        (sum_metric("x", (0, 0, 1.0)), "time"),
        (sum_metric("x", (T, T + 2 * 3600 * NS, 1.0)), "time"),
        (sum_metric("x", (T - NS, T, 1.0), temporality=0), "temporality"),
        (sum_metric("x", (T - NS, T, 1.0), **cast(dict[str, Any], {"9bad": "v"})), "tags"),
        (sum_metric("x", (T - NS, T, 1.0), label="v" * 256), "tags"),
        (
            sum_metric(
                "x", (T - NS, T, 1.0), **cast(dict[str, Any], {f"a{i}": "v" for i in range(17)})
            ),
            "tags",
        ),
        (sum_metric("", (T - NS, T, 1.0)), "name"),
        (
            histogram_metric(
                "h",
                DELTA,
                {"time_unix_nano": T, "count": 2, "explicit_bounds": [1.0], "bucket_counts": [1]},
            ),
            "value",
        ),
        (
            histogram_metric(
                "h",
                DELTA,
                {
                    "time_unix_nano": T,
                    "count": 2,
                    "explicit_bounds": [1.0],
                    "bucket_counts": [1, 2],
                },
            ),
            "value",
        ),
    ],
)
def test_a_point_that_cannot_be_stored_exactly_is_refused_alone(
    metric: Metric, reason: str
) -> None:
    events, mapped = mapped_events(request_of(sum_metric("ok", (T - NS, T, 1.0)), metric))
    assert [k for k, *_ in events] == ["ok"]
    assert mapped.rejected == {reason: 1} and mapped.accepted == 1
    assert mapped.error_message().startswith("1 data point(s) rejected, e.g. ")


def test_no_recorded_value_points_are_skipped() -> None:
    metric = sum_metric("x", (T - NS, T, 1.0))
    metric.sum.data_points[0].flags = 1
    events, mapped = mapped_events(request_of(metric))
    assert events == [] and mapped.accepted == 0 and not mapped.rejected


def test_exponential_histograms_and_summaries_keep_what_is_exact() -> None:
    exponential = Metric(name="e")
    exponential.exponential_histogram.aggregation_temporality = DELTA
    exponential.exponential_histogram.data_points.add(
        time_unix_nano=T, count=4, sum=10.0, min=1.0, max=4.0, scale=1
    )
    summary = Metric(name="s")
    summary.summary.data_points.add(start_time_unix_nano=T - NS, time_unix_nano=T, count=3, sum=9.0)
    events, mapped = mapped_events(request_of(exponential, summary))
    assert [(k, v) for k, _, v, _ in events] == [
        ("e.count", 4.0),
        ("e.sum", 10.0),
        ("e.min", 1.0),
        ("e.max", 4.0),
        ("s.count", 3.0),
        ("s.sum", 9.0),
    ]
    assert "buckets of exponential histograms are not stored" in mapped.error_message()
    assert "quantiles of summaries are not stored" in mapped.error_message()


def test_a_tenant_key_stamps_its_tenant_and_refuses_another() -> None:
    events, _ = mapped_events(request_of(sum_metric("x", (T - NS, T, 1.0))), tenant="acme")
    assert events[0][3] == {"tenant": "acme"}
    with pytest.raises(Forbidden):
        mapped_events(request_of(sum_metric("x", (T - NS, T, 1.0), tenant="other")), tenant="acme")


def test_the_same_point_gets_the_same_ids_so_a_retried_export_counts_once() -> None:
    request = request_of(sum_metric("x", (T - NS, T, 1.0), (T, T + NS, 1.0)))
    ids = [p[5] for p in mapped_events(request)[1].points]
    assert ids == [p[5] for p in mapped_events(request)[1].points] and len(set(ids)) == 2
    # another tenant's same export is its own: no id of one drops the other's events
    acme, globex = ([p[5] for p in mapped_events(request, tenant=t)[1].points] for t in ("a", "g"))
    assert not set(acme) & set(globex)


def test_bodies_that_are_not_requests_are_malformed() -> None:
    with pytest.raises(MalformedBody, match="in protobuf"):
        decode(b"\xff\xff\xff", protobuf=True)
    with pytest.raises(MalformedBody, match="in JSON"):
        decode(b'{"resourceMetrics": 3}', protobuf=False)
    with pytest.raises(MalformedBody, match="in JSON"):
        decode(b"\xff", protobuf=False)
    request = request_of(sum_metric("x", (T - NS, T, 1.0)))
    assert decode(json_format.MessageToJson(request).encode(), protobuf=False) == request


# -- The real SDK and exporter against a running server.


def sdk(
    url: str, temporality: AggregationTemporality, **exporter: Any
) -> tuple[MeterProvider, Any]:
    preferred: dict[type, AggregationTemporality] = {
        kind: temporality for kind in (Counter, UpDownCounter, Histogram)
    }
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(
            endpoint=f"{url}/v1/metrics", preferred_temporality=preferred, **exporter
        ),
        export_interval_millis=3_600_000,
    )
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": "shop"})
    )
    return provider, provider.get_meter("test")


async def totals(client: httpx.AsyncClient, key: str, stats: str, **params: Any) -> list[Any]:
    answer = await client.get(
        "/v1/aggregates", params={"key": key, "granularity": "all", "stats": stats, **params}
    )
    assert answer.status_code == 200, answer.text
    return [
        (r["tags"], r["buckets"][0] if r["buckets"] else None) for r in answer.json()["results"]
    ]


def bucket(found: list[Any]) -> dict[str, Any]:
    ((_, first),) = found
    return {k: v for k, v in first.items() if k != "start"}


@pytest.mark.parametrize(
    "temporality", [AggregationTemporality.DELTA, AggregationTemporality.CUMULATIVE]
)
async def test_the_opentelemetry_exporter_exports_and_totals_read_back_exactly(
    start_server: StartServer, temporality: AggregationTemporality
) -> None:
    server = await start_server(otlp_resource_attributes="service.name")
    provider, meter = sdk(server.url, temporality, compression=Compression.Gzip)
    orders = meter.create_counter("orders")
    stock = meter.create_up_down_counter("stock")
    depth = meter.create_gauge("queue.depth")
    latency = meter.create_histogram("latency", explicit_bucket_boundaries_advisory=[10.0, 100.0])
    try:
        for round_ in range(3):  # three exports: cumulative ones become deltas
            orders.add(5, {"region": "eu"})
            orders.add(2, {"region": "us"})
            stock.add(10)
            stock.add(-4)
            depth.set(7 + round_)
            for value in (3.0, 30.0, 300.0):
                latency.record(value + round_)
            assert await trio.to_thread.run_sync(provider.force_flush)
        # read before the provider's shutdown, which exports the gauge's value once more
        found = await totals(
            server.client, "orders", "sum", group_by="region", **{"tag.service.name": "shop"}
        )
        assert [(t["region"], b["sum"]) for t, b in found] == [("eu", 15.0), ("us", 6.0)]
        assert bucket(await totals(server.client, "stock", "sum")) == {"sum": 18.0}
        assert bucket(await totals(server.client, "queue.depth", "count,last,max")) == {
            "count": 3,
            "last": 9.0,
            "max": 9.0,
        }
        assert bucket(await totals(server.client, "latency.count", "sum")) == {"sum": 9.0}
        assert bucket(await totals(server.client, "latency.sum", "sum")) == {"sum": 1008.0}
        if temporality == AggregationTemporality.DELTA:
            assert bucket(await totals(server.client, "latency.min", "min")) == {"min": 3.0}
            assert bucket(await totals(server.client, "latency.max", "max")) == {"max": 302.0}
        buckets = await totals(server.client, "latency.bucket", "sum", group_by="le")
        assert [(t["le"], b["sum"]) for t, b in buckets] == [
            ("+Inf", 3.0),
            ("10", 3.0),
            ("100", 3.0),
        ]
    finally:
        await trio.to_thread.run_sync(provider.shutdown)


def export_body(request: ExportMetricsServiceRequest, form: str) -> tuple[bytes, dict[str, str]]:
    if form == "protobuf":
        return request.SerializeToString(), {"Content-Type": "application/x-protobuf"}
    return json_format.MessageToJson(request).encode(), {"Content-Type": "application/json"}


def recent_request() -> ExportMetricsServiceRequest:
    now = clock.now_ns()
    good = sum_metric("paid", (now - NS, now, 4.0), plan="pro")
    bad = sum_metric("paid", (now - NS, now, math.inf), plan="free")
    return request_of(good, bad)


@pytest.mark.parametrize("form", ["protobuf", "json"])
async def test_a_partial_success_names_what_was_refused_and_a_retry_counts_once(
    start_server: StartServer, form: str
) -> None:
    server = await start_server()
    body, headers = export_body(recent_request(), form)
    for _ in range(2):  # the same export again: its events' ids are stored already
        answer = await server.client.post(
            "/v1/metrics",
            content=gzip.compress(body),
            headers={**headers, "Content-Encoding": "gzip"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == headers["Content-Type"]
        response = ExportMetricsServiceResponse()
        if form == "protobuf":
            response.ParseFromString(answer.content)
        else:
            json_format.Parse(answer.content, response)
        assert response.partial_success.rejected_data_points == 1
        assert "inf is not a number" in response.partial_success.error_message
    assert bucket(await totals(server.client, "paid", "count,sum")) == {"count": 1, "sum": 4.0}


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"\x0a\xff\xff", {"Content-Type": "application/x-protobuf"}, 400),
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b'{"resourceMetrics": [{"scopeMetrics": 1}]}', {"Content-Type": "application/json"}, 400),
        (b"x", {"Content-Type": "text/plain"}, 415),
        (b"x", {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, 415),
        (b"not gzip", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400),
    ],
)
async def test_a_malformed_export_is_refused_whole_and_stores_nothing(
    start_server: StartServer, body: bytes, headers: dict[str, str], status: int
) -> None:
    server = await start_server()
    answer = await server.client.post("/v1/metrics", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["message"]
    assert stored_counts(server.db) == {}


async def test_an_export_the_server_cannot_take_now_is_503_with_retry_after(
    start_server: StartServer,
) -> None:
    """Past max_inflight the exporter is told to retry (503 and Retry-After, which OTLP
    exporters honour), and nothing of the export is stored."""
    server = await start_server(max_body="4KiB", max_inflight="4KiB")
    now = clock.now_ns()
    points = [(now - NS, now + i, 1.0) for i in range(20)]  # 20 events of 300 bytes held
    body, headers = export_body(request_of(sum_metric("busy", *points)), "protobuf")
    answer = await server.client.post("/v1/metrics", content=body, headers=headers)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "1"
    assert answer.json()["error"]["code"] == "overloaded"
    assert stored_counts(server.db) == {}
