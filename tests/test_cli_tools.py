"""``trioagg ingest``, ``query``, ``series`` and ``top`` against a real server."""

from __future__ import annotations

import csv
import functools
import io
import json
import operator
import os
import re
import socket
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click
import h11
import msgspec
import pytest
import trio
from click.testing import CliRunner, Result

from trioagg.cli import main
from trioagg.client.tools import (
    _CHUNK_BYTES,
    LineReader,
    Mapping,
    _loopback,
    column_groups,
    reach,
    sparkline,
)
from trioagg.ingest.decode import Event, UnpatternedEvent

from .conftest import Server, StartServer, metric, stored_counts, wait_until

TS = 1795514400  # 2026-11-24T10:00:00Z
DAY = ["--from", "2026-11-24T00:00:00Z", "--to", "2026-11-25T00:00:00Z"]
DAY_PARAMS = {"from": DAY[1], "to": DAY[3]}


async def run(server: Server, *args: str) -> Result:
    """The command in a worker thread: it runs its own trio loop, like a terminal would."""
    return await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(main, [*args, "--url", server.url])
    )


def test_line_ids_depend_on_source_line_number_and_text() -> None:
    reader = LineReader("/data/a.ndjson", Mapping())
    line = b'{"key": "k"}\n'
    assert reader.line_id(1, line) == LineReader("/data/a.ndjson", Mapping()).line_id(1, line)
    others = {
        LineReader("/data/b.ndjson", Mapping()).line_id(1, line),
        reader.line_id(2, line),
        reader.line_id(1, b'{"key": "j"}\n'),
    }
    assert reader.line_id(1, line) not in others and len(others) == 3


def test_ndjson_lines_get_line_ids_and_bad_lines_their_place() -> None:
    reader = LineReader("/data/a.ndjson", Mapping())
    lines = [
        b'{"key": "k", "value": 2}  \n',
        b"\n",  # blank: skipped, not reported
        b'{"key": "k", "id": "mine"}\r\n',
        b"nope\n",
        b'{"key": 5}',  # the last line, with no newline
    ]
    parsed = reader.ndjson(7, lines)
    assert [json.loads(event) for event in parsed.events] == [
        {"key": "k", "value": 2, "id": reader.line_id(7, lines[0])},
        {"key": "k", "id": "mine"},
    ]
    assert all(event.endswith(b"}\n") for event in parsed.events)
    assert [(number, before) for number, before, _ in parsed.bad] == [(10, 2), (11, 2)]
    assert "malformed" in str(parsed.bad[0][2]) and "Expected `str`" in str(parsed.bad[1][2])
    mapped = LineReader("/data/a.ndjson", Mapping(key="name")).ndjson(1, [b'{"name": "n"}\n'])
    assert [json.loads(event)["key"] for event in mapped.events] == ["n"]


def test_sparkline_scales_between_the_lowest_and_highest_value() -> None:
    assert sparkline([0, 2, None, 14]) == "▁▂ █"
    assert sparkline([]) == ""


async def test_ingest_twice_counts_once_and_reports_bad_lines(
    server: Server, tmp_path: Path
) -> None:
    lines = [json.dumps({"key": f"k{i % 3}", "ts": TS + i, "value": i}) for i in range(3000)]
    lines[10] = '{"key": "k0", "vaule": 1}'
    lines[20] = "not json"
    lines.insert(30, "")  # blank lines are skipped
    path = tmp_path / "events.ndjson"
    path.write_text("\n".join(lines) + "\n")

    first = await run(server, "ingest", str(path))
    assert first.exit_code == 1  # bad lines: not everything was stored
    assert "line 11: Object contains unknown field `vaule`" in first.stderr
    assert "line 21: JSON is malformed" in first.stderr
    assert "2,998 events read" in first.stderr and "2 bad lines" in first.stderr
    assert "2,998 new, 0 already stored" in first.stderr
    assert sum(stored_counts(server.db).values()) == 2998

    again = await run(server, "ingest", str(path), "--no-wait")
    assert "2,998 queued (--no-wait)" in again.stderr  # 202: duplicates are not told
    assert again.exit_code == 1
    await wait_until(lambda: server.app.service.writers.queued() == 0)  # --no-wait
    rerun = await run(server, "ingest", str(path))
    assert "0 new, 2,998 already stored" in rerun.stderr
    assert sum(stored_counts(server.db).values()) == 2998


