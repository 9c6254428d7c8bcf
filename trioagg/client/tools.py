"""``trioagg ingest``, ``query``, ``series`` and ``top``: the client's command line.

``ingest`` reads NDJSON or CSV, turns each line into an event with an id derived
from the source and the line (so a re-run counts nothing twice), and sends them
through :class:`~trioagg.client.AsyncClient`: reading, parsing and sending take
turns in one trio thread. The query commands print the server's answers as a
table, JSON or CSV.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeVar

import click
import msgspec

from ..core.answers import Keys
from ..core.settings import parse_duration
from ..ingest.decode import (
    Event,
    KnownNames,
    UnpatternedEvent,
)
from ..query.params import DEFAULT_LIMIT, DEFAULT_STATS, FILLS, GRANULARITIES, TOP_STATS
from .answers import as_sent
from .clients import (
    DEFAULT_URL,
    SERVER_MAX_BYTES,
    SERVER_MAX_EVENTS,
    AsyncClient,
    Rejected,
    ServerError,
    TransportError,
)

_F = TypeVar("_F", bound=Callable[..., Any])
_SPARKS: Final = "▁▂▃▄▅▆▇█"
#: What ingest reads and parses at a time: ~1,000 lines, 1-2 ms of the event loop, so
#: that its requests' answers are read and the next requests sent without waiting.
_CHUNK_BYTES: Final = 1 << 16
#: Requests ingest keeps in flight (--concurrency): two for each of two server workers.
_INGEST_CONCURRENCY: Final = 4
#: The longest a probe of the server waits, and the longest pause between two.
_PROBE_SECONDS: Final = 5.0

_url = click.option(
    "--url",
    envvar="TRIOAGG_URL",
    default=DEFAULT_URL,
    show_default=True,
    metavar="URL",
    help="The server. [env: TRIOAGG_URL]",
)
_api_key = click.option(
    "--api-key",
    envvar="TRIOAGG_API_KEY",
    default=None,
    metavar="KEY",
    help="An API key (trioagg keys create), sent as 'Authorization: Bearer KEY' "
    "[default: none; env: TRIOAGG_API_KEY].",
)
_format = click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="A table to read; for scripts, json (the server's answer) or csv.",
)


def _fail_on_server_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the client's errors into one clean line and exit status 1."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ServerError as error:
            # every detail on a line of its own, not the few str(error) says
            headline = f"{error.status} {error.code}: {error.message}"
            lines = [headline] + [f"  {json.dumps(d)}" for d in error.details]
            raise click.ClickException("\n".join(lines)) from None
        except TransportError as error:
            raise click.ClickException(
                f"cannot reach the server at {kwargs['url']}: {_why(error.__cause__ or error)}"
            ) from None

    return run


def _why(error: BaseException) -> str:
    """What the system said of a failed connection (``Connection refused``, ``Name or
    service not known``), found among the errors that caused ``error``; else its text."""
    causes = [error]
    while causes:
        cause = causes.pop()
        if isinstance(cause, OSError) and cause.strerror:
            # an errno's own words: anyio's strerror repeats the address around them
            return os.strerror(cause.errno) if cause.errno and cause.errno > 0 else cause.strerror
        causes += getattr(cause, "exceptions", ())
        causes += filter(None, (cause.__cause__, cause.__context__))
    return str(error) or type(error).__name__


def _seconds(ctx: click.Context, param: click.Parameter, text: str) -> float:
    """A duration option's text (30s, 500ms, 2m) in seconds."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


