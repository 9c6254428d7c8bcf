"""OpenTelemetry metrics over HTTP (``POST /v1/metrics``, OTLP/HTTP): decoding an
``ExportMetricsServiceRequest`` (protobuf or JSON, by the ``opentelemetry-proto``
types) and mapping its data points to events. No I/O.

Each data point becomes events of the key the metric's name gives, tagged with the
point's attributes and the resource attributes the operator keeps
(``--otlp-resource-attributes``), under the limits of an event's tags:

* **Sum** (counters, up-down counters): one event of the point's value; **Gauge**:
  one event of its value (a sample: ``last`` is the gauge's latest value).
* **Histogram**: its count, sum, min and max, exactly, as events of four keys named
  after the metric: ``<name>.count`` and ``<name>.sum`` (one event each, whose value
  is the point's count or sum: query their ``sum``), ``<name>.min`` and
  ``<name>.max`` (query their ``min`` and ``max``); and its buckets as
  ``<name>.bucket`` events tagged ``le=<upper bound>`` (``+Inf`` for the last), one
  per bucket holding observations, valued its count. Explicit buckets cannot become
  a quantile sketch exactly, so they are kept apart, as counts per bound.
* **ExponentialHistogram**: count, sum, min and max as a Histogram's; its buckets are
  not stored (their bounds are powers that no decimal ``le`` holds exactly), said
  in the answer's message.
* **Summary**: its count and sum, as a cumulative Histogram's (a summary counts
  since its start); its quantiles cannot be merged and are not stored, said in the
  answer's message.

**Cumulative temporality** is turned into deltas per stream (the metric, its
kind, every resource, scope and point attribute, a histogram's bounds), by
:class:`Streams`, which keeps each stream's last point: the delta is the
difference from it, or the whole value where the point's start time shows the
stream (re)started. A stream the server cannot have followed from its start (its
first point starts before this process, or before a stream was forgotten to
keep the state bounded) gives no delta: that point is the stream's baseline,
refused as such, and the next ones count. A point not after its stream's last
(a retried export) is refused: it was counted. Min and max of cumulative
histograms cover all time, not the interval, and are not stored. Only one
process can follow streams: with ``--workers`` over 1, cumulative points are
refused (send delta temporality).

Every event gets an id made from its stream and times, so that an export the
exporter retries (its answer lost) counts once (within ``--dedup-window``).
A point that cannot be stored exactly is refused on its own and counted in the
answer's ``partial_success``; the rest of the request is stored.
"""

from __future__ import annotations

import base64
import collections
import fnmatch
import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import trio
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AGGREGATION_TEMPORALITY_CUMULATIVE,
    AGGREGATION_TEMPORALITY_DELTA,
    DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK,
    Metric,
)
from werkzeug.datastructures import Headers
from werkzeug.http import parse_options_header

from ..core.errors import Forbidden, MalformedBody, UnsupportedMediaType
from ..core.events import MAX_ABS_VALUE, MAX_TAGS, TAG_VALUE_BYTES, TAGS_BYTES, TENANT_TAG, Point
from ..core.times import LATEST, rfc3339
from .decode import Limits

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
#: The most cumulative streams followed; past it, the least recently seen is forgotten.
STREAMS: Final = 100_000
#: The most distinct refusal messages an answer's error_message lists.
MESSAGES: Final = 5
_KEY_FORBIDDEN: Final = frozenset(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])


def media_type(headers: Headers) -> bool:
    """Whether the body is protobuf (else JSON), by its Content-Type; 415 for others."""
    content_type = headers.get("Content-Type", "")
    mimetype = parse_options_header(content_type)[0].lower()
    if mimetype not in (PROTOBUF, JSON):
        given = f"Content-Type {content_type!r}" if content_type else "a body without Content-Type"
        raise UnsupportedMediaType(f"{given} is not accepted: OTLP/HTTP sends {PROTOBUF} or {JSON}")
    return mimetype == PROTOBUF


