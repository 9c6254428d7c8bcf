"""Decoding and validating ``POST /v1/events`` bodies.

The rules of the contract's event table live in the msgspec types below and
in :func:`_limit_problems` (byte lengths and time limits, which msgspec does
not express). A valid body becomes a list of :data:`~trioagg.core.events.Point` tuples, the only
form of an event the writer sees. An invalid one raises
:class:`~trioagg.core.errors.InvalidEvents` listing every problem of every event,
so a request is stored whole or not at all.

Valid bodies take the fast path: one typed msgspec decode (:class:`UnpatternedEvent`:
every rule but the patterns of keys and tag names) and one loop, which checks each
key and tag name against its pattern the first time it sees it (:class:`KnownNames`).
Only a body that fails it is decoded again, untyped, to find every problem.
:func:`decode_body` runs large bodies in a worker thread, so that the event
loop keeps serving other requests while they are decoded.
"""

from __future__ import annotations

import datetime
import decimal
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Final

import msgspec
import trio

from ..core.errors import Forbidden, InvalidEvents, MalformedBody, PayloadTooLarge
from ..core.events import (
    MAX_ABS_VALUE,
    MAX_TAGS,
    NO_TAGS,
    TAG_VALUE_BYTES,
    TAGS_BYTES,
    TENANT_TAG,
    Point,
)
from ..core.times import LATEST, milliseconds_mistake, rfc3339