#: What a msgspec.Meta may constrain, a pattern aside.
_LIMITS = ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "tz")


def test_ndjson_lines_meet_every_rule_of_the_event_type() -> None:
    # The pattern-free decode that ingest (and the server) tries first is Event, patterns
    # aside...
    def unpatterned(kind: Any) -> Any:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin is typing.Annotated:
            limits = [
                {n: getattr(m, n) for n in _LIMITS if getattr(m, n) is not None} for m in args[1:]
            ]
            metas = [msgspec.Meta(**limit) for limit in limits if limit]
            return typing.Annotated[unpatterned(args[0]), *metas] if metas else unpatterned(args[0])
        if origin in (typing.Union, types.UnionType):
            return functools.reduce(operator.or_, map(unpatterned, args))
        return origin[tuple(map(unpatterned, args))] if args else kind

    fields = msgspec.structs.fields
    assert [(f.name, f.default, f.default_factory) for f in fields(UnpatternedEvent)] == [
        (f.name, f.default, f.default_factory) for f in fields(Event)
    ]
    assert [f.type for f in fields(UnpatternedEvent)] == [
        unpatterned(f.type) for f in fields(Event)
    ]
    assert UnpatternedEvent.__struct_config__.forbid_unknown_fields
    # ... and the patterns hold all the same, with Event's words for what breaks them.
    reader = LineReader("/data/a.ndjson", Mapping())
    lines = [
        b'{"key": "ok", "tags": {"t": "v"}}\n',
        b'{"key": "ok\\u0001", "tags": {"t": "v"}}\n',
        b'{"key": "ok", "tags": {"t": "v", "9": "v"}}\n',
        b'{"key": "ok", "tags": {"t": "v"}, "value": "x"}\n',
        b'{"key": "ok", "tags": {"t": "v"}}\n',
    ]
    parsed = reader.ndjson(1, lines)
    assert len(parsed.events) == 2
    decode = msgspec.json.Decoder(Event).decode
    for (_, _, problem), line in zip(parsed.bad, lines[1:4], strict=True):
        with pytest.raises(msgspec.ValidationError) as error:
            decode(line)
        assert str(problem) == str(error.value).replace("`$.", "`")


def test_only_loopback_urls_count_as_this_machine() -> None:
    here = ["http://127.0.0.1:8000", "http://127.8.0.1", "http://[::1]:8000/", "http://localhost"]
    away = ["http://10.0.0.1:8000", "https://example.com", "http://[::2]", "http://localhost.eu"]
    assert [_loopback(url) for url in here + away] == [True] * 4 + [False] * 4