async def reach(url: str, patience: float, say: Callable[[str], None]) -> bool:
    """Whether the server at ``url`` answers (anything: an error answer is an answer),
    asking for up to ``patience`` seconds. When it does not, says so at once, then
    before each retry how long until it and how long is left."""
    import httpx
    import trio

    deadline = trio.current_time() + patience
    pause = 0.5
    failed = False
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            left = deadline - trio.current_time()
            try:
                await http.get("/healthz", timeout=min(max(left, 1.0), _PROBE_SECONDS))
            except httpx.TransportError as error:
                if not failed:
                    say(f"cannot reach the server at {url}: {_why(error)}")
                    failed = True
            else:
                if failed:
                    say(f"reached the server at {url}")
                return True
            left = deadline - trio.current_time()
            if left <= 0:
                return False
            wait = min(pause, left)
            say(f"  retrying in {wait:.1f} s ({left:.1f} s left)")
            await trio.sleep(wait)
            pause = min(pause * 2, _PROBE_SECONDS)


# -- ingest ------------------------------------------------------------------


@dataclass
class Mapping:
    """Which field (NDJSON) or column (CSV) holds each part of an event."""

    key: str = "key"
    ts: str = "ts"
    value: str = "value"
    id: str = "id"
    distinct_id: str = "distinct_id"
    #: tag name -> column; for NDJSON, the ``tags`` object is taken as well
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        """NDJSON lines are events as they are: no renaming needed."""
        return self == Mapping()


class BadLine(ValueError):
    """A line that is not an event; the message says why."""


#: The most keys (and tag names) known to match remembered: beyond, they are forgotten.
_KNOWN_NAMES: Final = 100_000


class LineReader:
    """Turns lines of a source into encoded events with ids."""

    def __init__(self, source: str, mapping: Mapping) -> None:
        self._prefix = hashlib.blake2b(source.encode(), digest_size=8).hexdigest()
        self.mapping = mapping
        self._plain = mapping.plain
        self._decode_event = msgspec.json.Decoder(Event).decode
        self._decode_unpatterned = msgspec.json.Decoder(UnpatternedEvent).decode
        #: keys and tag names that matched Event's patterns
        self._known = KnownNames(_KNOWN_NAMES)
        self._decode = msgspec.json.Decoder().decode
        self._encode = msgspec.json.Encoder().encode

    def line_id(self, number: int, line: bytes) -> str:
        """The id of line ``number``: the source's hash, the number and the line's hash.
        Ids of one source share a prefix and grow with the line: the server's id index
        takes them in order, as it does UUIDv7s (random ids would scatter its writes)."""
        return f"{self._prefix}-{number:010d}-{hashlib.blake2b(line, digest_size=8).hexdigest()}"

    def line_of(self, event: bytes) -> str | None:
        """ "line N" for an encoded event whose id :meth:`line_id` made, else None."""
        try:
            event_id = msgspec.json.decode(event).get("id", "")
        except (msgspec.DecodeError, AttributeError):
            return None
        prefix, _, rest = str(event_id).partition("-")
        number = rest.split("-", 1)[0]
        return f"line {int(number)}" if prefix == self._prefix and number.isdigit() else None

    def ndjson(self, first: int, lines: Sequence[bytes]) -> Parsed:
        """NDJSON ``lines``, numbered from ``first``, as encoded events. Blank lines are
        skipped."""
        parsed = Parsed()
        if not self._plain:
            for number, line in enumerate(lines, first):
                try:
                    record = self._decode(line)
                    if not isinstance(record, dict):
                        raise BadLine("a line must be a JSON object")
                    parsed.events.append(self.record(number, line, record))
                except msgspec.DecodeError as error:
                    if line.strip():
                        parsed.bad.append((number, len(parsed.events), BadLine(_plain(error))))
                except BadLine as problem:
                    parsed.bad.append((number, len(parsed.events), problem))
            return parsed
        # The lines are events as they are, and most lack an id: one loop, nothing in it
        # but the decode that validates a line, the id's hash and the bytes of the event
        # (this loop is most of ingest's work). The id is line_id()'s.
        decode = self._decode_unpatterned
        known = self._known
        keys, tag_names = known.keys, known.tag_names
        blake2b = hashlib.blake2b
        head = b',"id":"%s-' % self._prefix.encode()
        events, bad = parsed.events, parsed.bad
        for number, line in enumerate(lines, first):
            event: Event | UnpatternedEvent
            try:
                event = decode(line)
                if (
                    event.key not in keys or not tag_names.issuperset(event.tags)
                ) and not known.match(event.key, event.tags):
                    event = self._decode_event(line)  # raises, saying which name is wrong
            except msgspec.DecodeError:
                # Event's own words for what is wrong (it refuses all UnpatternedEvent does)
                try:
                    event = self._decode_event(line)
                except msgspec.DecodeError as error:
                    if line.strip():  # blank lines do not decode: skipped, unreported
                        bad.append((number, len(events), BadLine(_plain(error))))
                    continue
            text = line.rstrip()
            if event.id is None:
                # The line is a valid JSON object: put the id before its closing brace.
                digest = blake2b(line, digest_size=8).hexdigest().encode()
                events.append(b'%s%s%010d-%s"}\n' % (text[:-1], head, number, digest))
            else:
                events.append(text + b"\n")
        return parsed

    def record(self, number: int, line: bytes, record: dict[str, Any]) -> bytes:
        """A record (a CSV row or a decoded NDJSON object) as an encoded event."""
        m = self.mapping
        event: dict[str, Any] = {"key": record.get(m.key)}
        if not event["key"]:
            raise BadLine(f"no key (field {m.key!r})")
        for name, column in (("ts", m.ts), ("value", m.value), ("distinct_id", m.distinct_id)):
            text = record.get(column)
            if text not in (None, ""):
                event[name] = text
        if isinstance(event.get("value"), str):
            try:
                event["value"] = float(event["value"])
            except ValueError:
                raise BadLine(f"value {event['value']!r} is not a number") from None
        ts = event.get("ts")
        if isinstance(ts, str) and _is_number(ts):
            event["ts"] = float(ts)
        tags = dict(record.get("tags") or {}) if isinstance(record.get("tags"), dict) else {}
        tags.update((name, record[column]) for name, column in m.tags.items() if record.get(column))
        if tags:
            event["tags"] = tags
        event["id"] = record.get(m.id) or self.line_id(number, line)
        encoded = self._encode(event)
        try:
            self._decode_event(encoded)
        except msgspec.ValidationError as error:
            raise BadLine(_plain(error)) from None
        return encoded + b"\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _plain(error: Exception) -> str:
    return str(error).replace("`$.", "`")


