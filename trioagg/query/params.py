"""The query parameters of every endpoint, described once.

Each :class:`Param` says how a parameter's text is parsed and checked, what it
means, an example, and its JSON Schema. :func:`parse_args` reads a request's
parameters through a table of them, and :mod:`trioagg.http.openapi` describes the
same tables, so the parsers and the document cannot drift apart.

A parser takes the parameter's text and returns its value, or raises
:class:`ValueError` with a message for the client. Every problem of a request
is collected in :class:`Problems` and answered at once as ``422
invalid_query``. Every parser bounds the length of what it reads before
converting it, so no parameter can cost more than its text.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..core.errors import InvalidQuery
from ..core.stats import STATS, is_percentile
from ..core.times import MAX_TIME_LENGTH, RANGE_TEXT, SECONDS_PATTERN, parse_time

GRANULARITIES: Final = ("bucket", "hour", "day", "week", "month", "all")
FILLS: Final = ("none", "zero", "null")
DEFAULT_STATS: Final = ("count", "sum", "min", "max", "avg")
TOP_STATS: Final = ("count", "sum")
MAX_KEYS: Final = 100
MAX_KEY_LENGTH: Final = 255
MAX_TAG_FILTERS: Final = 16
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
TAG_NAME: Final = r"[A-Za-z_][A-Za-z0-9_.-]{0,63}"
_TAG_NAME = re.compile(f"^{TAG_NAME}$")
_LIMIT = re.compile(r"^[0-9]{1,4}$")
_STAT = r"(count|sum|min|max|avg|stddev|distinct|last|p(100|[0-9]{1,2}(\.[0-9]{1,3})?))"
_STATS = re.compile(f"^{_STAT}(,{_STAT}){{0,15}}$")
_ZONE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,31}(/[A-Za-z0-9_+-]{1,32}){0,2}$")
#: Unix seconds or RFC 3339 with an offset, as the schema of ``from`` and ``to`` says it.
TIME_PATTERN: Final = (
    f"^({SECONDS_PATTERN}|[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}[Tt ][0-9]{{2}}:[0-9]{{2}}:[0-9]{{2}}"
    r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2}))$"
)


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter: how to read it and how to describe it."""

    name: str
    description: str
    schema: Mapping[str, Any]
    example: Any
    parse: Callable[[str], Any]
    #: The text assumed when the parameter is absent; None: the value is None.
    default: str | None = None
    required: bool = False
    #: At most this many values (``key=a&key=b``); 1 means the parameter is given once.
    max_items: int = 1
    #: A family of parameters, ``tag.NAME``: NAME is any tag name.
    family: bool = False

    @property
    def prefix(self) -> str:
        return self.name.removesuffix("NAME")