async def test_ingest_gzips_when_told_to(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "zipped.ndjson"
    path.write_text("".join(f'{{"key": "z", "ts": {TS + i}}}\n' for i in range(50)))
    result = await run(server, "ingest", str(path), "--gzip")  # on loopback: not by default
    assert result.exit_code == 0 and "50 new" in result.stderr
    assert stored_counts(server.db) == {"z": 50}


async def test_ingest_sends_batch_events_a_request_past_a_mebibyte(
    server: Server, tmp_path: Path
) -> None:
    # 20,000 events of ~150 bytes with their ids: two requests, not three of 1 MiB (the
    # server's writer merges requests smaller than its batch, 10,000 events)
    line = f'{{"key": "big", "ts": {TS}, "tags": {{"pad": "{"x" * 40}"}}}}\n'
    path = tmp_path / "big.ndjson"
    path.write_text(line * 20_000)
    result = await run(server, "ingest", str(path))
    assert result.exit_code == 0 and "20,000 new" in result.stderr
    assert await metric(server, "trioagg_request_seconds_count", endpoint="/v1/events") == 2


async def test_ingest_stops_after_max_errors(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "bad.ndjson"
    path.write_text("x\n" * 5 + '{"key": "late"}\n')
    result = await run(server, "ingest", str(path), "--max-errors", "2")
    assert result.exit_code == 1
    assert "line 3:" in result.stderr and "line 4:" not in result.stderr
    assert "stopped after more than 2 errors" in result.stderr
    assert stored_counts(server.db) == {}


async def test_ingest_reports_what_the_server_refuses(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "future.ndjson"
    path.write_text('{"key": "now"}\n{"key": "future", "ts": "2999-01-01T00:00:00Z"}\n')
    result = await run(server, "ingest", str(path))
    assert result.exit_code == 1
    assert "line 2: refused: invalid_events" in result.stderr
    assert "too far in the future" in result.stderr
    assert stored_counts(server.db) == {"now": 1}


async def test_ingest_csv_with_a_column_mapping_and_own_ids(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "sales.csv"
    path.write_text(
        "name,when,amount,zone,ref\n"
        f"sale,{TS},10,eu,a\n"
        f"sale,2026-11-24T10:30:00Z,5,us,b\n"
        f"sale,{TS},oops,eu,c\n"
        f"sale,{TS},10,eu,a\n"  # the same ref: the same event
    )
    args = ["--key", "name", "--ts", "when", "--value", "amount", "--tag", "region=zone"]
    result = await run(server, "ingest", str(path), *args, "--id", "ref")
    assert "line 4: value 'oops' is not a number" in result.stderr
    answer = await server.client.get(
        "/v1/aggregates",
        params={"key": "sale", "group_by": "region", "granularity": "all", "stats": "count,sum"}
        | DAY_PARAMS,
    )
    totals = {s["tags"]["region"]: s["buckets"][0] for s in answer.json()["results"]}
    assert {r: (b["count"], b["sum"]) for r, b in totals.items()} == {
        "eu": (1, 10.0),
        "us": (1, 5.0),
    }


async def test_query_series_and_top_print_json_csv_and_tables(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "q.ndjson"
    path.write_text(
        "".join(
            json.dumps({"key": "q.a", "ts": TS + h * 3600, "value": h, "tags": {"r": "eu"}}) + "\n"
            for h in range(4)
        )
        + json.dumps({"key": "q.b", "ts": TS})
        + "\n"
    )
    assert (await run(server, "ingest", str(path))).exit_code == 0

    as_json = await run(server, "query", "q.a", *DAY, "--stats", "count,sum", "--format", "json")
    expected = await server.client.get(
        "/v1/aggregates",
        params={"key": "q.a", "stats": "count,sum"} | DAY_PARAMS,
    )
    assert json.loads(as_json.stdout) == expected.json()

    as_csv = await run(server, "query", "q.a", *DAY, "--group-by", "r", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["key"], json.loads(r["tags"]), r["count"], r["sum"]) for r in rows][:2] == [
        ("q.a", {"r": "eu"}, "1", "0.0"),
        ("q.a", {"r": "eu"}, "1", "1.0"),
    ]
    assert len(rows) == 4

    table = await run(server, "query", "q.a", *DAY, "--stats", "sum", "--tag", "r=eu")
    assert table.exit_code == 0
    assert "sum: ▁▃▆█" in table.stdout and "2026-11-24T13:00:00Z" in table.stdout

    keys = await run(server, "series", "--format", "csv")
    assert [r["key"] for r in csv.DictReader(io.StringIO(keys.stdout))] == ["q.a", "q.b"]
    top = await run(server, "top", *DAY, "--format", "json")
    assert json.loads(top.stdout)["results"] == [
        {"key": "q.a", "count": 4},
        {"key": "q.b", "count": 1},
    ]
    top_table = await run(server, "top", *DAY)
    assert "q.a" in top_table.stdout and "rank" in top_table.stdout


async def test_tables_show_keys_and_tags_as_sent_never_as_markup_or_escapes(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich's width: no cell is wrapped
    # Keys and tag values are what clients sent: "[...]" is rich's markup, and a tag
    # value may carry ESC sequences (clear the screen, retitle it, forge a link).
    key = "[red]k[/red] [link=http://evil]x[/link]"
    value = "a\x1b]8;;http://evil\x1b\\b\x07\x1b[2J"
    event = {"key": key, "ts": TS, "tags": {"t": value}}
    assert (await server.client.post("/v1/events", json=event)).status_code == 200
    shown = "t=a\\x1b]8;;http://evil\\x1b\\b\\x07\\x1b[2J"
    for args in (["series"], ["query", key, *DAY, "--group-by", "t"], ["top", *DAY]):
        table = await run(server, *args)
        assert table.exit_code == 0, table.output
        assert "\x1b" not in table.stdout and "\x07" not in table.stdout
        assert "[red]k[/red]" in table.stdout, table.stdout
        if args[0] == "query":  # the others show tag names, or no tags
            assert shown in table.stdout, table.stdout


async def test_a_refused_query_prints_the_server_details(server: Server) -> None:
    result = await run(server, "query", "k", "--stats", "bogus")
    assert result.exit_code == 1
    assert "422 invalid_query" in result.stderr and '"parameter": "stats"' in result.stderr
    assert result.stderr.count("unknown or too many stat(s) bogus") == 1  # said once


async def test_ingest_reads_stdin_in_chunks_that_keep_quoted_csv_fields_whole(
    server: Server,
) -> None:
    rows = 12_000  # about 1.3 MiB: more than one chunk, each record over two lines
    text = "key,note\n" + "".join(f'multi,"{"x" * 50}\n{"y" * 50}"\n' for _ in range(rows))
    result = await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(
            main, ["ingest", "-", "--format", "csv", "--url", server.url], input=text
        )
    )
    assert result.exit_code == 0, result.stderr
    assert stored_counts(server.db) == {"multi": rows}


async def test_a_query_without_data_says_so_in_every_format(server: Server) -> None:
    event = {"key": "q.a", "ts": TS, "value": 2}
    assert (await server.client.post("/v1/events", json=event)).status_code == 200
    before = ["--from", "2020-01-01T00:00:00Z", "--to", "2020-01-02T00:00:00Z"]
    for args in (["nosuch.key", *DAY], ["q.a", *before]):
        table = await run(server, "query", *args)
        assert table.exit_code == 0, table.output
        assert "no data" in table.stdout
        as_csv = await run(server, "query", *args, "--format", "csv")
        assert as_csv.exit_code == 0 and as_csv.stdout == "key,tags,start,count,sum,min,max,avg\n"
    as_json = await run(server, "query", "nosuch.key", *DAY, "--format", "json")
    expected = await server.client.get("/v1/aggregates", params={"key": "nosuch.key"} | DAY_PARAMS)
    assert json.loads(as_json.stdout) == expected.json()

    both = await run(server, "query", "nosuch.key", "q.a", *DAY, "--stats", "count,sum")
    assert both.exit_code == 0, both.output
    assert "nosuch.key  no data" in both.stdout and "2026-11-24T10:00:00Z" in both.stdout
    as_csv = await run(server, "query", "nosuch.key", "q.a", *DAY, "--stats=sum", "--format=csv")
    assert as_csv.stdout == "key,tags,start,sum\nq.a,{},2026-11-24T10:00:00Z,2.0\n"


async def test_series_and_top_without_data_say_so(server: Server) -> None:
    for command, empty, header in (
        (["series"], "no keys\n", "key,tags,first,last,series\n"),
        (["top", *DAY], "no data\n", "rank,key,count\n"),
    ):
        table = await run(server, *command)
        assert table.exit_code == 0 and table.stdout.endswith(empty), table.output
        as_csv = await run(server, *command, "--format", "csv")
        assert as_csv.exit_code == 0 and as_csv.stdout == header, as_csv.output


async def test_query_tables_keep_times_and_numbers_whole_at_80_columns(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    events = [
        {"key": key, "ts": TS + hour * 3600, "value": value + hour + extra}
        for key, value in (("sales.eu", 275027.5), ("sales.us", 12.25))
        for hour in range(3)
        for extra in (0, 1 / 3)
    ]
    assert (await server.client.post("/v1/events", json=events)).status_code == 200
    stats = "count,sum,min,max,avg,stddev"
    table = await run(server, "query", "sales.eu", "sales.us", *DAY, "--stats", stats)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == "2026-11-24T00:00:00Z .. 2026-11-25T00:00:00Z, hour, UTC"
    assert "sales.eu  count: ▁▁▁" in lines and "sales.us  count: ▁▁▁" in lines
    assert all(len(line.rstrip()) <= 80 for line in lines), table.stdout
    assert "…" not in table.stdout
    # sums, a minimum, an average (rounded after the point only)
    for number in ("550055.333", "550057.333", "275027.5", "275028.667", "24.8333"):
        assert f" {number}" in table.stdout, number
    # sales.eu's columns do not fit in 80: its further ones go to a second table
    headers = [line.split() for line in lines if line.startswith("start ")]
    assert headers == [
        ["start", "count", "sum", "min", "max", "avg"],
        ["start", "stddev"],
        ["start", "count", "sum", "min", "max", "avg", "stddev"],
    ], table.stdout
    for hour in range(10, 13):  # every start whole, in each table
        assert table.stdout.count(f"2026-11-24T{hour}:00:00Z ") == 3


def test_columns_that_do_not_fit_go_to_a_further_table_with_the_labels() -> None:
    widths = {"start": 20, "count": 5, "sum": 10, "avg": 10, "key": 60}
    # 20 + 2 + 5 + 2 + 10 = 39 fits in 40; avg does not
    assert column_groups(["start", "count", "sum", "avg"], widths, 1, 40) == [
        ["start", "count", "sum"],
        ["start", "avg"],
    ]
    # a column wider than the room still gets a table of its own, never none
    assert column_groups(["start", "count"], widths, 1, 10) == [["start", "count"]]
    # keys wrap: they count for 20 columns, not 60
    assert column_groups(["key", "count", "sum"], widths, 1, 41) == [["key", "count", "sum"]]


async def test_series_writes_csv_and_json_as_query_does(server: Server) -> None:
    event = {"key": "s.a", "ts": TS, "tags": {"region": "eu", "plan": "pro"}}
    assert (await server.client.post("/v1/events", json=event)).status_code == 200
    as_csv = await run(server, "series", "--format", "csv")
    (row,) = csv.DictReader(io.StringIO(as_csv.stdout))
    assert json.loads(row["tags"]) == ["plan", "region"]  # JSON, as query's tags are
    as_json = await run(server, "series", "--format", "json")
    assert json.loads(as_json.stdout) == (await server.client.get("/v1/keys")).json()


async def test_ingest_counts_one_event_as_one(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "one.ndjson"
    path.write_text('{"key": "one"}\nnot json\n')
    result = await run(server, "ingest", str(path), "--max-errors", "1")
    assert "1 event read in" in result.stderr, result.stderr
    assert "1 new, 0 already stored, 0 refused, 1 bad line\n" in result.stderr


async def test_ingest_of_a_file_without_events_reads_none(server: Server, tmp_path: Path) -> None:
    for name, text in (("blank.ndjson", "\n\n"), ("header.csv", "key,ts,value\n")):
        (tmp_path / name).write_text(text)
        result = await run(server, "ingest", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        assert "0 events read" in result.stderr


async def test_reach_says_at_once_that_it_retries_and_how_long_is_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with socket.socket() as closed:  # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        said: list[str] = []
        started = trio.current_time()
        assert not await reach(url, 30, said.append)
    assert said[0].startswith(f"cannot reach the server at {url}: "), said
    retries = [re.fullmatch(r"  retrying in (\d+\.\d) s \((\d+\.\d) s left\)", s) for s in said[1:]]
    assert len(retries) >= 5 and all(retries), said
    left = [float(match[2]) for match in retries if match]
    assert left == sorted(left, reverse=True) and left[0] <= 30, said
    # it gives up once the 30 s are over, not before, and not a probe's timeout later
    assert 30 <= trio.current_time() - started <= 35


async def test_ingest_without_a_server_says_so_and_what_was_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "two.ndjson"
    path.write_text('{"key": "a"}\n{"key": "b"}\n')
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        result = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(
                main, ["ingest", str(path), "--url", url, "--retry-timeout", "0s"]
            )
        )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"cannot reach the server at {url}: Connection refused\n")
    assert f"could not reach the server at {url} for 0 s: 2 events not sent" in result.stderr
    assert "connection_error" not in result.stderr


def ingest_process(path: str, url: str, *args: str, log: Path, **popen: object) -> Any:
    """``trioagg ingest`` in a child process, as from a terminal; stderr to ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "trioagg", "ingest", path, "--url", url, *args],
            stderr=sink,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            **popen,  # type: ignore[call-overload]
        )


async def test_ingest_waits_for_a_server_that_comes_up(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "two.ndjson"
    path.write_text('{"key": "a"}\n{"key": "b"}\n')
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "stderr"
    process = ingest_process(str(path), f"http://127.0.0.1:{port}", log=log)
    try:
        await wait_until(lambda: "retrying in" in log.read_text(), timeout=60)
        server = await start_server(port=str(port))
        assert await trio.to_thread.run_sync(lambda: process.wait(60)) == 0, log.read_text()
    finally:
        process.kill()
    assert "reached the server at" in log.read_text()
    assert stored_counts(server.db) == {"a": 1, "b": 1}


@pytest.mark.slow
async def test_ingest_that_loses_its_server_says_what_was_not_sent(
    server: Server, tmp_path: Path
) -> None:
    log = tmp_path / "stderr"
    process = ingest_process(
        "-", server.url, "--retry-timeout", "1s", log=log, stdin=subprocess.PIPE
    )
    line = b'{"key": "first"}\n'
    # ingest reads a pipe by readlines(_CHUNK_BYTES): up to the line that passes it
    first = _CHUNK_BYTES // len(line) + 1
    try:
        await trio.to_thread.run_sync(process.stdin.write, line * first)
        await trio.to_thread.run_sync(process.stdin.flush)
        await wait_until(lambda: stored_counts(server.db) == {"first": first}, timeout=60)
        await server.shutdown()
        process.stdin.write(b'{"key": "later"}\n{"key": "later"}\n')
        process.stdin.close()
        assert await trio.to_thread.run_sync(lambda: process.wait(60)) == 1
    finally:
        process.kill()
    said = log.read_text()
    assert f"could not reach the server at {server.url} for 1 s: 2 events not sent" in said
    assert f"{first + 2:,} events read" in said and ", 0 refused," in said, said
    assert "connection_error" not in said


@pytest.mark.parametrize("name", ["serve", "ingest", "query", "series", "top"])
def test_every_option_says_what_it_does_its_default_and_what_its_value_is(name: str) -> None:
    command = main.get_command(click.Context(main), name)  # the client's load when asked
    assert command is not None
    options = [p for p in command.params if isinstance(p, click.Option)]
    for option in options:
        assert option.help, option.name
        if not option.multiple:
            assert option.show_default or "[default:" in option.help, option.name
        if not option.is_flag and not isinstance(option.type, click.Choice):
            assert option.metavar not in (None, "TEXT", "INTEGER"), option.name


async def test_ingest_keeps_four_requests_in_flight_by_default(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # A server that answers no request of events until it holds four at once (or 10 s
    # passed): four are answered only if ingest sent four without waiting for answers.
    path = tmp_path / "many.ndjson"
    path.write_text("".join(f'{{"key": "k", "ts": {TS + i}}}\n' for i in range(80)))
    holding: list[int] = []  # requests held now
    answered: list[int] = []
    four = trio.Event()
    give_up = trio.current_time() + 10

    async def answer(stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some()
                if not data:
                    return
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                target = event.target
            elif isinstance(event, h11.EndOfMessage):
                body = b'{"status": "ok"}'
                if target.startswith(b"/v1/events"):
                    holding.append(1)
                    if len(holding) >= 4:
                        four.set()
                    with trio.move_on_at(give_up):  # fewer at once: fail, but not hang
                        await four.wait()
                    holding.pop()
                    answered.append(1)
                    body = b'{"accepted": 10, "duplicates": 0}'
                headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
                await stream.send_all(
                    connection.send(h11.Response(status_code=200, headers=headers))
                )
                await stream.send_all(connection.send(h11.Data(data=body)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                connection.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    listener = listeners[0]
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    with trio.fail_after(30):
        result = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(
                main, ["ingest", str(path), "--batch-events", "10", "--no-progress", "--url", url]
            )
        )
    assert result.exit_code == 0, result.stderr
    assert four.is_set() and len(answered) == 8
    assert "80 events read" in result.stderr and "80 new" in result.stderr