@dataclass
class Parsed:
    """The events of a chunk of lines, in order, and its bad lines."""

    events: list[bytes] = field(default_factory=list)
    #: (line number, how many of ``events`` come before it, the problem), in order
    bad: list[tuple[int, int, BadLine]] = field(default_factory=list)


class EventSource:
    """Turns chunks of whole lines of one input, in order, into numbered events."""

    def __init__(self, kind: str, reader: LineReader) -> None:
        self.kind = kind
        self.reader = reader
        self._number = 0
        self._lines: collections.deque[str] = collections.deque()
        self._rows = csv.DictReader(_Feed(self._lines))

    def events(self, lines: Sequence[bytes]) -> Parsed:
        """The events and bad lines of ``lines``, the input's next. For CSV, a chunk must
        end between records (see :func:`chunks`)."""
        if self.kind == "ndjson":
            parsed = self.reader.ndjson(self._number + 1, lines)
            self._number += len(lines)
            return parsed
        parsed = Parsed()
        self._lines.extend(line.decode("utf-8-sig") for line in lines)
        rows = self._rows
        for row in rows:
            number = rows.line_num
            text = ",".join(row.get(k) or "" for k in rows.fieldnames or ()).encode()
            try:
                parsed.events.append(self.reader.record(number, text, row))
            except BadLine as problem:
                parsed.bad.append((number, len(parsed.events), problem))
        return parsed


class _Feed:
    """An iterator over a deque that others refill: ends for now whenever it is empty."""

    def __init__(self, lines: collections.deque[str]) -> None:
        self._lines = lines

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        if not self._lines:
            raise StopIteration
        return self._lines.popleft()


