"""Every setting of trioagg, in one table.

A setting is a field of :class:`Settings`. The same field is the ``serve``
flag ``--batch-size`` and the environment variable ``TRIOAGG_BATCH_SIZE``;
the CLI and the hypercorn factory both build their settings from this table,
so a setting cannot exist in one place and be missing in the other.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ConfigError
from .tiers import Tiers, check_bucket, parse_tiers

ENV_PREFIX = "TRIOAGG_"

BUCKET_WIDTHS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600}
#: A bucket width's name, by its seconds.
BUCKET_NAMES = {seconds: name for name, seconds in BUCKET_WIDTHS.items()}

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


#: What the value of a setting is, as its flag shows it (--max-body SIZE), by its parser.
_METAVARS: dict[Callable[[str], Any], str] = {}

_Parse = TypeVar("_Parse", bound=Callable[[str], Any])


def _shown_as(metavar: str) -> Callable[[_Parse], _Parse]:
    """Record that a parser's values are shown as ``metavar`` in ``--help``."""

    def record(parse: _Parse) -> _Parse:
        _METAVARS[parse] = metavar
        return parse

    return record


@_shown_as("DURATION")
def parse_duration(text: str) -> float:
    """Parse ``"1h"``, ``"90s"``, ``"500ms"``, ``"2d"`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (try 90s, 15m, 1h, 2d)")
    return float(match[1]) * _DURATION_UNITS[match[2] or "s"]


@_shown_as("DURATION")
def _positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return seconds


@_shown_as("DURATION|none")
def parse_optional_duration(text: str) -> float | None:
    """Like :func:`parse_duration`, with ``none`` meaning no limit."""
    return None if text.strip().lower() in ("", "none", "off") else parse_duration(text)


@_shown_as("SIZE")
def parse_size(text: str) -> int:
    """Parse ``"10MiB"``, ``"512KiB"``, ``"1MB"`` or plain bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (try 10MiB, 512KiB, 1048576)")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


@_shown_as(f"[{'|'.join(BUCKET_WIDTHS)}]")
def parse_bucket(text: str) -> int:
    """Parse a bucket width name into seconds."""
    if text not in BUCKET_WIDTHS:
        choices = ", ".join(BUCKET_WIDTHS)
        raise ValueError(f"{text!r} is not a bucket width (choose one of {choices})")
    return BUCKET_WIDTHS[text]


_shown_as("TIERS|none")(parse_tiers)