def decode(body: bytes, *, protobuf: bool) -> ExportMetricsServiceRequest:
    """The request of ``body``; :class:`MalformedBody` (400) when it is not one."""
    request = ExportMetricsServiceRequest()
    try:
        if protobuf:
            request.ParseFromString(body)
        else:
            json_format.Parse(body, request, ignore_unknown_fields=True)
    # ValueError and TypeError: what json_format raises for some values of a wrong type.
    except (DecodeError, json_format.ParseError, ValueError, TypeError, RecursionError) as error:
        form = "protobuf" if protobuf else "JSON"
        raise MalformedBody(
            f"the body is not an OTLP ExportMetricsServiceRequest in {form}: "
            f"{str(error)[:300] or type(error).__name__}"
        ) from None
    return request


def answer(rejected: int, message: str, *, protobuf: bool) -> bytes:
    """The ExportMetricsServiceResponse: empty, or a partial success."""
    response = ExportMetricsServiceResponse()
    if rejected or message:
        response.partial_success.rejected_data_points = rejected
        response.partial_success.error_message = message
    if protobuf:
        return response.SerializeToString()
    return json_format.MessageToJson(response, indent=None).encode()


def has_cumulative(request: ExportMetricsServiceRequest) -> bool:
    """Whether any metric of ``request`` needs :class:`Streams` (cumulative, summaries)."""
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if _temporality(metric) == AGGREGATION_TEMPORALITY_CUMULATIVE:
                    return True
    return False


#: A stream's last point: its start and time (Unix ns) and its values.
@dataclass(frozen=True, slots=True)
class Last:
    start: int
    time: int
    values: tuple[float, ...]


class Streams:
    """The last point of each cumulative stream (at most ``limit``), and since when no
    stream was forgotten. Changed only through :meth:`keep`, once the events of the
    request that computed the deltas are committed; ``lock`` is held from the
    computation to then, so that requests with cumulative points take turns."""

    def __init__(self, limit: int = STREAMS, now_ns: int | None = None) -> None:
        self.limit = limit
        self._last: collections.OrderedDict[bytes, Last] = collections.OrderedDict()
        #: Streams that started from this time on (Unix ns) were followed from their start.
        self.complete_since = time.time_ns() if now_ns is None else now_ns
        self.lock = trio.Lock()

    def __len__(self) -> int:
        return len(self._last)

    def get(self, stream: bytes) -> Last | None:
        return self._last.get(stream)

    def keep(self, updates: dict[bytes, Last], now_ns: int | None = None) -> None:
        last = self._last
        for stream, point in updates.items():
            last[stream] = point
            last.move_to_end(stream)
        while len(last) > self.limit:
            last.popitem(last=False)
            self.complete_since = time.time_ns() if now_ns is None else now_ns