_FINITE = msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)
# msgspec matches a pattern with Python's re.search, whose "$" also matches before a
# final newline: "(?!\n)" makes it the very end, in Python and in the ECMA-262 regexes
# of the OpenAPI document alike. C0 and C1 control characters and DEL are refused.
Key = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$(?!\n)"),
]
TagName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$(?!\n)")]
TagValue = Annotated[str, msgspec.Meta(min_length=1, max_length=TAG_VALUE_BYTES)]
Tags = Annotated[dict[TagName, TagValue], msgspec.Meta(max_length=MAX_TAGS)]
Timestamp = Annotated[float, _FINITE] | Annotated[datetime.datetime, msgspec.Meta(tz=True)] | None
Value = Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
DistinctId = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Event(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One event as the contract defines it. Unknown fields are rejected, so a typo
    such as ``"vaule"`` is an error rather than a silent default."""

    key: Key
    ts: Timestamp = None
    value: Value = 1.0
    tags: Tags = {}
    distinct_id: DistinctId | None = None
    id: EventId | None = None


def _meta(kind: Any) -> msgspec.Meta:
    """The constraints of ``Annotated[str, msgspec.Meta(...)]``."""
    meta: msgspec.Meta = typing.get_args(kind)[1]
    return meta


class UnpatternedEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """:class:`Event` without the patterns of a key and of tag names. msgspec checks a
    pattern with a regex search of every string it decodes, 0.7 us of the 1.0 us an
    event of a key and no tags took to decode; :class:`KnownNames` checks each
    distinct key and tag name once instead. Refuses nothing :class:`Event` takes."""

    key: Annotated[
        str, msgspec.Meta(min_length=_meta(Key).min_length, max_length=_meta(Key).max_length)
    ]
    ts: Timestamp = None
    value: Value = 1.0
    tags: Annotated[dict[str, TagValue], msgspec.Meta(max_length=MAX_TAGS)] = {}
    distinct_id: DistinctId | None = None
    id: EventId | None = None


class KnownNames:
    """Keys and tag names seen to match :data:`Key`'s and :data:`TagName`'s patterns
    (a set look-up costs a tenth of a regex search). Bounded: past ``limit`` names of
    either kind, that set is forgotten and fills again. Safe to share between threads:
    a set's look-ups and additions are atomic, and a name is only added once it
    matched."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.keys: set[str] = set()
        self.tag_names: set[str] = set()

    def match(self, key: str, tags: dict[str, str]) -> bool:
        """Whether ``key`` and the names of ``tags`` match their patterns; those that
        do are remembered (call it only for names not known yet)."""
        return self._known(self.keys, key, _KEY_MATCHES) and all(
            self._known(self.tag_names, name, _TAG_NAME_MATCHES) for name in tags
        )

    def _known(self, known: set[str], name: str, matches: Callable[[str], object]) -> bool:
        """Whether ``name`` is in ``known`` or matches, and then is (within the limit)."""
        if name in known:
            return True
        if not matches(name):
            return False
        if len(known) >= self.limit:
            known.clear()
        known.add(name)
        return True


_KEY_MATCHES: Final = re.compile(_meta(Key).pattern or "").search
_TAG_NAME_MATCHES: Final = re.compile(_meta(TagName).pattern or "").search
#: The server's known names: at most 65,536 of each, so at most about 22 MB of
#: 255-byte keys and 10 MB of 64-byte tag names (usually far less).
_KNOWN: Final = KnownNames(1 << 16)

#: What each field must be, in the words of the contract; prefixed to every problem.
RULES: Final = {
    "key": "required string, 1-255 bytes UTF-8, no control characters",
    "ts": "RFC 3339 string with an offset (Z or +02:00) or Unix seconds",
    "value": "JSON number from -1e100 to 1e100 (MAX_ABS_VALUE)",
    "tags": f"object of at most {MAX_TAGS} string pairs; names [A-Za-z_][A-Za-z0-9_.-]{{0,63}}, "
    f"values 1-{TAG_VALUE_BYTES} bytes, at most {TAGS_BYTES} bytes together as compact JSON",
    "distinct_id": "string of 1-255 bytes",
    "id": "string of 1-128 bytes",
}
_DATETIME: Final = datetime.datetime
_FIELD_TYPES: Final = {field.name: field.type for field in msgspec.structs.fields(Event)}
_BYTE_LIMITS: Final = {"key": 255, "distinct_id": 255, "id": 128}

_BODY_DECODER = msgspec.json.Decoder(UnpatternedEvent | list[UnpatternedEvent])
# Decimal keeps numbers beyond float's range (1e999) checkable as the field's problem.
_UNTYPED_DECODER = msgspec.json.Decoder(float_hook=decimal.Decimal)
_LINE_DECODER = msgspec.json.Decoder(UnpatternedEvent)
# What a body that is not JSON raises: msgspec's own error, invalid UTF-8 in a
# string, or arrays and objects nested deeper than Python's recursion limit.
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


@dataclass(frozen=True, slots=True)
class Limits:
    """The request limits of the contract, taken from the settings."""

    max_batch: int
    max_future: float
    max_age: float | None
    #: How long the store keeps anything (the last tier's horizon); None: for ever.
    retention: float | None = None


#: The limit an event older than the store's retention is refused by, as messages name it.
RETENTION_LIMIT: Final = "the retention of --tiers"


#: Bodies up to this size are decoded on the event loop (a few milliseconds at most);
#: larger ones in a worker thread, at most DECODE_THREADS at once.
INLINE_DECODE_BYTES: Final = 64 * 1024
DECODE_THREADS: Final = 2
_DECODE_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(
    "trioagg_decode_limiter"
)


async def decode_body(
    body: bytes, *, ndjson: bool, limits: Limits, now: float, tenant: str | None = None
) -> list[Point]:
    """:func:`decode_events`, in a worker thread when the body is large."""
    if len(body) <= INLINE_DECODE_BYTES:
        return decode_events(body, ndjson=ndjson, limits=limits, now=now, tenant=tenant)
    try:
        limiter = _DECODE_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(DECODE_THREADS)
        _DECODE_LIMITER.set(limiter)
    decode = partial(decode_events, body, ndjson=ndjson, limits=limits, now=now, tenant=tenant)
    return await trio.to_thread.run_sync(decode, limiter=limiter)


def decode_events(
    body: bytes, *, ndjson: bool, limits: Limits, now: float, tenant: str | None = None
) -> list[Point]:
    """Decode and validate a whole request body; ``now`` is the server's receive time.
    With ``tenant`` (the sender's API key has one), see :func:`stamp_tenant`."""
    if not body.strip():
        raise MalformedBody("the request body is empty: send an event, an array or NDJSON")
    try:
        decoded = _LINE_DECODER.decode_lines(body) if ndjson else _BODY_DECODER.decode(body)
    except msgspec.ValidationError:
        raise _every_problem(body, ndjson=ndjson, limits=limits, now=now) from None
    except _NOT_JSON:
        _decode_untyped(body, ndjson=ndjson)  # raises MalformedBody saying where
        raise  # pragma: no cover - the untyped decode fails wherever the typed one did
    events = [decoded] if isinstance(decoded, UnpatternedEvent) else decoded
    _check_count(len(events), limits)

    low, high, why = _time_window(limits, now)
    points: list[Point] = []
    append = points.append
    problems: list[dict[str, Any]] = []
    encode = msgspec.json.encode
    known = _KNOWN
    keys, tag_names = known.keys, known.tag_names
    # The hottest loop of a request (callgrind, bench/percost.py): events without tags
    # skip the tag checks, and the event's index is len(points).
    for event in events:
        ts = event.ts
        seconds = ts.timestamp() if isinstance(ts, _DATETIME) else now if ts is None else ts
        key = event.key
        tags = event.tags
        if tags:
            if (key not in keys or not tag_names.issuperset(tags)) and not known.match(key, tags):
                raise _every_problem(body, ndjson=ndjson, limits=limits, now=now)
            canonical = encode(tags, order="sorted").decode()
            long_tags = max(map(len, tags.values())) > 63 or len(canonical) > 512
        else:
            if key not in keys and not known.match(key, tags):
                raise _every_problem(body, ndjson=ndjson, limits=limits, now=now)
            canonical = NO_TAGS
            long_tags = False
        event_id = event.id
        distinct_id = event.distinct_id
        # Only strings of over 63 characters can exceed a 255-byte limit (4 bytes per
        # character at most, 512 for TAGS_BYTES): the full check runs for those and for
        # times off the window. Ids are measured here: most (UUIDs, ingest's line ids) are
        # over 32 characters, and the full check cost them 0.6 us each; an ASCII one
        # (isascii() reads a flag) has as many bytes as characters.
        if (
            long_tags
            or not low <= seconds <= high
            or len(key) > 63
            or (
                event_id is not None
                and len(event_id) > 32
                and (len(event_id) > 128 or not event_id.isascii())
                and len(event_id.encode()) > 128
            )
            or (distinct_id is not None and len(distinct_id) > 63)
        ):
            for field, message in _limit_problems(event, seconds, low, high, why):
                problems.append({"index": len(points), "field": field, "message": message})
        append((key, seconds, event.value, canonical, distinct_id, event_id))
    if problems:
        raise _invalid(problems, len(events))
    return points if tenant is None else stamp_tenant(points, tenant)


def _every_problem(body: bytes, *, ndjson: bool, limits: Limits, now: float) -> InvalidEvents:
    """Every problem of every event of a body the fast path refused, in the words of the
    contract's types (:data:`_FIELD_TYPES`)."""
    raw = _decode_untyped(body, ndjson=ndjson)
    _check_count(len(raw), limits)
    return _invalid(_problems_of_raw(raw, limits, now), len(raw))


def stamp_tenant(points: list[Point], tenant: str) -> list[Point]:
    """``points`` of a tenant's API key: ``tenant=<tenant>`` added to their tags, and
    their ids made the tenant's own, so that no tenant can claim, and so drop as
    duplicates, another's ids. Forbidden (nothing stored) when an event names another
    tenant; InvalidEvents when events carry MAX_TAGS tags besides the tenant's, or tags
    that pass TAGS_BYTES with the tenant's, as the stamped tag would make a series no
    series may be."""
    stamped: dict[str, str] = {NO_TAGS: msgspec.json.encode({TENANT_TAG: tenant}).decode()}
    # The tenant as a JSON string ends at its first unescaped quote: no two tenants'
    # prefixes can make the same id.
    id_prefix = msgspec.json.encode(tenant).decode() + ":"
    out: list[Point] = []
    problems: list[dict[str, Any]] = []
    for index, (key, ts, value, tags, distinct_id, event_id) in enumerate(points):
        canonical = stamped.get(tags)
        if canonical is None:
            decoded = msgspec.json.decode(tags)
            named = decoded.get(TENANT_TAG)
            if named is not None and named != tenant:
                raise Forbidden(
                    f"this API key sends events of {TENANT_TAG}={tenant} only; an event "
                    f"names {TENANT_TAG}={named}: nothing of this request was stored",
                    "tenant",
                )
            if named is None and len(decoded) >= MAX_TAGS:
                problems.append(
                    {
                        "index": index,
                        "field": "tags",
                        "message": f"at most {MAX_TAGS - 1} tags besides {TENANT_TAG} with "
                        f"this API key, which stamps {TENANT_TAG}={tenant} on every event: "
                        f"a series has at most {MAX_TAGS} tags (it has {len(decoded)})",
                    }
                )
                continue
            decoded[TENANT_TAG] = tenant
            encoded = msgspec.json.encode(decoded, order="sorted")
            too_large = _tags_bytes_problem(encoded)
            if too_large is not None:
                problems.append(
                    {
                        "index": index,
                        "field": "tags",
                        "message": f"with {TENANT_TAG}={tenant} stamped by this API key, "
                        f"{too_large}: send fewer or shorter tags",
                    }
                )
                continue
            canonical = stamped[tags] = encoded.decode()
        scoped_id = None if event_id is None else id_prefix + event_id
        out.append((key, ts, value, canonical, distinct_id, scoped_id))
    if problems:
        raise _invalid(problems, len(points))
    return out


def tag_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a tag's value, by the rules an event's tags are checked
    with (:data:`TagValue` and :data:`TAG_VALUE_BYTES`); None when it can."""
    try:
        msgspec.convert(value, TagValue)
    except msgspec.ValidationError as error:
        return _plain(error)
    if _over_bytes(value, TAG_VALUE_BYTES):
        return f"it has {len(value.encode())} bytes, over {TAG_VALUE_BYTES}"
    return None


def _tags_bytes_problem(canonical: bytes) -> str | None:
    """Why tags stored as ``canonical`` are too large (:data:`TAGS_BYTES`); None if not."""
    if len(canonical) <= TAGS_BYTES:
        return None
    return f"they have {len(canonical)} bytes as JSON, over {TAGS_BYTES}"


def _over_bytes(text: str, limit: int) -> bool:
    # 4 bytes per character at most: only long strings can exceed the limit.
    return len(text) * 4 > limit and len(text.encode()) > limit


def _check_count(count: int, limits: Limits) -> None:
    if count > limits.max_batch:
        raise PayloadTooLarge(
            f"the request holds {count} events; at most {limits.max_batch} are accepted "
            "in one request (max_batch)"
        )


def _time_window(limits: Limits, now: float) -> tuple[float, float, str]:
    """The accepted times ``[low, high]``, and the limit that sets ``low``."""
    low, why = 0.0 if limits.max_age is None else now - limits.max_age, "max_age"
    if limits.retention is not None and now - limits.retention > low:
        low, why = now - limits.retention, RETENTION_LIMIT
    return low, min(now + limits.max_future, LATEST), why


def _limit_problems(
    event: Any, seconds: float | None, low: float, high: float, why: str = "max_age"
) -> Iterator[tuple[str, str]]:
    """The rules msgspec cannot express: byte lengths and the accepted time window.

    ``event`` is an :class:`Event` or, on the slow path, a namespace of the fields
    that passed their type check (``None`` for the others).
    """
    for field, limit in _BYTE_LIMITS.items():
        text = getattr(event, field)
        if text is not None and _over_bytes(text, limit):
            yield field, f"{RULES[field]} (it has {len(text.encode())} bytes)"
    if event.tags:
        for name, value in event.tags.items():
            if _over_bytes(value, TAG_VALUE_BYTES):
                too_long = f"the value of {name!r} has more than {TAG_VALUE_BYTES} bytes"
                yield "tags", f"{RULES['tags']} ({too_long})"
        too_large = _tags_bytes_problem(msgspec.json.encode(event.tags, order="sorted"))
        if too_large is not None:
            yield "tags", f"{RULES['tags']} ({too_large})"
    if seconds is not None and not low <= seconds <= high:
        yield (
            "ts",
            _describe_out_of_window(seconds, low, high, why, number=isinstance(event.ts, float)),
        )


def _describe_out_of_window(
    seconds: float, low: float, high: float, why: str, *, number: bool
) -> str:
    stamp = rfc3339(seconds)
    if seconds > high:
        # JavaScript's Date.now() and many loggers count milliseconds: say so, as a query does
        mistaken = (
            milliseconds_mistake(seconds, repr(seconds).removesuffix(".0")) if number else None
        )
        if mistaken is not None:
            return mistaken
        return f"{stamp} is too far in the future (latest accepted: {rfc3339(high)}, max_future)"
    if low > 0 and why == RETENTION_LIMIT:
        return (
            f"{stamp} is older than this store keeps anything (earliest accepted: "
            f"{rfc3339(low)}, {RETENTION_LIMIT})"
        )
    if low > 0:
        return f"{stamp} is too old (earliest accepted: {rfc3339(low)}, max_age)"
    return f"{stamp} is before 1970-01-01T00:00:00Z"


def _decode_untyped(body: bytes, *, ndjson: bool) -> list[Any]:
    """Decode without the schema, raising :class:`MalformedBody` where the JSON breaks."""
    if not ndjson:
        try:
            raw = _UNTYPED_DECODER.decode(body)
        except _NOT_JSON as error:
            raise MalformedBody(f"the body {_why_not_json(error)}") from None
        return raw if isinstance(raw, list) else [raw]
    lines = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append(_UNTYPED_DECODER.decode(line))
        except _NOT_JSON as error:
            raise MalformedBody(
                f"line {number} of the NDJSON body {_why_not_json(error)}"
            ) from None
    return lines


def _why_not_json(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "nests arrays or objects too deeply to be an event"
    if isinstance(error, UnicodeDecodeError):
        return "is not valid UTF-8: send JSON encoded as UTF-8"
    return f"is not valid JSON: {error}"


class _Fields:
    """The fields of one raw event that passed their type check; None for the rest."""

    def __init__(self, converted: dict[str, Any]) -> None:
        for name in _FIELD_TYPES:
            setattr(self, name, converted.get(name))


def _problems_of_raw(raw: list[Any], limits: Limits, now: float) -> list[dict[str, Any]]:
    """Every problem of every event of an untyped body."""
    low, high, why = _time_window(limits, now)
    problems: list[dict[str, Any]] = []
    for index, item in enumerate(raw):

        def problem(field: str | None, message: str, index: int = index) -> None:
            problems.append({"index": index, "field": field, "message": message})

        if not isinstance(item, dict):
            problem(None, f"an event must be a JSON object, not {type(item).__name__}")
            continue
        if "key" not in item:
            problem("key", f"{RULES['key']} (missing)")
        converted: dict[str, Any] = {}
        for name, value in item.items():
            if name not in _FIELD_TYPES:
                problem(name, f"unknown field (known: {', '.join(_FIELD_TYPES)})")
                continue
            try:
                converted[name] = msgspec.convert(value, _FIELD_TYPES[name])
            except msgspec.ValidationError as error:
                problem(name, f"{RULES[name]} ({_plain(error)})")
        ts = converted.get("ts")
        seconds = (
            None
            if "ts" not in converted
            else now
            if ts is None
            else ts.timestamp()
            if isinstance(ts, datetime.datetime)
            else float(ts)
        )
        for field, message in _limit_problems(_Fields(converted), seconds, low, high, why):
            problem(field, message)
    return problems


def _plain(error: msgspec.ValidationError) -> str:
    text = str(error)
    return text.split(" - at `", 1)[0] if " - at `" in text else text


def _invalid(problems: list[dict[str, Any]], total: int) -> InvalidEvents:
    count = len({problem["index"] for problem in problems})
    invalid = InvalidEvents(
        f"{count} of {total} event(s) are invalid; nothing of this request was stored",
        problems,
        total,
    )
    invalid.past_retention = sum(RETENTION_LIMIT in problem["message"] for problem in problems)
    return invalid