@_shown_as("PATTERNS")
def parse_patterns(text: str) -> tuple[str, ...]:
    """A comma list of glob patterns; ``none`` or empty for no pattern."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(pattern.strip() for pattern in text.split(",") if pattern.strip())


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s,]+")


@_shown_as("ORIGINS")
def parse_origins(text: str) -> tuple[str, ...]:
    """A comma list of origins (``https://grafana.example.com``), ``*`` for any, or ``none``;
    lower-cased, as browsers send them."""
    origins = tuple(origin.lower() for origin in parse_patterns(text))
    for origin in origins:
        if origin != "*" and _ORIGIN.fullmatch(origin) is None:
            raise ValueError(
                f"{origin!r} is not an origin: scheme://host[:port], no path "
                "(e.g. https://grafana.example.com), or *"
            )
    return origins


_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*")


@_shown_as("HOSTS")
def parse_hosts(text: str) -> tuple[str, ...]:
    """A comma list of host names (``trioagg.internal``), ``*.name`` for the names under
    one, IP addresses (IPv6 in brackets or not), ``*`` for any host, or ``none``; without
    ports. Lower-cased, without a trailing dot, addresses in their short form."""
    hosts = []
    for given in parse_patterns(text):
        host = given.lower().removesuffix(".")
        try:
            if host.startswith("[") and host.endswith("]"):
                host = str(ipaddress.IPv6Address(host[1:-1]))  # brackets hold IPv6 only
            else:
                host = str(ipaddress.ip_address(host))
        except ValueError:
            if host != "*" and _HOST_PATTERN.fullmatch(host) is None:
                raise ValueError(
                    f"{given!r} is not a host: a name (trioagg.internal), *.name for the "
                    "names under it, an IP address, or * for any (no scheme, no port)"
                ) from None
        hosts.append(host)
    return tuple(hosts)


def _whole_number(text: str, expected: str) -> int:
    if re.fullmatch(r"\s*[0-9]{1,18}\s*", text) is None:
        raise ValueError(f"{text!r} is not {expected}")
    return int(text)


@_shown_as("N")
def _whole_number_text(text: str) -> int:
    return _whole_number(text, "a whole number (0 or more)")


@_shown_as("N")
def _positive_int(text: str) -> int:
    number = _whole_number(text, "a whole number of at least 1")
    if number < 1:
        raise ValueError(f"{text!r} must be at least 1")
    return number


@_shown_as("PORT")
def _port(text: str) -> int:
    number = _whole_number(text, "a TCP port (a whole number 0-65535; 0 picks a free one)")
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r} is not a TCP port (0-65535; 0 picks a free one)")
    return number


@_shown_as("HOST:PORT|none")
def parse_udp_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT``, ``[IPv6]:PORT``, or ``PORT`` alone (on 127.0.0.1); ``none`` or
    ``off`` for no address."""
    given = text.strip()
    if given.lower() in ("", "none", "off"):
        return None
    host, port_text = "", given
    if given.startswith("["):
        inside, bracket, rest = given[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [IPv6 address]:PORT")
        host, port_text = inside, rest[1:]
    elif ":" in given:
        host, _, port_text = given.rpartition(":")
    if re.fullmatch(r"[0-9]{1,5}", port_text) is None or int(port_text) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT or PORT (a port 0-65535, 0 picks a free one)")
    return host or "127.0.0.1", int(port_text)


@_shown_as("FRACTION")
def _fraction(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 1:
        raise ValueError(f"{text!r} is not a fraction from 0 to 1")
    return number


def _choice(*options: str) -> Callable[[str], str]:
    @_shown_as(f"[{'|'.join(options)}]")
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text.lower()

    return parse


@_shown_as("[true|false]")
def _boolean(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


@_shown_as("PATH|none")
def _optional_path(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none") else text


def _setting(
    default: str, parse: Callable[[str], Any], help: str, metavar: str | None = None
) -> Any:
    """A field whose default is given as text, parsed like a flag would be; its flag
    shows its value as ``metavar``, by default as its parser's values are shown."""
    return dataclasses.field(
        default=parse(default),
        metadata={
            "text": default,
            "parse": parse,
            "help": help,
            "metavar": metavar or _METAVARS.get(parse, "TEXT"),
        },
    )


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run-time settings. Field order is the order ``trioagg serve --help`` lists them."""

    db: str = _setting(
        "trioagg.db",
        str,
        "SQLite file path (created if missing), or a postgresql://user@host/dbname URL.",
        metavar="PATH|URL",
    )
    host: str = _setting("127.0.0.1", str, "Address to listen on.", metavar="ADDRESS")
    port: int = _setting("8000", _port, "TCP port to listen on (0 picks a free one).")
    bucket: int = _setting(
        "1h", parse_bucket, "Bucket width of a new store: 1m, 5m, 15m or 1h. Fixed at creation."
    )
    tiers: Tiers | None = _setting(  # noqa: RUF009 (Tiers is frozen: immutable)
        "none",
        parse_tiers,
        "Retention and downsampling tiers, e.g. '1m for 7d, 1h for 400d, 1d forever': "
        "the finest tier has --bucket's width, each tier's buckets are merged into the "
        "next's once past its horizon, and the last one's horizon (unless forever) is how "
        "long anything is kept. '1d in Europe/Paris forever' keeps that zone's days (UTC "
        "by default). Recorded in the store: horizons may change, widths and zone not.",
    )
    batch_size: int = _setting(
        "10000", _positive_int, "Most events the writer commits in one transaction."
    )
    flush_window: float = _setting(
        "1s",
        parse_duration,
        "Most time a writer keeps rollups of journalled batches in memory before it "
        "writes them to the rollups table (one row per series and bucket for the whole "
        "window); also how stale another process's reads may be. 0: after every batch.",
    )
    head_max: int = _setting(
        "64MiB",
        parse_size,
        "Most memory the writers' unflushed rollups may take; a writer whose part is full "
        "flushes at once, and takes no new batch while that fails.",
    )
    queue_size: int = _setting(
        "1024", _positive_int, "Requests the writer's channel holds before senders wait."
    )
    enqueue_timeout: float = _setting(
        "1s", parse_duration, "How long a request waits for room in a full channel before 503."
    )
    sync: str = _setting(
        "full",
        _choice("full", "normal"),
        "SQLite synchronous mode: full survives power loss, normal only a process crash.",
    )
    max_body: int = _setting("10MiB", parse_size, "Largest request body accepted (413 above).")
    body_timeout: float = _setting(
        "10s", parse_duration, "How long a client may take to send a request body (408 after)."
    )
    send_timeout: float = _setting(
        "30s",
        _positive_duration,
        "How long a client may take no data of an answer (64 KiB at a time) before its "
        "connection is closed (trioagg serve only).",
    )
    keep_alive_timeout: float = _setting(
        "5s",
        parse_duration,
        "How long an idle keep-alive connection stays open (trioagg serve only).",
    )
    cors_origin: tuple[str, ...] = _setting(
        "none",
        parse_origins,
        "Origins whose browser pages may read the API (CORS): comma list of "
        "scheme://host[:port], * for any, none.",
    )
    max_batch: int = _setting("10000", _positive_int, "Most events in one request (413 above).")
    max_future: float = _setting(
        "1h", parse_duration, "Reject events whose ts is further ahead of the server clock."
    )
    max_age: float | None = _setting(
        "none", parse_optional_duration, "Reject events older than this (none: no limit)."
    )
    dedup_window: float = _setting(
        "24h", parse_duration, "How long an event id is remembered for deduplication."
    )
    quantiles: tuple[str, ...] = _setting(
        "none",
        parse_patterns,
        "Keys that keep quantile sketches: comma list of glob patterns (* for all, none).",
    )
    statsd: tuple[str, int] | None = _setting(
        "none",
        parse_udp_address,
        "Receive StatsD and DogStatsD lines on this UDP address: HOST:PORT, or PORT alone "
        "for 127.0.0.1; none: off. UDP carries no API key: whatever reaches the port is "
        "stored, so keep it on loopback or a private network. With --workers N, one worker "
        "receives (see StatsD in the docs).",
    )
    otlp_resource_attributes: tuple[str, ...] = _setting(
        "none",
        parse_patterns,
        "Resource attributes of OpenTelemetry metrics (POST /v1/metrics) kept as tags of "
        "their points, e.g. service.name,deployment.environment: comma list, none.",
    )
    busy_timeout: float = _setting(
        "10s", parse_duration, "How long a commit retries a locked database before failing (503)."
    )
    store_timeout: float = _setting(
        "5s",
        _positive_duration,
        "PostgreSQL: how long a read or a ping may wait for the database server (a commit "
        "twice that) before it fails as an outage (503) and its connection is dropped.",
    )
    drain_timeout: float = _setting(
        "20s",
        parse_duration,
        "On shutdown, how long the writers may commit what is queued; what is left then is "
        "answered 503 (durable) or counted as lost (202). trioagg serve gives hypercorn room "
        "for it; under the hypercorn CLI keep its --graceful-timeout and shutdown_timeout above.",
    )
    max_inflight: int = _setting(
        "256MiB",
        parse_size,
        "Most memory requests may hold at once: bodies being read, and decoded events until "
        "they are committed; a request that would pass it gets 503 with Retry-After.",
    )
    writers: int = _setting(
        "1",
        _positive_int,
        "Writer tasks, each with its own channel and connection, owning the buckets where "
        "bucket_hour % writers is its number; on SQLite each writes a shard file of its own, "
        "and a store opens only with the count it was created with.",
    )
    workers: int = _setting(
        "1",
        _positive_int,
        "trioagg serve: worker processes sharing the listening socket, each the whole "
        "service; more than 1 runs them under a supervisor that replaces a worker that dies "
        "and passes SIGTERM/SIGINT on (see Running it).",
    )
    readers: int = _setting(
        "4", _positive_int, "Read connections (and worker threads) for queries."
    )
    auth: str = _setting(
        "auto",
        _choice("auto", "on", "off"),
        "API keys: on requires one on every request but /healthz, /readyz, /openapi.json and "
        "the dashboard page; off requires none; auto (trioagg serve) is off on a loopback address "
        "until the store holds a key, and on elsewhere (refusing to start without a key). Under "
        "the hypercorn CLI, auto means on once the store holds a key: set on explicitly.",
    )
    allowed_hosts: tuple[str, ...] = _setting(
        "none",
        parse_hosts,
        "While no API key is required: hosts, besides localhost, loopback addresses and the "
        "address reached, that requests for data may name in Host (others get 421, against "
        "DNS rebinding): comma list of names, *.name, IP addresses, * for any, none.",
    )
    metrics_public: bool = _setting(
        "false", _boolean, "true: serve /metrics without a key (by default it needs an admin key)."
    )
    certfile: str | None = _setting(
        "none", _optional_path, "TLS certificate chain (PEM); with keyfile, serve HTTPS."
    )
    keyfile: str | None = _setting("none", _optional_path, "TLS private key (PEM) of certfile.")
    read_cache_entries: int = _setting(
        "4096",
        _whole_number_text,
        "Most /v1/aggregates answers kept to answer repeated reads without a thread hop "
        "(0: no cache); dropped when a commit touches their keys.",
    )
    read_cache_bytes: int = _setting(
        "16MiB", parse_size, "Most bytes of answers the read cache keeps (0: no cache)."
    )
    read_cache_ttl: float = _setting(
        "2s",
        parse_duration,
        "Oldest answer the read cache serves (0: no cache): how stale a read may be of "
        "events another process (hypercorn worker) committed to the same store. On SQLite "
        "an older answer is served while the store took no commit since it was read "
        "(looked at every ttl / 4, and at least every second).",
    )
    loop_step_sampling: float = _setting(
        "0.1",
        _fraction,
        "Share of the time (0-1) the event loop's task steps are timed on its thread's CPU "
        "clock (trioagg_loop_step_cpu_seconds); each timed step costs about 3-5 us.",
    )
    log_level: str = _setting(
        "info", _choice("debug", "info", "warning", "error"), "Logging level."
    )

    def __post_init__(self) -> None:
        trouble = check_bucket(self.tiers, self.bucket)
        if trouble is not None:
            raise ConfigError(f"{flag_name('tiers')} / {env_name('tiers')}: {trouble}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError(
                f"{flag_name('certfile')} and {flag_name('keyfile')} go together: give both "
                "to serve HTTPS, or neither"
            )
        if self.max_inflight < self.max_body:
            raise ConfigError(
                f"{flag_name('max_inflight')} ({self.max_inflight} bytes) must be at least "
                f"{flag_name('max_body')} ({self.max_body} bytes): the largest body must fit"
            )

    @classmethod
    def from_text(cls, values: Mapping[str, str]) -> Settings:
        """Build settings from textual values keyed by field name; the rest keep defaults."""
        parsed: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in values:
                parsed[field.name] = parse_field(field.name, values[field.name])
        unknown = set(values) - set(parsed)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return cls(**parsed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``TRIOAGG_*`` environment variables."""
        environ = os.environ if environ is None else environ
        names = {env_name(field.name): field.name for field in dataclasses.fields(cls)}
        return cls.from_text(
            {names[name]: value for name, value in environ.items() if name in names}
        )


def parse_field(name: str, text: str) -> Any:
    """Parse one setting's text, naming its flag and variable in the error."""
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    try:
        return field.metadata["parse"](text)
    except ValueError as error:
        raise ConfigError(f"{flag_name(name)} / {env_name(name)}: {error}") from None


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()