class Rejected(Exception):
    """Why one data point is refused: a reason (as the metrics count it) and a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class Mapped:
    """What a request maps to: its events, the points stored and refused, and the
    stream updates to keep once the events are committed."""

    points: list[Point] = field(default_factory=list)
    accepted: int = 0
    #: Refused points by reason.
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The first refusal messages (at most MESSAGES), and notes on what was not stored.
    messages: list[str] = field(default_factory=list)
    notes: set[str] = field(default_factory=set)
    updates: dict[bytes, Last] = field(default_factory=dict)

    def refuse(self, metric: str, refusal: Rejected) -> None:
        self.rejected[refusal.reason] += 1
        if len(self.messages) < MESSAGES:
            text = f"{metric[:100]!r}: {refusal.message}"
            if text not in self.messages:
                self.messages.append(text)

    def error_message(self) -> str:
        parts = []
        total = sum(self.rejected.values())
        if total:
            parts.append(f"{total} data point(s) rejected, e.g. " + "; ".join(self.messages))
        parts.extend(sorted(self.notes))
        return ". ".join(parts)


@dataclass(frozen=True)
class Mapping:
    """How a request maps: the limits of events, the resource attributes kept as tags,
    the tenant of the key, and whether cumulative streams can be followed."""

    limits: Limits
    resource_attributes: tuple[str, ...] = ()
    tenant: str | None = None
    follows_streams: bool = True


def map_request(
    request: ExportMetricsServiceRequest,
    mapping: Mapping,
    streams: Streams,
    now: float,
) -> Mapped:
    """The events of every data point of ``request`` (see the module); ``now`` is the
    server's receive time. :class:`Forbidden` when a point names another tenant."""
    mapped = Mapped()
    low = 0.0 if mapping.limits.max_age is None else now - mapping.limits.max_age
    high = min(now + mapping.limits.max_future, LATEST)
    for resource_metrics in request.resource_metrics:
        resource = resource_metrics.resource
        kept = {
            name: value
            for name, value in _attributes(resource.attributes).items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in mapping.resource_attributes)
        }
        for scope_metrics in resource_metrics.scope_metrics:
            # A stream is of one resource and scope, whatever of them is kept as tags.
            origin = resource.SerializeToString(
                deterministic=True
            ) + scope_metrics.scope.SerializeToString(deterministic=True)
            for metric in scope_metrics.metrics:
                _map_metric(metric, kept, origin, mapping, streams, mapped, (low, high))
    return mapped


def _map_metric(
    metric: Metric,
    resource_tags: dict[str, Any],
    origin: bytes,
    mapping: Mapping,
    streams: Streams,
    mapped: Mapped,
    window: tuple[float, float],
) -> None:
    kind = metric.WhichOneof("data")
    if kind is None:
        return  # a metric without data points
    data = getattr(metric, kind)
    temporality = _temporality(metric)
    cumulative = temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
    for point in data.data_points:
        if point.flags & DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK:
            continue  # a stale marker: the stream has no value now
        try:
            if kind in ("sum", "histogram", "exponential_histogram") and temporality not in (
                AGGREGATION_TEMPORALITY_DELTA,
                AGGREGATION_TEMPORALITY_CUMULATIVE,
            ):
                raise Rejected("temporality", "aggregation_temporality is unspecified")
            if cumulative and not mapping.follows_streams:
                raise Rejected(
                    "temporality",
                    "cumulative temporality needs one trioagg process to follow each stream "
                    "(this one runs with --workers over 1): export with delta temporality",
                )
            events = _map_point(
                metric, kind, point, resource_tags, origin, mapping, streams, mapped, window
            )
        except Rejected as refusal:
            mapped.refuse(metric.name, refusal)
            continue
        mapped.points.extend(events)
        mapped.accepted += 1