async def chunks(stream: IO[bytes], kind: str, blocking: bool) -> AsyncGenerator[list[bytes], None]:
    """Whole lines of ``stream``, about _CHUNK_BYTES at a time; read in a worker thread when a
    read may block (a pipe), else here. A CSV chunk ends outside quotes."""
    import trio

    async def read() -> list[bytes]:
        if blocking:
            return await trio.to_thread.run_sync(stream.readlines, _CHUNK_BYTES)
        await trio.lowlevel.checkpoint()
        return stream.readlines(_CHUNK_BYTES)

    while lines := await read():
        if kind == "csv":
            while sum(line.count(b'"') for line in lines) % 2:  # inside a quoted field
                more = await read()
                if not more:
                    break
                lines += more
        yield lines


@dataclass
class Tally:
    bad: int = 0
    rejected: int = 0
    events: int = 0
    #: events given up because the server could not be reached for retry_timeout
    unreachable: int = 0


def _progress(size: int | None, enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns: list[Any] = [
        TextColumn("{task.fields[events]:,} events"),
        TextColumn("{task.fields[rate]:,.0f} events/s"),
        DownloadColumn(),
        TimeElapsedColumn(),
    ]
    if size is not None:
        columns[2:2] = [BarColumn()]
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, disable=not (enabled and console.is_terminal))