class Problems:
    """Every problem of a request's parameters, unknown parameters included."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, parameter: str, message: str) -> None:
        self.items.append({"parameter": parameter, "message": message})

    def raise_any(self) -> None:
        if self.items:
            raise InvalidQuery("the query is invalid", self.items)


def parse_args(table: Iterable[Param], args: Any) -> tuple[dict[str, Any], Problems]:
    """The values of ``args`` (a multi-dict) by parameter name, and their problems.

    A parameter with a problem gets its default, so later checks can go on; a
    family (``tag.NAME``) gets a dict of NAME to value.
    """
    problem = Problems()
    values: dict[str, Any] = {}
    families = [entry for entry in table if entry.family]
    known = {entry.name: entry for entry in table if not entry.family}
    values.update((family.name, {}) for family in families)
    param: Param | None
    for name in args:
        member = ""
        param = known.get(name) or next((p for p in families if name.startswith(p.prefix)), None)
        if param is not None and param.family:
            member = name.removeprefix(param.prefix)
        if param is None or (param.family and not _TAG_NAME.match(member)):
            problem(name, "unknown parameter")
            continue
        texts = args.getlist(name)
        if len(texts) > param.max_items:
            many = (
                "given once" if param.max_items == 1 else f"given at most {param.max_items} times"
            )
            problem(name, f"must be {many}")
            continue
        try:
            parsed = [param.parse(text) for text in texts]
        except ValueError as error:
            problem(name, str(error))
            continue
        if param.family:
            values[param.name][member] = parsed[0]
        else:
            values[name] = tuple(dict.fromkeys(parsed)) if param.max_items > 1 else parsed[0]
    for param in known.values():
        if param.name in values:
            continue
        if param.required and param.name not in args:
            problem(param.name, f"required: {param.description}")
        values[param.name] = None if param.default is None else param.parse(param.default)
    for param in families:
        if len(values[param.name]) > MAX_TAG_FILTERS:
            problem(param.name, f"at most {MAX_TAG_FILTERS} {param.prefix}NAME filters")
    return values, problem


def _text(max_length: int, *, empty: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text and not empty:
            raise ValueError("must not be empty")
        if len(text) > max_length:
            raise ValueError(f"at most {max_length} characters")
        return text

    return parse


def _choice(choices: Iterable[str]) -> Callable[[str], str]:
    names = tuple(choices)

    def parse(text: str) -> str:
        if text not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return text

    return parse


def _tag_name(text: str) -> str:
    if not _TAG_NAME.match(text):
        raise ValueError(f"must be a tag name ({TAG_NAME})")
    return text


def _zone(text: str) -> zoneinfo.ZoneInfo:
    if _ZONE.match(text):
        try:
            return zoneinfo.ZoneInfo(text)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder
            pass
    raise ValueError(f"{text[:64]!r} is not an IANA time zone (e.g. Europe/Berlin)")


def _stats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(text.split(",")))
    unknown = [name for name in names if name not in STATS and not is_percentile(name)]
    if unknown or not _STATS.match(text):
        shown = ", ".join(unknown)[:200] if unknown else text[:200]
        raise ValueError(
            f"unknown or too many stat(s) {shown}; choose up to 16 of {', '.join(STATS)} "
            "or percentiles such as p50, p99, p99.9"
        )
    return names


def _limit(text: str) -> int:
    if not _LIMIT.match(text) or not 1 <= int(text) <= MAX_LIMIT:
        raise ValueError(f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def parse_wait(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"must be true or false, not {text[:20]!r}")


_TIME_SCHEMA: Final = {"type": "string", "pattern": TIME_PATTERN, "maxLength": MAX_TIME_LENGTH}
_TIME_RULES: Final = (
    f"RFC 3339 with an offset, or Unix seconds below 1e11; from {RANGE_TEXT}. Larger numbers "
    "are refused as probable epoch milliseconds (in Grafana use ${__from:date:seconds})."
)
_PREFIX = Param(
    "prefix",
    "Only keys starting with this.",
    {"type": "string", "maxLength": MAX_KEY_LENGTH},
    "checkout.",
    _text(MAX_KEY_LENGTH, empty=True),
    default="",
)
_LIMIT_PARAM = Param(
    "limit",
    f"How many keys, 1 to {MAX_LIMIT}.",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    DEFAULT_LIMIT,
    _limit,
    default=str(DEFAULT_LIMIT),
)


def _range(what: str) -> tuple[Param, Param]:
    return (
        Param(
            "from",
            f"Start of the {what} (inclusive); default: 24 hours before `to`. {_TIME_RULES}",
            _TIME_SCHEMA,
            "2026-11-01T00:00:00Z",
            parse_time,
        ),
        Param(
            "to",
            f"End of the {what} (exclusive), after `from`; default: now. {_TIME_RULES}",
            _TIME_SCHEMA,
            "2026-12-01T00:00:00+01:00",
            parse_time,
        ),
    )


#: ``POST /v1/events``.
EVENTS: Final = (
    Param(
        "wait",
        "false: answer 202 once queued, before the commit (may be lost on a crash).",
        {"type": "boolean", "default": True},
        False,
        parse_wait,
        default="true",
    ),
)

#: ``GET /v1/aggregates``.
AGGREGATES: Final = (
    Param(
        "key",
        f"Key to read; repeat for several (at most {MAX_KEYS}).",
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
            "minItems": 1,
            "maxItems": MAX_KEYS,
        },
        ["checkout.completed", "checkout.started"],
        _text(MAX_KEY_LENGTH),
        required=True,
        max_items=MAX_KEYS,
    ),
    *_range("range"),
    Param(
        "granularity",
        "Width of the answer's buckets: bucket (the store's own), hour, day, week (from "
        "Monday), month, or all (one bucket for the range).",
        {"type": "string", "enum": list(GRANULARITIES), "default": "hour"},
        "day",
        _choice(GRANULARITIES),
        default="hour",
    ),
    Param(
        "tz",
        "IANA zone for day, week and month boundaries (e.g. Europe/Berlin); 422 when its "
        "boundaries miss the store's bucket edges.",
        {"type": "string", "default": "UTC", "pattern": _ZONE.pattern},
        "Europe/Berlin",
        _zone,
        default="UTC",
    ),
    Param(
        "fill",
        "none: omit empty buckets; zero: every stat 0; null: count 0, other stats null.",
        {"type": "string", "enum": list(FILLS), "default": "none"},
        "zero",
        _choice(FILLS),
        default="none",
    ),
    Param(
        "group_by",
        "A tag name: one result series per value of it.",
        {"type": "string", "pattern": f"^{TAG_NAME}$"},
        "region",
        _tag_name,
    ),
    Param(
        "stats",
        f"Comma list of up to 16 of {', '.join(STATS)} and percentiles pNN or pNN.N (p50, "
        "p99.9). Percentiles need the key to keep quantiles (the server's --quantiles), "
        "else 422.",
        {"type": "string", "pattern": _STATS.pattern, "default": ",".join(DEFAULT_STATS)},
        "count,avg,stddev",
        _stats,
        default=",".join(DEFAULT_STATS),
    ),
    Param(
        "tag.NAME",
        "A family of parameters: tag.region=eu keeps only series whose tag region is eu "
        f"(up to {MAX_TAG_FILTERS}, with other names; AND). NAME stands for any tag name: a "
        "generated client sends this parameter literally, as a filter on a tag called NAME, "
        "so add tag.<name> parameters of your own (it is not a deepObject `tag[name]`).",
        {"type": "string", "minLength": 1, "maxLength": 255},
        "eu",
        _text(255),
        family=True,
    ),
)

#: ``GET /v1/keys``.
KEYS: Final = (
    _PREFIX,
    Param(
        "after",
        "Keys after this one (the previous page's next).",
        {"type": "string", "maxLength": MAX_KEY_LENGTH},
        "checkout.completed",
        _text(MAX_KEY_LENGTH, empty=True),
        default="",
    ),
    _LIMIT_PARAM,
)

#: ``GET /v1/top``.
TOP: Final = (
    *_range("range"),
    Param(
        "stat",
        "What to rank by.",
        {"type": "string", "enum": list(TOP_STATS), "default": "count"},
        "sum",
        _choice(TOP_STATS),
        default="count",
    ),
    _LIMIT_PARAM,
    _PREFIX,
)


#: ``GET /v1/status`` takes none: an unknown parameter is a 422, as everywhere.
STATUS: Final[tuple[Param, ...]] = ()