def _map_point(
    metric: Metric,
    kind: str,
    point: Any,
    resource_tags: dict[str, Any],
    origin: bytes,
    mapping: Mapping,
    streams: Streams,
    mapped: Mapped,
    window: tuple[float, float],
) -> list[Point]:
    name = metric.name
    ts = _seconds(point.time_unix_nano, window)
    attributes = _attributes(point.attributes)
    tags = _tags({**resource_tags, **attributes}, mapping.tenant)
    # The tags hold the tenant: two tenants' streams (and ids) are never one.
    stream = msgspec.msgpack.encode([origin, name, kind, tags, sorted(attributes.items())])
    cumulative = kind == "summary" or _temporality(metric) == AGGREGATION_TEMPORALITY_CUMULATIVE
    if kind in ("sum", "gauge"):
        which = point.WhichOneof("value")
        if which is None:
            raise Rejected("value", "the data point has no value")
        value = float(getattr(point, which))
        if cumulative:
            (value,) = _delta(
                streams, mapped, stream, point, (value,), monotonic=metric.sum.is_monotonic
            )
        ident = _ident(stream, point)
        return [(_key(name), ts, _finite(value), tags, None, ident)]
    if kind == "histogram":
        bounds = list(point.explicit_bounds)
        counts = list(point.bucket_counts)
        if counts and len(counts) != len(bounds) + 1:
            raise Rejected("value", "bucket_counts must have one more item than explicit_bounds")
        if bounds != sorted(set(bounds)) or not all(map(math.isfinite, bounds)):
            raise Rejected("value", "explicit_bounds must be finite and increasing")
        stream = msgspec.msgpack.encode([stream, bounds])
    else:
        bounds, counts = [], []
        if kind == "exponential_histogram":
            mapped.notes.add("buckets of exponential histograms are not stored")
        else:
            mapped.notes.add("quantiles of summaries are not stored (only count and sum)")
    count, total = float(point.count), point.sum if _has(point, "sum") else None
    if counts and sum(counts) != point.count:
        raise Rejected("value", "the bucket counts do not add up to count")
    values = (count, total if total is not None else 0.0, *map(float, counts))
    low = point.min if _has(point, "min") else None
    high = point.max if _has(point, "max") else None
    if cumulative:
        values = _delta(streams, mapped, stream, point, values, monotonic=True)
        if low is not None or high is not None:
            mapped.notes.add("min and max of cumulative histograms are not stored")
        low = high = None
    ident = _ident(stream, point)
    events: list[Point] = [(_key(name + ".count"), ts, values[0], tags, None, ident + "c")]
    if total is not None:
        events.append((_key(name + ".sum"), ts, _finite(values[1]), tags, None, ident + "s"))
    if low is not None:
        events.append((_key(name + ".min"), ts, _finite(low), tags, None, ident + "l"))
    if high is not None:
        events.append((_key(name + ".max"), ts, _finite(high), tags, None, ident + "h"))
    if counts:
        if "le" in attributes:
            raise Rejected("tags", "a histogram's point has an attribute le, the buckets' tag")
        bucket_key = _key(name + ".bucket")
        decoded = msgspec.json.decode(tags)
        for index, observed in enumerate(values[2:]):
            if observed:
                bound = _bound(bounds[index]) if index < len(bounds) else "+Inf"
                bucket_tags = _canonical({**decoded, "le": bound})
                events.append((bucket_key, ts, observed, bucket_tags, None, f"{ident}b{index}"))
    return events


def _delta(
    streams: Streams,
    mapped: Mapped,
    stream: bytes,
    point: Any,
    values: tuple[float, ...],
    *,
    monotonic: bool,
) -> tuple[float, ...]:
    """The change of a cumulative stream since its last point (see the module), the
    new last point kept in ``mapped.updates`` (for :meth:`Streams.keep`)."""
    start, at = point.start_time_unix_nano, point.time_unix_nano
    last = mapped.updates.get(stream) or streams.get(stream)
    update = Last(start, at, values)
    if last is None or start != last.start:
        if last is not None and start < last.start:
            raise Rejected("value", "its start time is before the start of its stream's last point")
        if last is None and (start == 0 or start < streams.complete_since):
            mapped.updates[stream] = update
            raise Rejected(
                "baseline",
                "the first point this server saw of a cumulative stream that started before "
                f"it could follow it (start {rfc3339(start / 1e9)}): kept as the stream's "
                "baseline, its next points count",
            )
        mapped.updates[stream] = update
        return values  # a new stream, or one that restarted: all of it since its start
    if at <= last.time:
        raise Rejected("duplicate", "not after its stream's last point: counted already")
    delta = tuple(now - before for now, before in zip(values, last.values, strict=False))
    if len(values) != len(last.values) or (monotonic and delta[0] < 0):
        mapped.updates[stream] = update
        raise Rejected(
            "value",
            "a cumulative count went down without a new start time: taken as the stream's "
            "new baseline",
        )
    mapped.updates[stream] = update
    return delta


def _temporality(metric: Metric) -> int:
    kind = metric.WhichOneof("data")
    if kind == "summary":
        return AGGREGATION_TEMPORALITY_CUMULATIVE
    if kind in ("sum", "histogram", "exponential_histogram"):
        temporality: int = getattr(metric, kind).aggregation_temporality
        return temporality
    return AGGREGATION_TEMPORALITY_DELTA  # gauges: samples, no temporality