def _field(flag: str, what: str, *name: str) -> Callable[[_F], _F]:
    """An option naming the field (NDJSON) or column (CSV) that holds ``what``; by
    default, the name of the event's own field."""
    default = flag.removeprefix("--").replace("-", "_")
    return click.option(
        flag,
        *name,
        default=default,
        show_default=True,
        metavar="FIELD",
        help=f"Field/column of {what}.",
    )


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option(
    "--format",
    "kind",
    type=click.Choice(["auto", "ndjson", "csv"]),
    default="auto",
    show_default=True,
    help="auto: csv for a .csv file name, else ndjson.",
)
@_field("--key", "the key")
@_field("--ts", "the time stamp")
@_field("--value", "the value")
@_field("--id", "the id", "id_")
@_field("--distinct-id", "the distinct id (who did it, for distinct counts)")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="NAME[=COLUMN]",
    help="A tag from a column (repeat). NDJSON lines' own tags object is kept.",
)
@click.option(
    "--source",
    default=None,
    metavar="NAME",
    help="The identity ids are derived from [default: the file's absolute path; '-': stdin].",
)
@click.option(
    "--max-errors",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    metavar="N",
    help="Stop after more bad or refused lines than this.",
)
@click.option(
    "--batch-events",
    type=click.IntRange(1, SERVER_MAX_EVENTS),
    default=SERVER_MAX_EVENTS,
    show_default=True,
    metavar="N",
    help="Events per request.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    # Four, not the client's two: with two, each worker of `serve --workers 2` mostly
    # held one request, and its writer idled between them long enough to flush its head
    # after nearly every batch (28 flushes for 30 batches of 10,000 events).
    default=_INGEST_CONCURRENCY,
    show_default=True,
    metavar="N",
    help="Requests in flight at once.",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Durable answers.")
@click.option(
    "--gzip/--no-gzip",
    default=None,
    help="Gzip request bodies [default: unless the server's address is a loopback one, "
    "where it would only cost both sides CPU time].",
)
@click.option(
    "--retry-timeout",
    callback=_seconds,
    metavar="DURATION",
    default="30s",
    show_default=True,
    help="How long to retry a request (the server unreachable, or answering 502, 503 or "
    "504), and to wait for the server at the start, before giving up on its events.",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="A progress bar (on a terminal).",
)
@_url
@_api_key
def ingest(
    file: IO[bytes],
    kind: str,
    key: str,
    ts: str,
    value: str,
    id_: str,
    distinct_id: str,
    tags: Sequence[str],
    source: str | None,
    max_errors: int,
    batch_events: int,
    concurrency: int,
    wait: bool,
    gzip: bool | None,
    retry_timeout: float,
    progress: bool,
    url: str,
    api_key: str | None,
) -> None:
    """Send the events of FILE (NDJSON or CSV; - for stdin) through the batching client.

    Each event without an id gets one derived from the source and its line, so
    running the same file again counts nothing twice (within the server's dedup
    window). Exit status 1 when any line was not stored.
    """
    name = getattr(file, "name", "-")
    if kind == "auto":
        kind = "csv" if str(name).lower().endswith(".csv") else "ndjson"
    if source is None:
        source = "-" if name in ("-", "<stdin>") else os.path.realpath(name)
    tag_columns = {name: column or name for name, _, column in (t.partition("=") for t in tags)}
    mapping = Mapping(key, ts, value, id_, distinct_id, tag_columns)
    reader = LineReader(source, mapping)
    size = _size(file)
    tally = Tally()
    stopped = ""  # why reading stopped before the end of the input

    def refused(rejected: Rejected) -> None:
        if isinstance(rejected.error, TransportError):  # not the server's answer: none came
            tally.unreachable += len(rejected.events)
            return
        tally.rejected += len(rejected.events)
        for problem in rejected.problems[:max_errors]:
            index = problem.get("index")
            event = rejected.events[index] if isinstance(index, int) else b""
            where = reader.line_of(event) or event.decode(errors="replace").strip()
            click.echo(f"{where}: refused: {rejected.error.code}: {json.dumps(problem)}", err=True)
        if not rejected.problems:
            click.echo(
                f"refused {_many(len(rejected.events), 'event')}: {rejected.error}", err=True
            )

    import trio

    async def send_all() -> None:
        if not await reach(url, retry_timeout, functools.partial(click.echo, err=True)):
            await send_lines(None)  # to count what is not sent
            return
        async with AsyncClient(
            url,
            api_key=api_key,
            batch_events=batch_events,
            # Requests of --batch-events events, not cut at 1 MiB (~9,500 of ingest's
            # events): the server's writer merges requests smaller than its batch, and
            # answers both at once; with both answers away it idles, flushing early.
            batch_bytes=SERVER_MAX_BYTES // 2,
            # A regular file's lines come as fast as they are read: a batch goes when
            # full or at the end, not when 0.1 s old, which on a busy machine cut the
            # batches short. A pipe's (tail -f) still go within 0.1 s.
            max_delay=0.1 if size is None else _FILE_BATCH_DELAY,
            concurrency=concurrency,
            wait=wait,
            gzip=False if gzip is None and _loopback(url) else gzip,
            retry_timeout=retry_timeout,
            on_error=refused,
            close_timeout=math.inf,  # each batch has its retry_timeout, and the user watches
        ) as client:
            clients.append(client)
            await send_lines(client)

    async def send_lines(client: AsyncClient | None) -> None:
        async def send(events: list[bytes]) -> None:
            if client is not None and events:
                await client.send_encoded_many(events)
            tally.events += len(events)

        with _progress(size, progress) as bar:
            task = bar.add_task("ingest", total=size, events=0, rate=0.0)
            read = 0
            async with contextlib.aclosing(chunks(file, kind, blocking=size is None)) as feed:
                async for lines in feed:
                    read += sum(map(len, lines))
                    parsed = events_of.events(lines)
                    sent = 0
                    for number, before, problem in parsed.bad:
                        await send(parsed.events[sent:before])
                        sent = before
                        tally.bad += 1
                        click.echo(f"line {number}: {problem}", err=True)
                        if stop():
                            return
                    await send(parsed.events[sent:] if sent else parsed.events)
                    if stop():
                        return
                    rate = tally.events / max(time.monotonic() - started, 1e-9)
                    bar.update(task, completed=read, events=tally.events, rate=rate)

    def stop() -> bool:
        """Whether to stop reading, saying why in ``stopped``."""
        nonlocal stopped
        if tally.bad + tally.rejected > max_errors:
            stopped = f"stopped after more than {_many(max_errors, 'error')}"
        elif tally.unreachable:
            stopped = "stopped reading: the server cannot be reached"
        return bool(stopped)

    events_of = EventSource(kind, reader)
    clients: list[AsyncClient] = []
    started = time.monotonic()
    trio.run(send_all)
    unreachable = f"could not reach the server at {url} for {retry_timeout:g} s"
    if not clients:
        raise click.ClickException(f"{unreachable}: {_many(tally.events, 'event')} not sent")
    counters = clients[0].counters
    elapsed = time.monotonic() - started
    new = counters.acknowledged - counters.duplicates
    click.echo(
        f"{_many(tally.events, 'event')} read in {elapsed:.1f} s "
        f"({tally.events / elapsed:,.0f}/s): "
        + (
            f"{new:,} new, {counters.duplicates:,} already stored"
            if wait  # a 202 answer does not tell duplicates
            else f"{counters.acknowledged:,} queued (--no-wait)"
        )
        + f", {tally.rejected:,} refused, {_many(tally.bad, 'bad line')}"
        + (f"; {stopped}" if stopped else ""),
        err=True,
    )
    if tally.unreachable:
        lost = _many(tally.unreachable, "event")
        raise click.ClickException(f"{unreachable}: {lost} not sent")
    if stopped or counters.failed or tally.bad:
        sys.exit(1)


def _many(count: int, thing: str) -> str:
    """``1 event``, ``2,000 events``."""
    return f"{count:,} {thing}{'' if count == 1 else 's'}"


def _loopback(url: str) -> bool:
    """Whether ``url`` names this machine by a loopback address (or ``localhost``)."""
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The longest a batch of a regular file's lines waits for more lines before it is sent.
_FILE_BATCH_DELAY: Final = 2.0


def _size(file: IO[bytes]) -> int | None:
    try:
        stat = os.fstat(file.fileno())
    except (OSError, io.UnsupportedOperation):
        return None
    import stat as stat_module

    return stat.st_size if stat_module.S_ISREG(stat.st_mode) and stat.st_size else None


# -- queries -----------------------------------------------------------------


def _run_query(url: str, api_key: str | None, ask: Callable[[AsyncClient], Any]) -> Any:
    import trio

    async def main() -> Any:
        async with AsyncClient(url, api_key=api_key) as client:
            return await ask(client)

    return trio.run(main)


def sparkline(values: Sequence[float | None]) -> str:
    """A line of block characters, one per value (a space for a missing value)."""
    present = [v for v in values if v is not None]
    if not present:
        return ""
    low, high = min(present), max(present)
    span = (high - low) or 1.0
    return "".join(
        " " if v is None else _SPARKS[round((v - low) / span * (len(_SPARKS) - 1))] for v in values
    )


def _emit(
    rows: list[dict[str, Any]],
    document: Any,
    output: str,
    columns: Sequence[str],
    empty: str,
    title: str = "",
    labels: int = 1,
) -> None:
    """Print ``rows`` as a table (see :func:`_print_table`) or CSV, or ``document`` as
    JSON. Without rows, CSV is its header alone and a table is ``empty``: no answer is
    a blank line."""
    if output == "json":
        click.echo(msgspec.json.encode(document).decode())
        return
    if output == "csv":
        writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
            for row in rows
        )
        return
    if title:
        click.echo(printable(title))
    if rows:
        _print_table(columns, rows, labels)
    else:
        click.echo(empty)