def _has(point: Any, name: str) -> bool:
    """Whether ``point`` holds field ``name`` (always, for a field without presence)."""
    described = point.DESCRIPTOR.fields_by_name.get(name)
    if described is None:
        return False
    return not described.has_presence or bool(point.HasField(name))


def _seconds(nanos: int, window: tuple[float, float]) -> float:
    if nanos == 0:
        raise Rejected("time", "time_unix_nano is 0: the point has no time")
    seconds = nanos / 1e9
    low, high = window
    if seconds > high:
        raise Rejected("time", f"{rfc3339(min(seconds, LATEST - 1))} is too far in the future")
    if seconds < low:
        raise Rejected("time", f"{rfc3339(seconds)} is too old (max_age)")
    return seconds


def _finite(value: float) -> float:
    if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:  # NaN fails both comparisons
        raise Rejected("value", f"{value!r} is not a number from -1e100 to 1e100")
    return value


def _key(name: str) -> str:
    if not name or len(name.encode()) > 255 or any(c in _KEY_FORBIDDEN for c in name):
        raise Rejected("name", "a key is 1-255 bytes of UTF-8 without control characters")
    return name


def _bound(bound: float) -> str:
    """An explicit bound as ``le`` shows it: ``0.005``, ``10``, ``1e+16``."""
    return repr(bound).removesuffix(".0")


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    """Attributes as a dict of their values (strings, booleans, numbers; arrays, maps
    and bytes as found, refused if they become tags)."""
    return {pair.key: _value_of(pair.value) for pair in pairs}


def _value_of(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which in ("string_value", "bool_value", "int_value", "double_value"):
        return getattr(value, which)
    return _Unusable(which or "empty")


class _Unusable:
    """An attribute value no tag can hold (an array, a map, bytes, nothing)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_NAME_REST = _NAME_FIRST | frozenset("0123456789.-")


def _tags(attributes: dict[str, Any], tenant: str | None) -> str:
    """Canonical tags JSON of ``attributes``, by the rules of an event's tags."""
    tags: dict[str, str] = {}
    for name, value in attributes.items():
        if isinstance(value, _Unusable):
            raise Rejected("tags", f"attribute {name[:64]!r} holds {value.kind}: not a tag value")
        if not (0 < len(name) <= 64 and name[0] in _NAME_FIRST and set(name) <= _NAME_REST):
            raise Rejected(
                "tags",
                f"attribute {name[:70]!r} is not a tag name ([A-Za-z_][A-Za-z0-9_.-]{{0,63}})",
            )
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if not text or len(text.encode()) > TAG_VALUE_BYTES:
            raise Rejected(
                "tags", f"the value of attribute {name!r} must be 1-{TAG_VALUE_BYTES} bytes"
            )
        tags[name] = text
    if tenant is not None:
        named = tags.get(TENANT_TAG)
        if named is not None and named != tenant:
            raise Forbidden(
                f"this API key sends events of {TENANT_TAG}={tenant} only; a data point names "
                f"{TENANT_TAG}={named}: nothing of this request was stored",
                "tenant",
            )
        tags[TENANT_TAG] = tenant
    if len(tags) > MAX_TAGS:
        raise Rejected("tags", f"at most {MAX_TAGS} tags (it has {len(tags)})")
    return _canonical(tags)


def _canonical(tags: dict[str, str]) -> str:
    encoded = msgspec.json.encode(tags, order="sorted")
    if len(encoded) > TAGS_BYTES:
        raise Rejected("tags", f"the tags have {len(encoded)} bytes as JSON, over {TAGS_BYTES}")
    return encoded.decode()


def _ident(stream: bytes, point: Any) -> str:
    """An id of the point's events, the same for the same point however often sent."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(stream)
    digest.update(f"|{point.start_time_unix_nano}|{point.time_unix_nano}".encode())
    return "otlp:" + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