def _print_table(columns: Sequence[str], rows: list[dict[str, Any]], labels: int) -> None:
    """``rows`` as tables as wide as the terminal at most. Keys and tags wrap; times and
    numbers are shown whole, and the columns that do not fit go to a further table,
    which repeats the first ``labels`` columns (what names a row)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    # Text, not str: rich would read "[...]" in a key or tag as its markup.
    cells = {c: [Text(printable(_cell(row.get(c)))) for row in rows] for c in columns}
    widths = {c: max(len(c), *(cell.cell_len for cell in cells[c])) for c in columns}
    for number, group in enumerate(column_groups(columns, widths, labels, console.width)):
        table = Table(
            # Columns two spaces apart and no rules around them: more of them fit.
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        for c in group:
            whole = c not in _WRAPPING
            # Numbers to the right; text (keys, tags, times) to the left. By the cells, not
            # the name: "last" is a time of the series command and a stat of query.
            numeric = all(isinstance(row.get(c), int | float | None) for row in rows)
            justify: Any = "right" if numeric else "left"
            table.add_column(
                c, justify=justify, no_wrap=whole, overflow="fold", min_width=widths[c] * whole
            )
        for index in range(len(rows)):
            table.add_row(*(cells[c][index] for c in group))
        if number:
            console.print()  # between a table and the one with its further columns
        console.print(table)


#: Columns whose cells may wrap, taking no less than _WRAPPED_WIDTH; the others'
#: cells (times, numbers) are never cut.
_WRAPPING: Final = frozenset({"key", "tags"})
_WRAPPED_WIDTH: Final = 20


def column_groups(
    columns: Sequence[str], widths: dict[str, int], labels: int, room: int
) -> list[list[str]]:
    """``columns`` cut into tables no wider than ``room`` where they can be: each table
    begins with the first ``labels`` columns and takes as many of the others, in order,
    as fit (at least one)."""

    def width(column: str) -> int:  # with the two spaces after it
        wide = widths[column]
        return (min(wide, _WRAPPED_WIDTH) if column in _WRAPPING else wide) + 2

    head = list(columns[:labels])
    start = sum(map(width, head)) - 2  # none after the last column
    groups, used = [head.copy()], start
    for column in columns[labels:]:
        if used + width(column) > room and len(groups[-1]) > labels:
            groups.append(head.copy())
            used = start
        groups[-1].append(column)
        used += width(column)
    return groups


def printable(text: str) -> str:
    """``text`` with every character a terminal would not print as itself (control
    characters, escape sequences' ESC, line and paragraph separators) written as its
    Python escape: keys and tag values are what clients sent, and must not drive the
    terminal of whoever lists them."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        # Every digit before the point, and some after it: 275027.5 is not 275028.
        return f"{value:.{max(6, len(f'{abs(value):.0f}') + 3)}g}"
    return str(value)


_from = click.option(
    "--from",
    "start",
    metavar="TIME",
    help="Start: RFC 3339 or Unix seconds [default: --to minus 24 h].",
)
_to = click.option("--to", "end", metavar="TIME", help="End, exclusive [default: now].")
_prefix = click.option(
    "--prefix", metavar="PREFIX", help="Only keys starting with this [default: every key]."
)


def _tag_filters(tags: Sequence[str]) -> dict[str, str]:
    filters = {}
    for text in tags:
        name, sep, value = text.partition("=")
        if not sep:
            raise click.BadParameter(f"{text!r} is not NAME=VALUE", param_hint="--tag")
        filters[name] = value
    return filters


@click.command()
@click.argument("keys", nargs=-1, required=True)
@_from
@_to
@click.option(
    "--granularity",
    type=click.Choice(GRANULARITIES),
    help="How long each row's bucket is (bucket: the store's width) [default: hour].",
)
@click.option("--tz", metavar="ZONE", help="IANA zone of day/week/month boundaries [default: UTC].")
@click.option("--tag", "tags", multiple=True, metavar="NAME=VALUE", help="Tag filter (repeat).")
@click.option(
    "--group-by",
    metavar="TAG",
    help="One series per value of this tag [default: none: one series per key].",
)
@click.option(
    "--stats",
    metavar="STATS",
    help="Comma list of count, sum, min, max, avg, stddev, distinct, last and pNN (p99) "
    f"[default: {','.join(DEFAULT_STATS)}].",
)
@click.option(
    "--fill",
    type=click.Choice(FILLS),
    help="Buckets without events: left out (none), or as 0 or null [default: none].",
)
@_format
@_url
@_api_key
@_fail_on_server_errors
def query(
    keys: tuple[str, ...],
    start: str | None,
    end: str | None,
    granularity: str | None,
    tz: str | None,
    tags: Sequence[str],
    group_by: str | None,
    stats: str | None,
    fill: str | None,
    output: str,
    url: str,
    api_key: str | None,
) -> None:
    """Roll-ups of KEYS (GET /v1/aggregates): one row per series and bucket."""
    filters = _tag_filters(tags)
    columns = ["key", "tags", "start", *(stats.split(",") if stats else DEFAULT_STATS)]
    typed = _run_query(
        url,
        api_key,
        lambda c: c.aggregates(
            keys,
            start=start,
            end=end,
            granularity=granularity,
            tz=tz,
            fill=fill,
            group_by=group_by,
            stats=stats.split(",") if stats else None,
            tags=filters,
        ),
    )
    answer = as_sent(typed)  # buckets as mappings: a row's columns are the stats asked
    if output != "table":
        rows = [
            {"key": series.key, "tags": series.tags, **bucket}
            for series in answer.results
            for bucket in series.buckets
        ]
        _emit(rows, answer, output, columns, "no data")
        return
    click.echo(f"{answer.start} .. {answer.end}, {answer.granularity}, {answer.tz}")
    stat = columns[3]  # the first asked for: the one of the sparklines
    for series in answer.results:
        # One table per series: its key and tags are said once, above its buckets.
        name = " ".join(filter(None, (series.key, _cell(series.tags))))
        click.echo()
        if not series.buckets:
            click.echo(printable(f"{name}  no data"))
            continue
        click.echo(printable(f"{name}  {stat}: {sparkline([b.get(stat) for b in series.buckets])}"))
        _print_table(columns[2:], series.buckets, labels=1)
    if not answer.results:
        click.echo("no data")


@click.command()
@_prefix
@_format
@_url
@_api_key
@_fail_on_server_errors
def series(prefix: str | None, output: str, url: str, api_key: str | None) -> None:
    """Every series key the server holds (GET /v1/keys, all pages)."""
    found = _run_query(url, api_key, lambda c: c.keys(prefix))
    rows = [msgspec.structs.asdict(k) for k in found]
    answer = Keys(found, next=None)  # the server's answer, as if all on one page
    _emit(rows, answer, output, ["key", "tags", "first", "last", "series"], "no keys")


@click.command()
@_from
@_to
@click.option("--stat", type=click.Choice(TOP_STATS), help="Rank by [default: count].")
@_prefix
@click.option("--limit", type=int, metavar="N", help=f"How many keys [default: {DEFAULT_LIMIT}].")
@_format
@_url
@_api_key
@_fail_on_server_errors
def top(
    start: str | None,
    end: str | None,
    stat: str | None,
    prefix: str | None,
    limit: int | None,
    output: str,
    url: str,
    api_key: str | None,
) -> None:
    """The keys with the most events (or the highest sum) over a range (GET /v1/top)."""
    answer = _run_query(
        url,
        api_key,
        lambda c: c.top(start=start, end=end, stat=stat, prefix=prefix, limit=limit),
    )
    rows = [
        {"rank": rank, **msgspec.to_builtins(item)}
        for rank, item in enumerate(answer.results, start=1)
    ]
    title = f"{answer.start} .. {answer.end}, by {answer.stat}"
    _emit(rows, answer, output, ["rank", "key", answer.stat], "no data", title, labels=2)


#: The commands this module adds to ``trioagg``.
COMMANDS: Final = (ingest, query, series, top)
